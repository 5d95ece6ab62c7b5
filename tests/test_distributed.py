"""Real multi-process runs (horovodrun with Gloo for 2 ranks, mpirun for 3) against the single-process
simulation: every compressor x mode, replicas bit-identical, the seed's counterexample, checkpoint/resume,
and bad set-ups that must fail clearly on every rank."""
import json
import os
import subprocess

import pytest
import torch

from conftest import DISTRIBUTED, launch, result_line

import sys
sys.path.insert(0, str(DISTRIBUTED))
from common import train_reference  # noqa: E402

STEPS = 20
COMPRESSORS = ["topk:0.3", "topk:k=2", "randk:0.3", "randk:0.3,biased", "randk:0.3,shared", "natural",
               "natural:det", "sign", "onebit", "qsgd:4", "topk:0.3+natural", "topk:0.3+bf16", "0.5*topk:0.3",
               "none"]
MODES = {"plain": {}, "ef": {"error_feedback": True}, "doublesqueeze": {"error_feedback": True, "server": None}}


def cases_of_every_compressor_and_mode(steps):
    cases = []
    for spec in COMPRESSORS:
        for mode, options in MODES.items():
            case = {"id": f"{spec}/{mode}", "compressor": spec, "steps": steps, **options}
            if "server" in case:
                case["server"] = spec   # DoubleSqueeze: the same compressor on both sides
            cases.append(case)
    return cases


def _cases():
    cases = cases_of_every_compressor_and_mode(STEPS)
    # sharded compresses slice by slice: a fixed k= larger than a slice is refused (tested with bad input)
    cases += [{**c, "id": c["id"] + "/sharded", "transport": "sharded"} for c in cases if "k=" not in c["compressor"]]
    ds = {"compressor": "topk:0.3", "error_feedback": True, "server": "topk:0.5", "steps": STEPS}
    cases += [
        {**ds, "id": "groups=2", "groups": 2},
        {**ds, "id": "backward_passes_per_step=2", "backward_passes_per_step": 2},
        {**ds, "id": "server=natural", "server": "natural"},
        {**ds, "id": "float32", "dtype": "float32"},
        {**ds, "id": "bfloat16", "dtype": "bfloat16"},
        {**ds, "id": "float16", "dtype": "float16"},
        {**ds, "id": "transport=dense", "transport": "dense"},
        {**ds, "id": "transport=allgather/randk:0.3,shared", "compressor": "randk:0.3,shared", "transport": "allgather"},
        # a link slow enough that the larger tensors are compressed and the smallest stay dense
        {**ds, "id": "transport=auto", "transport": "auto", "link_gbps": 1e-4},
        {**ds, "id": "transport=auto/float32", "transport": "auto", "link_gbps": 1e-4, "dtype": "float32"},
        # small tensors dense, the rest compressed; buckets of about 26 elements (several per step)
        {**ds, "id": "dense_below=16", "dense_below": 16},
        {**ds, "id": "bucket_mb=1e-4", "bucket_mb": 1e-4},
        {**ds, "id": "bucket_mb=1e-4/sharded", "bucket_mb": 1e-4, "transport": "sharded"},
        {**ds, "id": "bucket_mb=1e-4/sharded/no server", "bucket_mb": 1e-4, "transport": "sharded", "server": None},
        {**ds, "id": "bucket_mb=1e-4/randk:0.3,shared", "bucket_mb": 1e-4, "compressor": "randk:0.3,shared"},
        # momentum correction: velocity before compression, the sent coordinates masked
        {**ds, "id": "momentum=0.9", "momentum": 0.9},
        {**ds, "id": "momentum=0.9/sharded", "momentum": 0.9, "transport": "sharded"},
        {**ds, "id": "momentum=0.9/dense_below=16", "momentum": 0.9, "dense_below": 16},
        {**ds, "id": "momentum=0.5/randk:0.3/no server", "momentum": 0.5, "compressor": "randk:0.3", "server": None},
        {**ds, "id": "momentum=0.9/topk:0.3+natural", "momentum": 0.9, "compressor": "topk:0.3+natural"},
        # without factor masking: a sent coordinate keeps its velocity
        {**ds, "id": "momentum=0.9/no masking", "momentum": 0.9, "momentum_masking": False},
        {**ds, "id": "momentum=0.9/no masking/sharded/randk", "momentum": 0.9, "momentum_masking": False,
         "compressor": "randk:0.3", "transport": "sharded"},
        {**ds, "id": "momentum=0.9/no masking/onebit", "momentum": 0.9, "momentum_masking": False,
         "compressor": "onebit", "server": "onebit"},   # not a sparsifier: allowed without the masking
        # Nesterov: g + m u compressed in g's place (masked; unmasked with small tensors dense)
        {**ds, "id": "momentum=0.9/nesterov", "momentum": 0.9, "nesterov": True},
        {**ds, "id": "momentum=0.9/nesterov/no masking/dense_below=16", "momentum": 0.9, "nesterov": True,
         "momentum_masking": False, "dense_below": 16},
        # warm-up of the ratio: 0.9 -> 0.3 over 8 of the 20 steps (payload sizes change every step)
        {**ds, "id": "warmup=8", "warmup": [8, 0.9], "momentum": 0.9},
        {**ds, "id": "warmup=8/sharded/randk", "warmup": [8, 0.9], "compressor": "randk:0.3", "transport": "sharded"},
        {**ds, "id": "warmup=8/randk:0.3,shared", "warmup": [8, 0.9], "compressor": "randk:0.3,shared"},
        # 1-bit Adam's warm-up: 8 steps uncompressed, then the compressor
        {**ds, "id": "warmup=8,dense", "warmup": [8, "dense"]},
        {**ds, "id": "warmup=8,dense/sharded/natural", "warmup": [8, "dense"], "compressor": "natural",
         "transport": "sharded"},
        # local gradient clipping to 5 / sqrt(n): gradient norms here are 2-9, so some tensors are clipped
        {**ds, "id": "clip=5/momentum=0.9", "clip": 5.0, "momentum": 0.9},
        {**ds, "id": "clip=5/sharded/dense_below=16", "clip": 5.0, "transport": "sharded", "dense_below": 16},
        {**ds, "id": "clip=5/float16", "clip": 5.0, "dtype": "float16"},
    ]
    return cases


