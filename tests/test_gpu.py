"""The GPU path (skipped without CUDA; ``bash scripts/gpu_check.sh`` runs it on a machine with an NVIDIA GPU).

- Kernels on CUDA against the CPU kernels on the same inputs: equal where the math is element by element;
  where a compressor takes a norm or mean (sign, 1-bit, QSGD), CUDA sums in another order, so its values agree
  to rounding (QSGD: a level may flip where that rounding moves an element across a boundary, rarely).
  RandK draws its indices with torch's generator of the tensor's device, other draws on CUDA: its statistics
  are checked instead (exactly k coordinates, each kept as often as k/d says, unbiased when it should be).
- The pipeline on CUDA against the simulation on CUDA: on 1 rank through Horovod's own GPU collectives
  (NCCL, when this Horovod has it; compress()/decompress() called as the optimizer calls them, which it skips
  on one rank), and on 2 ranks sharing the one GPU. NCCL refuses two ranks on one device ("Duplicate GPU
  detected"), so those run with host staging (``HVD_COMPRESS_HOST_STAGING=1``) over Gloo: kernels and
  buffers on the GPU, payloads through host memory. Replicas stay bit-identical.
"""
import os

import pytest
import torch

from hvd_compress import compressors as C
from hvd_compress.torch import kernels as K

from conftest import DISTRIBUTED, launch, result_line

from test_distributed import check_against_simulation, run_worker

# HVD_COMPRESS_GPU_TEST_DEVICE=cpu runs the same tests on the CPU (a dry run of their logic, as
# ``scripts/gpu_check.sh --dry-run`` does): nothing of it is a GPU result.
DEVICE = os.environ.get("HVD_COMPRESS_GPU_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA device here")

SPECS = ["topk:0.3", "topk:k=2", "randk:0.3", "randk:0.3,biased", "randk:0.3,shared", "natural", "natural:det",
         "sign", "onebit", "qsgd:4", "topk:0.3+natural", "0.5*topk:0.3", "0.5*sign", "none"]
RANDOM_INDICES = {"randk:0.3", "randk:0.3,biased", "randk:0.3,shared"}
REDUCTIONS = {"sign", "onebit", "qsgd:4", "0.5*sign"}
SEED = (987654321, 12)
SIZES = [1000, 300_000]      # 300,000: the sizes where the CPU's TopK samples its threshold


def _vector(d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(d, generator=g, dtype=torch.float64) * 3).to(dtype)


def _agree(spec, got, expected, what):
    """CUDA's result (moved to the CPU) against the CPU's."""
    assert got.dtype == expected.dtype and got.shape == expected.shape, what
    if spec not in REDUCTIONS:
        assert torch.equal(got, expected), f"{what}: differs at {(got != expected).sum().item()} elements"
        return
    rtol = 1e-5 if expected.dtype == torch.float32 else 1e-12
    # relative to the largest value: x - scale * sign(x) cancels where |x| is near the scale
    close = torch.isclose(got, expected, rtol=rtol, atol=rtol * expected.abs().max().item())
    allowed = expected.numel() // 1000 if spec.startswith("qsgd") else 0   # levels flipped by the rounding
    assert (~close).sum().item() <= allowed, f"{what}: {(~close).sum().item()} elements differ"


CASES = [(s, d, dt) for s in SPECS if s not in RANDOM_INDICES for d in SIZES for dt in (torch.float32, torch.float64)]


@pytest.mark.parametrize("spec,d,dtype", CASES, ids=[f"{s}-{d}-{str(dt)[6:]}" for s, d, dt in CASES])
def test_worker_step_on_cuda_equals_the_cpu_kernel(spec, d, dtype):
    """The worker step with error feedback (x = g + e, payload, e <- x - decode) and the decode of what it
    sends, packed and unpacked as it travels."""
    c = C.parse(spec)
    g, e = _vector(d, dtype, 1), _vector(d, dtype, 2) * 0.5
    results = {}
    for device in ("cpu", DEVICE):
        gd, ed = g.to(device), e.to(device)
        e_out = torch.empty_like(gd)
        parts, stats = K.step(c, gd, ed, e_out, SEED)
        if not c.summable:
            parts = K.unpack(c, K.pack(c, parts, d), d, dtype)
        results[device] = (K.decode(c, parts, d, SEED, dtype), e_out, stats)
        assert results[device][0].device.type == device and e_out.device.type == device
    for what, cpu, cuda in zip(("decoded", "error", "stats"), results["cpu"], results[DEVICE]):
        if what == "stats":   # ||x - C(x)||^2, ||x||^2, finite: sums, in any order
            assert torch.allclose(cuda.cpu(), cpu, rtol=1e-5), (cuda, cpu)
        else:
            _agree(spec, cuda.cpu(), cpu, what)


@pytest.mark.parametrize("spec", SPECS)
def test_decode_mean_of_two_payloads_on_cuda(spec):
    """What the allgather transport does with n payloads: their decoded mean, into a kept buffer."""
    c, d, dtype = C.parse(spec), 5000, torch.float32
    rows = {}
    for device in ("cpu", DEVICE):
        payloads = []
        for r in range(2):   # summable payloads share their seed (and so their coordinates)
            seed = SEED if c.summable else (SEED[0], SEED[1] + r)
            parts, _ = K.step(c, _vector(d, dtype, 10 + r).to(device), None, None, seed)
            payloads.append(parts[0] if c.summable else K.pack(c, parts, d))
        if c.summable:
            rows[device] = K.decode(c, [(payloads[0] + payloads[1]) / 2], d, SEED, dtype)
        else:
            out = torch.empty(d, dtype=dtype, device=device)
            rows[device] = K.decode_mean(c, payloads, d, SEED, dtype, out=out)
    if spec not in RANDOM_INDICES:
        _agree(spec, rows[DEVICE].cpu(), rows["cpu"], "decoded mean")
    assert rows[DEVICE].isfinite().all()


