"""Benchmark `kernels`: compress + decompress throughput of every compressor (PyTorch and TensorFlow kernels) on
fp32 tensors of 10^4 ... 2.5·10^7 elements, against a memcpy of the same tensor (the memory-bandwidth limit)
and against a dense fp32 Horovod allreduce of that tensor on 2 ranks.

What is timed, per compressor and size, is one payload's way through the pipeline, as the plug-ins call the
kernels: "encode" = encode + pack (the bytes that travel; summable payloads travel unpacked) and "decode" =
unpack + decode of those bytes, single process. PyTorch calls the functions of hvd_compress/torch/kernels.py
directly; TensorFlow runs them inside a ``tf.function`` (as Horovod's TF path traces them), traced before
timing. Throughput = 4 d bytes (the fp32 input) / (encode + decode time).

Everything runs on one CPU core: ``torch.set_num_threads(1)`` and TensorFlow's intra/inter-op pools of 1,
for the kernels and the memcpy alike, because that is what each rank of a training job gets here (the
launchers set OMP_NUM_THREADS=1, one rank per core), and a ratio of two timings means something only when
both ran on the same resources. The memcpy is ``dst.copy_(x)`` into a preallocated tensor (the bandwidth
limit); ``x.clone()`` (allocation + page faults + copy, what a kernel's fresh output costs) is reported beside
it. Timings are medians of several repeats, interleaved (every repeat times memcpy and every kernel in turn,
in a rotating order) so that the load of other jobs on the machine hits all of them alike. The dense
allreduce runs in a 2-rank Gloo job of the same benchmark run (kernels_worker.py), before the kernels.
"""
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from hvd_compress import compressors as C

from experiments.common import ROOT, progress, relpath, save

WORKER = Path(__file__).with_name("kernels_worker.py")
BIN = Path(sys.executable).parent
CONFIG = {
    True: {"sizes": [10 ** 4, 10 ** 5, 10 ** 6],
           "compressors": ["topk:0.01", "randk:0.01", "natural", "sign"],
           "repeats": {10 ** 4: 7, 10 ** 5: 7, 10 ** 6: 5}},
    False: {"sizes": [10 ** 4, 10 ** 5, 10 ** 6, 10 ** 7, 25 * 10 ** 6],
            "compressors": ["topk:0.01", "randk:0.01", "randk:0.01,shared", "natural", "natural:det", "sign",
                            "onebit", "qsgd:16", "topk:0.01+natural"],
            "repeats": {10 ** 4: 11, 10 ** 5: 11, 10 ** 6: 7, 10 ** 7: 5, 25 * 10 ** 6: 5}},
}
FRAMEWORKS = ["torch", "tf"]
SEED = (123456789, 7)     # a (key, step) pair, as the pipeline passes
# The targets, at the largest size: memory-bound compressors reach >= 0.5x memcpy bandwidth, i.e.
# their time is <= 2x memcpy's; TopK is "no slower than 2x that", i.e. its time is <= 2 x (2x memcpy) = 4x
# memcpy's, a fraction of memcpy bandwidth >= 0.25.
MEMORY_BOUND = ["sign", "natural", "natural:det", "randk:0.01", "randk:0.01,shared"]
MEMORY_BOUND_TARGET = 0.5
TOPK = ["topk:0.01"]
TOPK_TARGET = MEMORY_BOUND_TARGET / 2


# ---- the pipelines ------------------------------------------------------------------------------------------

def torch_pipeline(c, d):
    from hvd_compress.torch import kernels as K
    if c.summable:   # the values travel as they are (allreduce), nothing to pack
        return (lambda x: K.encode(c, x, SEED)[0]), (lambda v: K.decode(c, [v], d, SEED, torch.float32))
    return (lambda x: K.pack(K.encode(c, x, SEED)),
            lambda data: K.decode(c, K.unpack(c, data, d, torch.float32), d, SEED, torch.float32))