CASES = _cases()
TOLERANCE = {"float64": 1e-9, "float32": 1e-5, "float16": 1e-2, "bfloat16": 1e-1}
LAUNCHERS = {2: "horovodrun", 3: "mpirun"}


def run_worker(n, cases, out, **options):
    """worker.py on n ranks over ``cases`` (launch's options): (n, each rank's saved results)."""
    (out / "cases.json").write_text(json.dumps(cases))
    proc = launch(n, DISTRIBUTED / "worker.py", out / "cases.json", out, **options)
    assert proc.returncode == 0, proc.stdout[-5000:]
    return n, [torch.load(out / f"rank{r}.pt") for r in range(n)]


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"{n}ranks-{LAUNCHERS[n]}")
def distributed_run(request, tmp_path_factory):
    n = request.param
    return run_worker(n, CASES, tmp_path_factory.mktemp(f"run{n}"), launcher=LAUNCHERS[n], timeout=900)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_matches_simulation_and_replicas_identical(distributed_run, case):
    check_against_simulation(*distributed_run, case)


def check_against_simulation(n, ranks, case):
    reference = train_reference(case, n, case["steps"])
    tol = TOLERANCE[case.get("dtype", "float64")]
    for name, expected in reference.items():
        for r in range(1, n):
            assert torch.equal(ranks[r][case["id"]][name], ranks[0][case["id"]][name]), f"rank {r} differs: {name}"
        got = ranks[0][case["id"]][name]
        assert got.dtype == expected.dtype
        err = (got.double() - expected.double()).abs().max().item()
        assert err <= tol * max(1.0, expected.double().abs().max().item()), f"{name}: off by {err}"
    stats = ranks[0][case["id"]]["_stats"]
    assert stats["steps"] == case["steps"]
    # auto mixes on several ranks: dense for the smallest tensors, compressed for the rest (the GPU check's
    # one-rank run prices no exchange: allgather for all)
    if case.get("transport") == "auto" and n > 1:
        assert {"dense", "sharded"} <= set(stats["transports"].values()), stats["transports"]
    assert 0 < stats["bytes_sent"] and stats["dense_bytes"] == 4 * sum(t.numel() for t in reference.values())
    compressed = sorted(name for name, how in stats["transports"].items() if how != "dense")
    assert sorted(name for bucket in stats["buckets"] for name in bucket) == compressed
    if case.get("bucket_mb") == 1e-4:   # 104 bytes: [extra.weight, fc2.bias], [fc2.weight, fc1.bias], [fc1.weight]
        assert len(stats["buckets"]) == 3
    elif compressed:
        assert len(stats["buckets"]) == 1
    if case.get("dense_below"):
        assert compressed == ["extra.weight", "fc1.weight"] and stats["dense_small_bytes"] > 0
    if case.get("warmup"):   # the warm-up is over: the ratio in force is the compressor's own
        assert stats["worker_ratio"] == (None if case["compressor"] == "natural" else 0.3)
        assert stats["server_ratio"] == 0.5   # the server's own (topk:0.5), which warmed up alike


