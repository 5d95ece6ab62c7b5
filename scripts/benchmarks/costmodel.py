"""Benchmark `model`: the cost model of ``hvd_compress.transport``, fitted to the measurements, projected.

    python -m scripts.bench model [--quick]

Reads what the other benchmarks measured (results/bench/steps.json, and kernels.json when present) and
writes results/bench/model.json and model.png. Nothing is timed here: the fit and the projection are
arithmetic, so --quick differs only in where it writes.

The model of one training step with n ranks over a link (bandwidth B, latency a per message):

    step = compute + sum over gradient tensors of the transport's cost (hvd_compress.transport.step_seconds:
           messages * a + bytes sent per rank / B + encode/decode time of the kernels)
    dense (Horovod's own, fused):  compute + 2 (n - 1) a + 2 (n - 1) / n * itemsize * P / B

Fitted, not assumed:
  - B per tc rate: the steps benchmark's dense probe (one model-sized ring allreduce): B = ring bytes / time;
  - kernel seconds per element (encode, decode) per compressor: the kernels benchmark's torch rows at its
    largest size (transport.py's defaults where a compressor was not measured); the fixed cost per tensor
    from its smallest size;
  - compute: the steps benchmark's compute-only step.
The measured points ran n ranks on this machine's cores: kernel times are multiplied by n / cores there
(ranks share cores). The projection to 8 ... 1024 ranks assumes one rank per device (no sharing), the
same per-rank compute, and the 25M-parameter model of the steps benchmark.
"""
import json
import math
import os

import matplotlib.pyplot as plt

from hvd_compress import compressors as C
from hvd_compress import transport as T

from ..experiments.common import ROOT, relpath, save

from .steps import CONFIGS, PLANS