@pytest.mark.parametrize("spec", sorted(RANDOM_INDICES))
def test_randk_on_cuda_keeps_its_statistics(spec):
    """4000 draws on CUDA: k coordinates each time, every coordinate kept with frequency k/d (within 5
    standard deviations), and the mean of C(x) is x (unbiased) or k/d x (biased), within 5 standard errors."""
    c, d, draws = C.parse(spec), 40, 4000
    k = c.k_for(d)
    x = _vector(d, torch.float64, 3).to(DEVICE)
    samples = torch.stack([K.apply(c, x, (SEED[0], s)) for s in range(draws)])
    kept = samples != 0
    assert (kept.sum(1) == k).all()
    p = k / d
    frequency = kept.double().mean(0)
    assert ((frequency - p).abs() <= 5 * (p * (1 - p) / draws) ** 0.5).all(), frequency
    expected = x if c.unbiased else p * x
    error = (samples.mean(0) - expected).abs()
    assert (error <= 5 * samples.std(0) / draws ** 0.5 + 1e-12).all()


GPU_CASE_STEPS = 8


def gpu_cases():
    """Every compressor x mode (plain, error feedback, DoubleSqueeze) x transport on CUDA, float32 and
    float64, and the options around them."""
    modes = {"plain": {}, "ef": {"error_feedback": True}, "doublesqueeze": {"error_feedback": True}}
    cases = []
    for spec in [s for s in SPECS if s != "topk:k=2"]:
        for mode, options in modes.items():
            for transport in (None, "sharded"):
                case = {"id": f"{spec}/{mode}/{transport or 'default'}", "compressor": spec, "device": DEVICE,
                        "steps": GPU_CASE_STEPS, "transport": transport, **options}
                if mode == "doublesqueeze":
                    case["server"] = spec
                cases.append(case)
    ds = {"compressor": "topk:0.3", "error_feedback": True, "server": "topk:0.5", "steps": GPU_CASE_STEPS,
          "device": DEVICE}
    return cases + [
        {**ds, "id": "float32", "dtype": "float32"},
        {**ds, "id": "float32/sign", "dtype": "float32", "compressor": "sign", "server": "sign"},
        {**ds, "id": "bfloat16", "dtype": "bfloat16"},
        {**ds, "id": "transport=allgather/randk:0.3,shared", "compressor": "randk:0.3,shared",
         "transport": "allgather"},
        {**ds, "id": "transport=dense", "transport": "dense"},
        {**ds, "id": "transport=auto", "transport": "auto", "link_gbps": 1e-4},
        {**ds, "id": "dense_below=16", "dense_below": 16},
        {**ds, "id": "bucket_mb=1e-4/sharded", "bucket_mb": 1e-4, "transport": "sharded"},
        {**ds, "id": "momentum=0.9/dense_below=16", "momentum": 0.9, "dense_below": 16},
        {**ds, "id": "warmup=4/clip=5", "warmup": [4, 0.9], "clip": 5.0},
        {**ds, "id": "state_dict at 3, resumed", "resume_at": 3},
    ]


GPU_CASES = gpu_cases()


@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory):
    """One rank, Horovod's own GPU collectives, compress()/decompress() called as the optimizer does."""
    return run_worker(1, GPU_CASES, tmp_path_factory.mktemp("gpu1"), timeout=900,
                      env={"HVD_COMPRESS_TEST_DIRECT_CALLS": "1", "HVD_COMPRESS_HOST_STAGING": "0"})


@pytest.fixture(scope="module")
def two_ranks_one_gpu_run(tmp_path_factory):
    return run_worker(2, GPU_CASES, tmp_path_factory.mktemp("gpu2"), timeout=900,
                      env={"HVD_COMPRESS_HOST_STAGING": "1"})


@pytest.mark.parametrize("case", GPU_CASES, ids=[c["id"] for c in GPU_CASES])
def test_one_rank_on_cuda_with_horovods_gpu_collectives_matches_simulation(one_rank_run, case):
    check_against_simulation(*one_rank_run, case)


@pytest.mark.parametrize("case", GPU_CASES, ids=[c["id"] for c in GPU_CASES])
def test_two_ranks_sharing_the_gpu_match_simulation(two_ranks_one_gpu_run, case):
    check_against_simulation(*two_ranks_one_gpu_run, case)


@pytest.mark.parametrize("staging", ["0", "1"])
def test_where_the_collectives_run(staging):
    """Without staging the plug-in hands Horovod (built with NCCL) the CUDA tensors themselves: payloads never
    leave the GPU; with staging, host copies only."""
    proc = launch(1, DISTRIBUTED / "gpu_where.py", DEVICE, env={"HVD_COMPRESS_HOST_STAGING": staging})
    assert proc.returncode == 0, proc.stdout[-5000:]
    report = result_line(proc)
    if DEVICE != "cpu":
        assert report["nccl_built"] and report["cuda_built"], report
    assert report["collective_devices"] == (["cpu"] if staging == "1" else [DEVICE]), report
    assert report["equal"], report