def _node_cases():
    """transport="hierarchical" on 2 nodes x 2 ranks: every compressor with DoubleSqueeze, Top-k with error
    feedback, sign plain (every compressor x mode with HVD_COMPRESS_NODE_MATRIX=all), and the options around
    it. 6 steps: 4 ranks share this machine's 2 cores, and each step runs 5 collectives on 3 process sets."""
    node, steps = {"transport": "hierarchical", "local_size": 2}, 6
    every = os.environ.get("HVD_COMPRESS_NODE_MATRIX") == "all"
    cases = [{**c, **node, "id": c["id"] + "/hierarchical"} for c in cases_of_every_compressor_and_mode(steps)
             if "k=" not in c["compressor"] and (every or "server" in c or c["id"] in ("topk:0.3/ef", "sign/plain"))]
    ds = {"compressor": "topk:0.3", "error_feedback": True, "server": "topk:0.5", "steps": steps, **node}
    return cases + [
        {**ds, "id": "hierarchical/dense_below=16", "dense_below": 16},
        {**ds, "id": "hierarchical/bucket_mb=1e-4", "bucket_mb": 1e-4},
        {**ds, "id": "hierarchical/float32", "dtype": "float32"},
        {**ds, "id": "hierarchical/warmup=3/randk", "warmup": [3, 0.9], "compressor": "randk:0.3"},
        {**ds, "id": "hierarchical/clip=5", "clip": 5.0},
        {**ds, "id": "hierarchical/momentum=0.9/no masking", "momentum": 0.9, "momentum_masking": False},
        {**ds, "id": "hierarchical/node average by Horovod", "env": {"HVD_COMPRESS_NODE_MEMORY": "0"}},
        # rank 1 cannot make the segment: node 0 falls back to Horovod's allreduce, node 1 keeps shared memory
        {**ds, "id": "hierarchical/node 0 cannot share memory", "node_rows": {0: False, 2: True},
         "env_on_rank": {"1": {"HVD_COMPRESS_NODE_MEMORY_DIR": "/nonexistent"}}},
        {**ds, "id": "hierarchical/state_dict at 3, resumed", "resume_at": 3},
        {**ds, "id": "hierarchical/state_dict at 3, resumed, randk no server", "resume_at": 3,
         "compressor": "randk:0.3", "server": None},
    ]


NODE_CASES = _node_cases()
TWO_NODES = "localhost:2,127.0.0.1:2"   # two "nodes" of 2 ranks on this machine (Horovod's local ranks)


@pytest.fixture(scope="module")
def two_nodes_run(tmp_path_factory):
    return run_worker(4, NODE_CASES, tmp_path_factory.mktemp("nodes"), hosts=TWO_NODES, timeout=900,
                      env={"HOROVOD_DYNAMIC_PROCESS_SETS": "1"})