def tf_pipeline(c, d):
    import tensorflow as tf
    from hvd_compress.tensorflow import kernels as K
    x_spec = tf.TensorSpec([d], tf.float32)
    if c.summable:
        v_spec = tf.TensorSpec([c.wire_bytes(d) // 4], tf.float32)
        return (tf.function(lambda x: K.encode(c, x, SEED)[0], input_signature=[x_spec]),
                tf.function(lambda v: K.decode(c, [v], d, SEED, tf.float32), input_signature=[v_spec]))
    data_spec = tf.TensorSpec([c.wire_bytes(d)], tf.uint8)
    return (tf.function(lambda x: K.pack(K.encode(c, x, SEED)), input_signature=[x_spec]),
            tf.function(lambda data: K.decode(c, K.unpack(c, data, d, tf.float32), d, SEED, tf.float32),
                        input_signature=[data_spec]))


def timed(fn, arg):
    """(wall seconds, CPU seconds of this process, fn(arg)). The CPU time leaves out the time other jobs on
    the machine held the core: a cross-check of the wall-clock medians on a loaded machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(arg)
    return time.perf_counter() - wall, time.process_time() - cpu, out


# ---- measuring ------------------------------------------------------------------------------------------------

def measure_size(d, compressors, repeats, tf):
    """Median times at one size: memcpy, clone, and (encode, decode, total) per framework x compressor."""
    x = torch.randn(d, generator=torch.Generator().manual_seed(d))
    inputs = {"torch": x, "tf": tf.constant(x.numpy())}
    dst = torch.empty_like(x)
    dst.copy_(x)   # touch its pages once: the copy below measures bandwidth, not page faults
    kernels = {}
    for spec in compressors:
        c = C.parse(spec)
        for fw, make in (("torch", torch_pipeline), ("tf", tf_pipeline)):
            enc, dec = make(c, d)
            payload = enc(inputs[fw])           # warm-up (and the TF trace)
            dec(payload)
            kernels[(fw, spec)] = (enc, dec, payload)
    times = {"memcpy": [], "clone": [], **{key: [] for key in kernels}}
    keys = list(kernels)
    for r in range(repeats):
        times["memcpy"].append(timed(dst.copy_, x)[:2])
        times["clone"].append(timed(torch.clone, x)[:2])
        shift = (r * 3) % len(keys)             # rotate the order: no kernel always runs right after another
        for key in keys[shift:] + keys[:shift]:
            enc, dec, _ = kernels[key]
            w_enc, c_enc, payload = timed(enc, inputs[key[0]])
            w_dec, c_dec, out = timed(dec, payload)
            times[key].append((w_enc, w_dec, c_enc + c_dec))
            del payload, out
        times["memcpy"].append(timed(dst.copy_, x)[:2])
    med = statistics.median
    result = {"memcpy_s": med(t[0] for t in times["memcpy"]), "memcpy_cpu_s": med(t[1] for t in times["memcpy"]),
              "clone_s": med(t[0] for t in times["clone"]), "repeats": repeats, "kernels": {}}
    for (fw, spec) in keys:
        t = times[(fw, spec)]
        result["kernels"][f"{fw} {spec}"] = {
            "framework": fw, "compressor": spec, "encode_s": med(p[0] for p in t), "decode_s": med(p[1] for p in t),
            "total_s": med(p[0] + p[1] for p in t), "total_min_s": min(p[0] + p[1] for p in t),
            "total_cpu_s": med(p[2] for p in t)}
    return result


def allreduce_times(sizes, repeats, tmp):
    """Dense fp32 hvd.allreduce of each size on 2 ranks (a Gloo job)."""
    out = Path(tmp) / "allreduce.json"
    cmd = [str(BIN / "horovodrun"), "-np", "2", "--gloo", sys.executable, str(WORKER), str(out), str(repeats),
           *map(str, sizes)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=1200)
    if proc.returncode != 0 or not out.exists():
        raise SystemExit(f"the 2-rank allreduce job failed (exit {proc.returncode}):\n{proc.stdout[-5000:]}")
    return {int(d): v for d, v in json.loads(out.read_text()).items()}


# ---- reporting --------------------------------------------------------------------------------------------------

def rows_of(results, allreduce):
    rows = []
    for d, res in results.items():
        for name, k in res["kernels"].items():
            rows.append({"d": d, **k, "encode_s_per_element": k["encode_s"] / d,
                         "decode_s_per_element": k["decode_s"] / d, "throughput_gbps": 4 * d / k["total_s"] / 1e9,
                         "fraction_of_memcpy": res["memcpy_s"] / k["total_s"],
                         "fraction_of_clone": res["clone_s"] / k["total_s"],
                         "fraction_of_memcpy_cpu": res["memcpy_cpu_s"] / max(k["total_cpu_s"], 1e-9),
                         "vs_allreduce": k["total_s"] / allreduce[d]["allreduce_s"]})
    return rows


def table(results, rows, allreduce):
    lines = []
    for d, res in results.items():
        lines.append(f"d = {d:,}: memcpy {res['memcpy_s'] * 1e3:.3f} ms ({4 * d / res['memcpy_s'] / 1e9:.2f} GB/s), "
                     f"clone {res['clone_s'] * 1e3:.3f} ms, dense allreduce on 2 ranks "
                     f"{allreduce[d]['allreduce_s'] * 1e3:.3f} ms")
        lines.append(f"  {'compressor':20s} {'fw':5s} {'encode ms':>10s} {'decode ms':>10s} {'total ms':>10s} "
                     f"{'GB/s':>7s} {'x memcpy bw':>11s} {'(cpu time)':>10s} {'/ allreduce':>11s}")
        for r in rows:
            if r["d"] == d:
                lines.append(f"  {r['compressor']:20s} {r['framework']:5s} {r['encode_s'] * 1e3:10.3f} "
                             f"{r['decode_s'] * 1e3:10.3f} {r['total_s'] * 1e3:10.3f} {r['throughput_gbps']:7.3f} "
                             f"{r['fraction_of_memcpy']:11.3f} {r['fraction_of_memcpy_cpu']:10.3f} "
                             f"{r['vs_allreduce']:11.3f}")
    return "\n".join(lines)


def plot(results, rows, allreduce, compressors, path):
    sizes = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    colors = plt.get_cmap("tab10")
    for ax, fw, title in zip(axes, FRAMEWORKS, ["PyTorch kernels", "TensorFlow kernels (tf.function)"]):
        ax.plot(sizes, [4 * d / results[d]["memcpy_s"] / 1e9 for d in sizes], "k-", lw=2.5, label="memcpy (copy_)")
        ax.plot(sizes, [4 * d / results[d]["clone_s"] / 1e9 for d in sizes], "k:", lw=1.5, label="clone")
        ax.plot(sizes, [4 * d / allreduce[d]["allreduce_s"] / 1e9 for d in sizes], "--", color="grey", lw=2,
                label="dense allreduce, 2 ranks")
        for i, spec in enumerate(compressors):
            ys = [next(r["throughput_gbps"] for r in rows if r["d"] == d and r["framework"] == fw
                       and r["compressor"] == spec) for d in sizes]
            ax.plot(sizes, ys, "o-", color=colors(i), ms=4, label=spec)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("fp32 elements d")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("GB/s of fp32 input (4d bytes / time)")
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("compress + decompress throughput, one CPU core (encode+pack, unpack+decode)")
    return save(fig, path)


def targets_of(rows, d):
    """The issue's targets at size d, per framework (met: every compressor of the group reaches it)."""
    out = {}
    for fw in FRAMEWORKS:
        for label, specs, target in (("memory-bound >= 0.5x memcpy bandwidth", MEMORY_BOUND, MEMORY_BOUND_TARGET),
                                     ("TopK time <= 2x the memory-bound target time (>= 0.25x memcpy bandwidth)",
                                      TOPK, TOPK_TARGET)):
            mine = [r for r in rows if r["d"] == d and r["framework"] == fw and r["compressor"] in specs]
            measured = {r["compressor"]: r["fraction_of_memcpy"] for r in mine}
            if measured:
                # also against clone (allocation + page faults + copy: what a kernel's fresh output costs)
                vs_clone = {r["compressor"]: r["fraction_of_clone"] for r in mine}
                out[f"{fw}: {label}"] = {"d": d, "target_fraction_of_memcpy": target, "measured": measured,
                                         "met": {s: f >= target for s, f in measured.items()},
                                         "all_met": all(f >= target for f in measured.values()),
                                         "measured_vs_clone": vs_clone,
                                         "met_vs_clone": {s: f >= target for s, f in vs_clone.items()}}
    return out


def run(out, quick):
    cfg = CONFIG[quick]
    torch.set_num_threads(1)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")   # TF's start-up banner and CUDA probing
    import tensorflow as tf   # its thread pools must be set before it runs anything
    tf.get_logger().setLevel("ERROR")   # every pipeline is a new tf.function: "retracing" warnings are expected
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        print("kernels: dense allreduce on 2 ranks ...", flush=True)
        allreduce = allreduce_times(cfg["sizes"], max(cfg["repeats"].values()), tmp)
    results = {}
    for d in progress(cfg["sizes"], quick, desc="kernels: sizes"):
        if not quick:
            print(f"kernels: d = {d:,} ...", flush=True)
        results[d] = measure_size(d, cfg["compressors"], cfg["repeats"][d], tf)
    rows = rows_of(results, allreduce)
    print(table(results, rows, allreduce))
    figure = plot(results, rows, allreduce, cfg["compressors"], out / "kernels.png")
    largest = max(cfg["sizes"])
    targets = targets_of(rows, largest)
    for label, t in targets.items():
        shown = ", ".join(f"{s} {f:.3f} (vs clone {t['measured_vs_clone'][s]:.3f})"
                          for s, f in t["measured"].items())
        print(f"  target at d={largest:,} {label}: {'met' if t['all_met'] else 'NOT met'} ({shown})")
    every = [(fw, s, d) for fw in FRAMEWORKS for s in cfg["compressors"] for d in cfg["sizes"]]
    checks = {
        "a finite positive throughput for every framework x compressor x size": len(rows) == len(every) and all(
            math.isfinite(r["throughput_gbps"]) and r["throughput_gbps"] > 0 for r in rows),
        "finite positive memcpy and allreduce times at every size": all(
            0 < results[d]["memcpy_s"] < math.inf and 0 < allreduce[d]["allreduce_s"] < math.inf
            for d in cfg["sizes"]),
    }
    summary = {
        "setup": {"sizes": cfg["sizes"], "compressors": cfg["compressors"], "frameworks": FRAMEWORKS,
                  "repeats": cfg["repeats"], "threads": {"torch": torch.get_num_threads(),
                                                         "tf_intra_op": 1, "tf_inter_op": 1},
                  "timed": "encode+pack (encode_s) and unpack+decode (decode_s); total_s = median of their sum",
                  "memcpy": "dst.copy_(x), dst preallocated and touched; clone_s: x.clone()",
                  "allreduce": "hvd.allreduce (Average, fp32) on 2 ranks, horovodrun --gloo, the slower rank",
                  "cpu": _cpu_name(), "commit": _commit(), "loadavg_before": load_before,
                  "loadavg_after": os.getloadavg(),
                  "torch": torch.__version__, "tensorflow": tf.__version__},
        "memcpy": {d: {"memcpy_s": r["memcpy_s"], "memcpy_cpu_s": r["memcpy_cpu_s"], "clone_s": r["clone_s"],
                       "memcpy_gbps": 4 * d / r["memcpy_s"] / 1e9} for d, r in results.items()},
        "allreduce": allreduce, "rows": rows, "targets": targets,
        "figures": {"throughput": relpath(figure)}, "checks": checks,
    }
    return summary, all(checks.values())


def _commit():
    """The commit measured (+ "-dirty" when hvd_compress/ has uncommitted changes)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "hvd_compress"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def _cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"