PROJECT_N = [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
# what the projection draws (name -> configuration as in steps.CONFIGS), beside dense
PROJECTED = {
    "Top-k 1% + EF (allgather)": {"spec": "topk:0.01", "error_feedback": True},
    "DoubleSqueeze Top-k 1% (root)": {"spec": "topk:0.01", "error_feedback": True, "server": "topk:0.01"},
    "DoubleSqueeze Top-k 1% (sharded)": {"spec": "topk:0.01", "error_feedback": True, "server": "topk:0.01",
                                         "transport": "sharded"},
    "Top-k 1% + EF (sharded)": {"spec": "topk:0.01", "error_feedback": True, "transport": "sharded"},
    "shared Rand-k 1% (allreduce)": {"spec": "randk:0.01,shared"},
    "Top-k 1% + EF (auto)": {"spec": "topk:0.01", "error_feedback": True, "transport": "auto"},
}


def fit_kernels(kernels):
    """(table, call_seconds) from the kernels benchmark's torch rows; transport.py's defaults otherwise."""
    table, call = dict(T.KERNEL_SECONDS_PER_ELEMENT), T.KERNEL_CALL_SECONDS
    if not kernels:
        return table, call, "transport.py defaults (no kernels.json)"
    rows = [r for r in kernels["rows"] if r["framework"] == "torch" and "+" not in r["compressor"]]
    largest, smallest = max(r["d"] for r in rows), min(r["d"] for r in rows)
    calls = []
    for r in rows:
        name = type(C.parse(r["compressor"])).__name__
        if r["d"] == largest:
            table[name] = (r["encode_s"] / r["d"], r["decode_s"] / r["d"])
    for r in rows:
        if r["d"] == smallest:
            enc, dec = table[type(C.parse(r["compressor"])).__name__]
            calls.append(max(0.0, r["total_s"] - (enc + dec) * r["d"]))
    if calls:
        call = sorted(calls)[len(calls) // 2]
    return table, call, f"kernels.json torch rows: per element at d = {largest:,}, per call at d = {smallest:,}"


def config_of(c):
    return C.Config(C.parse(c["spec"]), bool(c.get("error_feedback")), C.parse(c.get("server")))


def modelled_step(c, sizes, n, link, compute, table, call, share=1.0):
    """Seconds of one step of configuration c (steps.CONFIGS style) on tensors of ``sizes`` elements."""
    kind = c.get("kind", "hc")
    if kind in ("dense", "fp16"):
        itemsize = 2 if kind == "fp16" else 4
        return compute + 2 * (n - 1) * link.latency + 2 * (n - 1) / n * itemsize * sum(sizes) / link.bandwidth
    config = config_of(c)
    scaled = {k: (e * share, d * share) for k, (e, d) in table.items()}
    total = compute
    for d in sizes:
        how = c.get("transport")
        if how == T.AUTO:
            how = T.choose(config, d, n, link) if n > 1 else T.default(config)
        how = how or T.default(config)
        total += T.step_seconds(how, config, d, n, link, table=scaled, call_seconds=call * share)
    return total


def load(name):
    path = ROOT / "results" / "bench" / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def run(out, quick):
    steps, kernels = load("steps"), load("kernels")
    if steps is None or steps.get("quick"):
        print("bench.py model needs the full steps benchmark's results/bench/steps.json: run "
              "`python -m scripts.bench steps` (root) first")
        return {"error": "no results/bench/steps.json", "checks": {"steps measurements present": False}}, False
    plan = PLANS[False]
    sizes = [plan["width"] * plan["width"], plan["width"]] * plan["layers"]
    cores = steps["setup"].get("cpus") or os.cpu_count()
    table, call, kernel_source = fit_kernels(kernels)
    by_name = {c["name"]: c for c in CONFIGS}

    links, points = {}, []
    for t in steps["tables"]:
        n, rate, probe = t["n"], t["rate_gbit"], t["probe"]
        ring = 2 * (n - 1) / n * probe["bytes"]
        links.setdefault(rate, []).append(ring / probe["median_s"])
        share = max(1.0, n / cores)
        link = T.Link(ring / probe["median_s"])
        for row in t["rows"]:
            c = by_name.get(row["config"])
            if c is None or not row.get("median_s"):
                continue
            modelled = modelled_step(c, sizes, n, link, t["compute_only_s"], table, call, share)
            points.append({"n": n, "rate_gbit": rate, "config": row["config"], "measured_s": row["median_s"],
                           "modelled_s": modelled, "modelled_over_measured": modelled / row["median_s"]})
    bandwidth = {rate: sum(v) / len(v) for rate, v in links.items()}

    projection = {}
    compute = min(t["compute_only_s"] for t in steps["tables"])
    for rate, bw in bandwidth.items():
        link = T.Link(bw)
        rows = {"dense allreduce (Horovod)": [modelled_step({"kind": "dense"}, sizes, n, link, compute, table, call)
                                              for n in PROJECT_N]}
        for name, c in PROJECTED.items():
            rows[name] = [modelled_step(c, sizes, n, link, compute, table, call) for n in PROJECT_N]
        projection[str(rate)] = rows

    errors = [abs(math.log(p["modelled_over_measured"])) for p in points]
    figure = plot(out, projection, points, bandwidth)
    print(f"\nlinks (dense probe): " + ", ".join(f"{r} Gbit/s tc -> {bw * 8 / 1e9:.2f} Gbit/s effective"
                                               for r, bw in sorted(bandwidth.items())))
    print(f"kernels: {kernel_source}; fixed cost per compressed tensor {call * 1e3:.2f} ms")
    print(f"\n{'n':>3} {'rate':>5}  {'configuration':<28} {'measured s':>10} {'model s':>9} {'model/meas':>10}")
    for p in points:
        print(f"{p['n']:>3} {p['rate_gbit']:>5}  {p['config']:<28} {p['measured_s']:>10.3f} {p['modelled_s']:>9.3f} "
              f"{p['modelled_over_measured']:>10.2f}")
    for rate, rows in projection.items():
        print(f"\nprojected step time (s), {rate} Gbit/s tc link, one rank per device:")
        print(f"{'configuration':<34}" + "".join(f"{n:>8}" for n in PROJECT_N))
        for name, values in rows.items():
            print(f"{name:<34}" + "".join(f"{v:>8.3f}" for v in values))
    summary = {
        "setup": {"model_tensors": len(sizes), "params": sum(sizes), "cores": cores, "kernels": kernel_source,
                  "kernel_seconds_per_element": table, "kernel_call_seconds": call,
                  "effective_bandwidth_gbit": {str(r): bw * 8 / 1e9 for r, bw in bandwidth.items()},
                  "projection_compute_s": compute, "n": PROJECT_N},
        "points": points, "projection": projection, "figures": {"projection": relpath(figure)},
        "fit": {"median_abs_log_error": sorted(errors)[len(errors) // 2] if errors else None,
                "max_abs_log_error": max(errors) if errors else None},
        "checks": {"every measured configuration modelled": len(points) > 0,
                   "sharded bytes per rank flat from 2 to 1024 ranks (model)": sharded_flat(sizes)},
    }
    return summary, all(summary["checks"].values())


def sharded_flat(sizes):
    config = config_of(PROJECTED["DoubleSqueeze Top-k 1% (sharded)"])
    sent = [sum(T.traffic("sharded", config, d, n)[0] for d in sizes) for n in PROJECT_N]
    return max(sent) <= 1.01 * config.worker.wire_bytes(sum(sizes)) + 1.01 * config.server.wire_bytes(sum(sizes))


def plot(out, projection, points, bandwidth):
    fig, axes = plt.subplots(1, len(projection), figsize=(6.5 * len(projection), 4.8), squeeze=False)
    for ax, (rate, rows) in zip(axes[0], sorted(projection.items(), key=lambda kv: float(kv[0]))):
        for name, values in rows.items():
            ax.plot(PROJECT_N, values, marker=".", label=name, lw=2.2 if "dense" in name else 1.4)
        for p in points:
            if str(p["rate_gbit"]) == rate and p["config"] in ("dense", "topk1%+EF", "DoubleSqueeze topk1% root",
                                                                "sharded topk1%+EF", "randk1% shared"):
                ax.scatter([p["n"]], [p["measured_s"]], marker="x", color="black", zorder=5)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("ranks n")
        ax.set_ylabel("step time (s)")
        ax.set_title(f"{rate} Gbit/s tc link ({bandwidth[float(rate) if '.' in rate else int(rate)] * 8 / 1e9:.2f} "
                     f"Gbit/s effective), 25M params")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle("cost model projection (lines), measured on this machine (x, n ranks sharing its cores)")
    return save(fig, out / "model.png")