@pytest.mark.parametrize("case", NODE_CASES, ids=[c["id"] for c in NODE_CASES])
def test_hierarchical_on_two_nodes_matches_simulation(two_nodes_run, case):
    check_against_simulation(*two_nodes_run, case)
    result = two_nodes_run[1][0][case["id"]]
    assert set(result["_stats"]["transports"].values()) <= {"hierarchical", "dense"}
    # CPU tensors: each node averages in shared memory unless told not to or it cannot (then Horovod's allreduce)
    for rank, shared in case.get("node_rows", {0: case.get("env") is None}).items():
        assert two_nodes_run[1][rank][case["id"]]["_node_rows"] == [shared] * len(result["_stats"]["buckets"])


# 3 ranks per node: the node's average sums three rows, in local-rank order in shared memory as in the simulation
THREE_PER_NODE = [{**c, "local_size": 3, "id": c["id"] + "/3 per node"} for c in NODE_CASES
                  if c["id"] in ("topk:0.3/doublesqueeze/hierarchical", "randk:0.3,shared/doublesqueeze/hierarchical",
                                 "sign/plain/hierarchical", "hierarchical/float32")]


@pytest.fixture(scope="module")
def three_per_node_run(tmp_path_factory):
    return run_worker(6, THREE_PER_NODE, tmp_path_factory.mktemp("nodes3"), hosts="localhost:3,127.0.0.1:3",
                      timeout=900, env={"HOROVOD_DYNAMIC_PROCESS_SETS": "1"})


@pytest.mark.parametrize("case", THREE_PER_NODE, ids=[c["id"] for c in THREE_PER_NODE])
def test_hierarchical_with_three_ranks_per_node_matches_simulation(three_per_node_run, case):
    check_against_simulation(*three_per_node_run, case)
    assert three_per_node_run[1][0][case["id"]]["_node_rows"] == [True] * len(three_per_node_run[1][0][case["id"]][
        "_stats"]["buckets"])


STAGED_IDS = ["topk:0.3/doublesqueeze", "randk:0.3,shared/doublesqueeze", "sign/ef/sharded",
              "natural/doublesqueeze/sharded", "transport=auto", "dense_below=16", "momentum=0.9/dense_below=16",
              "bucket_mb=1e-4/sharded"]


def test_host_staging_matches_simulation(tmp_path):
    """``HVD_COMPRESS_HOST_STAGING=1`` (the GPU path where NCCL cannot run: the kernels on the device, every
    collective, step marker and dense tensor on a host copy) on CPU tensors: the same staged code path, one
    copy each way; allgather, allreduce, alltoall, broadcast and Horovod's dense average all pass through it."""
    cases = [c for c in CASES if c["id"] in STAGED_IDS]
    assert len(cases) == len(STAGED_IDS)
    ranks = run_worker(2, cases, tmp_path, env={"HVD_COMPRESS_HOST_STAGING": "1"})
    for case in cases:
        check_against_simulation(*ranks, case)


def test_counterexample_top1_diverges_and_error_feedback_converges():
    """The first seed: n = d = 3, Top-1: x_k = (1 + 11 eta / 6)^k x_0; with error feedback x_k -> 0."""
    proc = launch(3, DISTRIBUTED / "counterexample.py", 30, 300, 0.05, 0.1, launcher="mpirun")
    assert proc.returncode == 0, proc.stdout[-5000:]
    for eta, r in result_line(proc).items():
        assert r["expected_growth"] == pytest.approx(1 + 11 * float(eta) / 6, rel=1e-15)
        for step in r["growth"]:
            assert step == pytest.approx([r["expected_growth"]] * 3, rel=1e-12)
        assert r["ef_norms"][-1] < 1e-6 * r["ef_norms"][0]


def test_checkpoint_at_10_resumes_equal_to_uninterrupted_20(tmp_path):
    cases = [{"id": "topk-ds", "compressor": "topk:0.3", "error_feedback": True, "server": "topk:0.5"},
             {"id": "randk-ef-qsgd-server", "compressor": "randk:0.3", "error_feedback": True, "server": "qsgd:4"},
             {"id": "natural-ef", "compressor": "natural", "error_feedback": True},
             {"id": "topk-ds-sharded", "compressor": "topk:0.3", "error_feedback": True, "server": "topk:0.5",
              "transport": "sharded"},
             {"id": "sign-ds-auto", "compressor": "sign", "error_feedback": True, "server": "sign",
              "transport": "auto", "link_gbps": 1e-4}]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    proc = launch(2, DISTRIBUTED / "checkpoint.py", tmp_path / "cases.json", tmp_path / "ckpt.pt")
    assert proc.returncode == 0, proc.stdout[-5000:]
    report = result_line(proc)
    assert sorted(report) == sorted(f"{c['id']} ({form})" for c in cases for form in ("one file", "per rank"))
    for case_id, r in report.items():
        assert r == {"parameters_equal": True, "error_buffers_equal": True, "nonzero_buffers": True}, case_id


RESIZE_CASES = [{"id": "topk-ds", "compressor": "topk:0.3", "error_feedback": True, "server": "topk:0.5"},
                {"id": "topk-ds-sharded", "compressor": "topk:0.3", "error_feedback": True, "server": "topk:0.5",
                 "transport": "sharded"}]


@pytest.mark.parametrize("saved_by, loaded_by", [(3, 2), (2, 3)])
def test_per_rank_checkpoint_loads_into_another_number_of_ranks(tmp_path, saved_by, loaded_by):
    """save_per_rank on n ranks, load_per_rank on m: worker buffers folded by the documented rule (new rank j:
    m/n * sum of old ranks i = j mod m), the server buffer kept on the root or its slices cut again, the step
    kept; training goes on with identical replicas."""
    (tmp_path / "cases.json").write_text(json.dumps(RESIZE_CASES))
    launcher = {2: "horovodrun", 3: "mpirun"}
    for mode, n in (("save", saved_by), ("load", loaded_by)):
        proc = launch(n, DISTRIBUTED / "resize.py", mode, tmp_path, tmp_path / "cases.json", launcher=launcher[n])
        assert proc.returncode == 0, proc.stdout[-5000:]
    report = result_line(proc)
    n, m = saved_by, loaded_by
    for case in RESIZE_CASES:
        folder = tmp_path / case["id"]
        assert report[case["id"]] == {"identical": True, "finite": True, "steps": 10}
        saved = [torch.load(folder / f"rank{i}.pt") for i in range(n)]
        loaded = [torch.load(folder / f"loaded{j}.pt") for j in range(m)]
        assert all(part["step"] == 6 for part in loaded)
        for j in range(m):
            folded = [s["worker_error"] for i, s in enumerate(saved) if i % m == j]
            assert sorted(loaded[j]["worker_error"]) == (sorted(folded[0]) if folded else [])
            for name, e in loaded[j]["worker_error"].items():
                torch.testing.assert_close(e, m / n * sum(f[name] for f in folded), rtol=1e-12, atol=0)
        names = sorted(saved[0]["server_error"])
        assert names == ["extra.weight", "fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
        for name in names:
            if case.get("transport") == "sharded":   # the slices, cut again
                before = torch.cat([s["server_error"][name] for s in saved])
                after = torch.cat([part["server_error"][name] for part in loaded])
            else:                                    # the root's whole buffer, on the root only
                before, after = saved[0]["server_error"][name], loaded[0]["server_error"][name]
                assert all(name not in part["server_error"] for part in loaded[1:])
            assert torch.equal(before, after), (case["id"], name)


BAD_SETUPS = [
    ("mismatch", "ValueError", "configured differently on different ranks"),
    ("nan", "FloatingPointError", "not finite (NaN or Inf) for parameter(s) ['fc2.weight']"),
    ("nan_dense", "FloatingPointError", "not finite (NaN or Inf) for parameter(s) ['fc2.bias'] (dense, averaged"),
    ("op_sum", "RuntimeError", "use op=hvd.Average"),
    ("k_too_big", "ValueError", "parameter 'fc2.bias': TopK(ratio=None, k=10): k=10 is larger"),
    ("momentum_twice", "ValueError", "give the optimizer momentum=0"),
    ("momentum_adam", "ValueError", "an Adam-like optimizer keeps a first moment too: use hc.MomentumCorrectedAdamW"),
    ("corrected_adam_alone", "ValueError", "hc.MomentumCorrectedAdamW needs Compression(momentum=0.9, "
     "momentum_masking=False, warmup=(3, 'dense')) (its beta1 and freeze_after); got momentum=0.0"),
    ("root_rank", "ValueError", "root_rank=2 is not a rank of the process set (ranks 0..1, counted within it)"),
    ("nan_sharded", "FloatingPointError", "not finite (NaN or Inf) for parameter(s) ['fc2.weight']"),
    ("k_too_big_sharded", "ValueError",
     "parameter 'fc2.bias' (one of its 2 slices, transport 'sharded'): TopK(ratio=None, k=2): k=2 is larger"),
    ("nodynamic_hierarchical", "ValueError", "start Horovod with hvd.init(process_sets='dynamic')"),
]
# transport="hierarchical" on one node of the 2 ranks, with Horovod's dynamic process sets (a launch of its own)
BAD_HIERARCHICAL = [
    ("nan_hierarchical", "FloatingPointError", "not finite (NaN or Inf) for parameter(s) ['fc2.weight']"),
    ("k_too_big_hierarchical", "ValueError",
     "parameter 'fc2.bias' (one of its 2 slices, transport 'hierarchical'): TopK(ratio=None, k=2): k=2 is larger"),
]


def _bad_run(scenarios, **options):
    """Every scenario, one after the other in the same 2 processes (each also checks that the error before
    it left Horovod and hvd_compress usable): the output lines."""
    proc = launch(2, DISTRIBUTED / "bad_input.py", ",".join(s for s, _, _ in scenarios), timeout=600, **options)
    assert proc.returncode == 0, proc.stdout[-5000:]
    return proc.stdout.splitlines()


@pytest.fixture(scope="module")
def bad_setups_run():
    return _bad_run(BAD_SETUPS)


@pytest.fixture(scope="module")
def bad_hierarchical_run():
    return _bad_run(BAD_HIERARCHICAL, env={"HOROVOD_DYNAMIC_PROCESS_SETS": "1"})


@pytest.mark.parametrize("scenario, error, words", BAD_SETUPS)
def test_bad_setup_fails_clearly_on_every_rank(bad_setups_run, scenario, error, words):
    check_bad_setup(bad_setups_run, scenario, error, words)


@pytest.mark.parametrize("scenario, error, words", BAD_HIERARCHICAL)
def test_bad_hierarchical_setup_fails_clearly_on_every_rank(bad_hierarchical_run, scenario, error, words):
    check_bad_setup(bad_hierarchical_run, scenario, error, words)


def check_bad_setup(output, scenario, error, words):
    lines = [line.split(f"{scenario} ", 1)[1] for line in output if f">:{scenario} " in line]
    caught = [line for line in lines if line.startswith("CAUGHT")]
    assert len(caught) == 2, lines
    for line in caught:
        assert f"CAUGHT {error}: " in line and words in line, line
    if scenario.startswith("nan"):
        assert lines.count("BUFFERS_UNCHANGED True") == 2, lines
        # the error left everything usable: 3 more steps train (steps 0-2 before, 3 dropped, 3 after)
        assert lines.count("TRAINED_ON 6 True") == 2, lines
    else:   # the cause persists: the same clear error again, nothing left behind by the first one
        again = [line for line in lines if line.startswith("AGAIN")]
        assert len(again) == 2 and all(f"AGAIN {error}: " in line and words in line for line in again), lines


def test_mixed_precision_overflows_skip_the_step_like_dense_horovod():
    """GradScaler with overflows forced on either rank: every rank skips the same steps, the loss scale
    history equals stock Horovod's dense run, replicas stay identical and training goes on."""
    steps = 12
    proc = launch(2, DISTRIBUTED / "amp.py", steps, timeout=300)
    assert proc.returncode == 0, proc.stdout[-5000:]
    runs = result_line(proc)
    dense = runs["dense"]["scales"]
    assert len(dense) == steps and min(dense) < dense[0] < max(dense)   # halved on overflow, grown after
    for kind in ("ef", "ds", "ds-small-dense"):   # the last: 2 of the overflows only in a dense tensor
        r = runs[kind]
        assert r["scales"] == dense, kind
        assert r["identical"] and r["finite"], kind
        assert r["skipped"] == 4 and r["steps"] == steps - 4, kind


PROCESS_SET_CASES = [
    {"id": "allgather/DoubleSqueeze", "compressor": "topk:0.3", "error_feedback": True, "server": "topk:0.5"},
    {"id": "allgather/DoubleSqueeze, process_set given", "compressor": "topk:0.3", "error_feedback": True,
     "server": "topk:0.5", "explicit": True},
    {"id": "sharded", "compressor": "topk:0.3", "error_feedback": True, "server": "topk:0.5", "transport": "sharded"},
    {"id": "allreduce", "compressor": "randk:0.3,shared", "error_feedback": True, "server": "natural"},
    {"id": "auto", "compressor": "sign", "error_feedback": True, "server": "sign", "transport": "auto",
     "link_gbps": 1e-4},
    {"id": "auto, link measured", "compressor": "sign", "error_feedback": True, "transport": "auto"},
]


def test_process_set_of_2_of_3_ranks_equals_the_simulation_of_2(tmp_path):
    """hvd.DistributedOptimizer(process_set=) on ranks 1 and 2 of 3: every collective of the Compression
    runs on that set (rank 0 takes no part: a collective on all ranks would hang), the server pass runs on
    the set's first rank, the result equals the 2-rank simulation, and a Compression given another process
    set than its optimizer's is refused."""
    cases = [{**c, "steps": 6} for c in PROCESS_SET_CASES]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    proc = launch(3, DISTRIBUTED / "process_set.py", tmp_path / "cases.json", tmp_path, launcher="mpirun",
                  timeout=300)
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert "the optimizer's process set has ranks [1, 2]" in result_line(proc)["refused"]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (1, 2)]
    for case in cases:
        got = ranks[0][case["id"]]
        assert got["_state"]["size"] == 2 and got["_state"]["step"] == case["steps"], case["id"]
        for name in got:
            if name != "_state":
                assert torch.equal(got[name], ranks[1][case["id"]][name]), (case["id"], name)
        if "link_gbps" in case or case.get("transport") != "auto":   # a measured link: choices not reproducible
            for name, expected in train_reference(case, 2, case["steps"]).items():
                assert (got[name] - expected).abs().max().item() <= 1e-9, (case["id"], name)


@pytest.mark.parametrize("scenario, steps_per_compression", [("gan", [10, 10]), ("sparse", [10])])
def test_real_training_loops(scenario, steps_per_compression):
    """Two models trained alternately (a GAN), and a sparse embedding beside compressed dense layers: they
    train, and the replicas stay bit-identical."""
    proc = launch(2, DISTRIBUTED / "real_loops.py", scenario, 10, timeout=300)
    assert proc.returncode == 0, proc.stdout[-5000:]
    r = result_line(proc)
    assert r["identical"] and r["finite"] and r["steps"] == steps_per_compression, r


def test_stale_node_segments_are_removed(tmp_path):
    """A node segment whose maker (its process id in the name) is gone is removed when the next one is made; a
    live maker's, and names not ours, stay."""
    from hvd_compress.torch import node_memory
    gone = subprocess.Popen(["true"])
    gone.wait()                                              # a process id that no longer runs
    files = {"stale": f"hvdc-{gone.pid:010d}-0123456789abcdef", "live": f"hvdc-{os.getpid():010d}-0123456789abcdef",
             "old form": "hvdc-0123456789abcdef", "other": "something-else"}
    for name in files.values():
        (tmp_path / name).write_bytes(b"x")
    node_memory.remove_stale(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(v for k, v in files.items() if k != "stale")
