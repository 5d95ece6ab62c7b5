"""Several nodes: training-step time and the bytes that leave each node, on the emulated cluster of
``scripts/cluster.py`` (2 nodes x 2 ranks, their links limited by tc to the inter-node rate; ranks of one node
talk inside it). Needs root.

Two launches, one per Horovod controller a user may pick, both started on hcnode0 (ssh to hcnode1): Gloo
(``horovodrun --gloo -H hcnode0:2,hcnode1:2``: TCP also between the ranks of a node) and MPI (``mpirun``:
Open MPI's shared memory inside a node, TCP between nodes). Each runs the ranks of
the steps benchmark (``steps_worker``: a probe, the compute-only step, then every configuration on a fresh model;
a configuration's step time is the median over its timed steps of the slowest rank's). Bytes that left a node
are its link's counter (``/sys/class/net/eth0/statistics/tx_bytes`` inside the node; traffic between the ranks
of one node never reaches it) over the timed steps. For the hierarchical transport they are compared with what
the transport has to send: one node's worker payload (the compressor's exact wire bytes of the node's L slices
of every tensor) plus, on the first node, the server payloads it broadcasts (DoubleSqueeze).
"""
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hvd_compress import compressors as HC
from hvd_compress import transport as T

from .. import cluster as C
from ..experiments.common import ROOT, relpath, save

WORKER = "scripts.benchmarks.steps_worker"
NODES, RANKS_PER_NODE = 2, 2
CONFIGS = [
    {"name": "dense", "kind": "dense", "label": "Horovod dense allreduce (fp32)"},
    {"name": "fp16", "kind": "fp16", "label": "Horovod fp16 allreduce"},
    {"name": "topk1%+EF allgather", "kind": "hc", "spec": "topk:0.01", "error_feedback": True,
     "label": "Top-k 1% + EF, flat (allgather)"},
    {"name": "topk1%+EF sharded", "kind": "hc", "spec": "topk:0.01", "error_feedback": True, "transport": "sharded",
     "label": "Top-k 1% + EF, flat (sharded)"},
    {"name": "topk1%+EF hierarchical", "kind": "hc", "spec": "topk:0.01", "error_feedback": True,
     "transport": "hierarchical", "label": "Top-k 1% + EF, hierarchical"},
    {"name": "topk1%+EF hierarchical, Horovod inside nodes", "kind": "hc", "spec": "topk:0.01", "error_feedback": True,
     "transport": "hierarchical", "env": {"HVD_COMPRESS_NODE_MEMORY": "0"},
     "label": "Top-k 1% + EF, hierarchical (node average by Horovod's allreduce)"},
    {"name": "DoubleSqueeze topk1% hierarchical", "kind": "hc", "spec": "topk:0.01", "error_feedback": True,
     "server": "topk:0.01", "transport": "hierarchical", "label": "DoubleSqueeze Top-k 1%, hierarchical"},
]
FLAT = ("topk1%+EF allgather", "topk1%+EF sharded")
LAUNCHERS = ("gloo", "mpi")
PLANS = {
    True: {"launchers": ["gloo"], "rate_gbit": 1, "width": 512, "layers": 2, "batch": 4, "warmup": 1, "steps": 3,
           "probe_repeats": 1, "configs": ["dense", "topk1%+EF allgather", "topk1%+EF hierarchical"], "timeout_s": 300},
    False: {"launchers": list(LAUNCHERS), "rate_gbit": 1, "width": 2048, "layers": 6, "batch": 4, "warmup": 1,
            "steps": 5, "probe_repeats": 2, "configs": [c["name"] for c in CONFIGS], "timeout_s": 1200},
}


def tensor_sizes(width, layers):
    return [width * width, width] * layers   # steps_worker's model: Linear(width, width) x layers


def hierarchical_bytes(config, sizes, node):
    """What node ``node`` has to send per step with transport "hierarchical": its worker payload (exact wire
    bytes of its L slices of every tensor) + the server payloads (first node) + one flag byte per slice."""
    worker, server = HC.parse(config["spec"]), HC.parse(config.get("server"))
    total = 0
    for d in sizes:
        b = T.bounds(d, RANKS_PER_NODE)
        for j in range(RANKS_PER_NODE):
            total += worker.wire_bytes(b[j + 1] - b[j]) + 1
            if server is not None and node == 0:
                total += server.wire_bytes(b[j + 1] - b[j])
    return total


def launch(cluster, plan, tmp, launcher):
    configs = [c for c in CONFIGS if c["name"] in plan["configs"]]
    plan_path, out_path = tmp / f"plan_{launcher}.json", tmp / f"report_{launcher}.json"
    plan_path.write_text(json.dumps({**{k: plan[k] for k in ("width", "layers", "batch", "warmup", "steps",
                                                             "probe_repeats")},
                                     "rate_bps": plan["rate_gbit"] * 1e9, "lr": 0.01, "configs": configs}))
    variables = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                 "HOROVOD_DYNAMIC_PROCESS_SETS": "1", "HOROVOD_GLOO_IFACE": C.NIC,
                 "HOROVOD_GLOO_TIMEOUT_SECONDS": "300"}
    env = ["env"] + [f"{k}={v}" for k, v in variables.items()]
    worker = [sys.executable, "-m", WORKER, str(plan_path), str(out_path)]
    if launcher == "gloo":
        command = [str(Path(sys.executable).parent / "horovodrun"), "--gloo", "-np", str(NODES * RANKS_PER_NODE),
                   "-H", cluster.hosts(RANKS_PER_NODE), "--network-interface", C.NIC, *worker]
    else:
        command = C.mpirun(cluster.hosts(RANKS_PER_NODE), NODES * RANKS_PER_NODE, worker, env_names=variables)
    start = time.time()
    try:
        proc = subprocess.run(cluster.on(0, env + command), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=plan["timeout_s"])
        failed = None if proc.returncode == 0 else f"exit code {proc.returncode}: {proc.stdout[-3000:]}"
        for line in proc.stdout.splitlines():
            if "[n=" in line:
                print("  " + line.split("[n=", 1)[1].split("] ", 1)[-1], flush=True)
    except subprocess.TimeoutExpired:
        failed = f"timed out after {plan['timeout_s']} s"
    report = json.loads(out_path.read_text()) if out_path.exists() else {}
    report["launch"] = {"wall_s": round(time.time() - start, 1), "failed": failed}
    return report


def rows_of(report, plan):
    configs, sizes = report.get("configs", {}), tensor_sizes(plan["width"], plan["layers"])
    dense = configs.get("dense", {}).get("median_s")
    compute = (report.get("compute_only") or {}).get("median_s")
    rows = []
    for config in CONFIGS:
        entry = configs.get(config["name"])
        if config["name"] not in plan["configs"]:
            continue
        row = {"config": config["name"], "label": config["label"], "median_s": None, "speedup": None,
               "node_bytes": None, "expected_node_bytes": None, "note": ""}
        if entry is None or entry.get("error") or entry.get("skipped"):
            row["note"] = (entry or {}).get("error") or (entry or {}).get("note") or "not measured"
        else:
            by_rank = entry.get("wire_bytes_by_rank") or []
            # every rank reads its node's link: the first rank of each node speaks for it
            row.update(median_s=entry["median_s"], speedup=dense / entry["median_s"] if dense else None,
                       node_bytes=[by_rank[k * RANKS_PER_NODE] for k in range(NODES)] if by_rank else None,
                       compress_s=entry.get("compress_s"), decompress_s=entry.get("decompress_s"),
                       ideal_s=None if compute is None else compute + max(
                           b for b in by_rank if b is not None) / (plan["rate_gbit"] * 1e9 / 8))
            if config.get("transport") == "hierarchical":
                row["expected_node_bytes"] = [hierarchical_bytes(config, sizes, k) for k in range(NODES)]
        rows.append(row)
    return rows


def table(report, rows, plan, launcher):
    mb = lambda b: "-" if b is None else f"{b / 1e6:.2f}"   # noqa: E731
    lines = [f"{launcher}: {NODES} nodes x {RANKS_PER_NODE} ranks, {plan['rate_gbit']} Gbit/s between nodes, "
             f"{report.get('params', 0) / 1e6:.1f}M parameters; compute only: "
             f"{(report.get('compute_only') or {}).get('median_s', float('nan')):.3f} s/step",
             "| configuration | median step (s) | speed-up vs dense | MB leaving node 0 / node 1 per step | "
             "hierarchical: what it has to send (MB) | note |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        sent = "-" if not r["node_bytes"] else " / ".join(mb(b) for b in r["node_bytes"])
        expected = "-" if not r["expected_node_bytes"] else " / ".join(mb(b) for b in r["expected_node_bytes"])
        step = "-" if r["median_s"] is None else f"{r['median_s']:.3f}"
        speedup = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        lines.append(f"| {r['label']} | {step} | {speedup} | {sent} | {expected} | {r['note']} |")
    return "\n".join(lines)


def plot(runs, path):
    import matplotlib.pyplot as plt   # after experiments.common, which selects the Agg backend
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = [c["label"] for c in CONFIGS]
    height = 0.8 / len(runs)
    for i, (launcher, run) in enumerate(runs.items()):
        by_label = {r["label"]: r for r in run["rows"] if r["median_s"] is not None}
        ys = [k + i * height for k in range(len(labels))]
        left.barh(ys, [by_label[x]["median_s"] if x in by_label else 0 for x in labels], height, label=launcher)
        right.barh(ys, [max(by_label[x]["node_bytes"] or [0]) / 1e6 if x in by_label else 0 for x in labels],
                   height, label=launcher)
    for ax in (left, right):
        ax.set_yticks([k + height * (len(runs) - 1) / 2 for k in range(len(labels))])
        ax.invert_yaxis()
    left.set_yticklabels(labels)
    right.set_yticklabels([])
    left.set_xlabel("median step time (s)")
    left.legend()
    right.set_xlabel("MB leaving the busiest node per step")
    right.set_xscale("log")
    fig.suptitle(f"{NODES} nodes x {RANKS_PER_NODE} ranks, tc-limited links between nodes, by Horovod controller")
    return save(fig, path)


def targets_of(runs):
    """The issue's targets: bytes per launch; step times against the best of either launcher (a user picks the
    faster controller for each way of training)."""
    targets, best = {}, {}
    for launcher, run in runs.items():
        for r in run["rows"]:
            if r["expected_node_bytes"] and r["node_bytes"]:
                ratio = max(b / e for b, e in zip(r["node_bytes"], r["expected_node_bytes"]))
                r["node_bytes_vs_expected"] = ratio
                targets[f"{launcher}, {r['config']}: bytes leaving each node <= 1.1x its payload (+ server share)"] \
                    = {"value": ratio, "met": ratio <= 1.1}
            if r["median_s"] is not None:
                best[r["config"]] = min(best.get(r["config"], math.inf), r["median_s"])
    hier = best.get("topk1%+EF hierarchical")
    flat = min((best[name] for name in FLAT if name in best), default=None)
    baseline = min((best[name] for name in ("dense", "fp16") if name in best), default=None)
    if hier and flat:
        targets["hierarchical Top-k 1% step time <= the best flat transport (best launcher of each)"] = {
            "value": hier / flat, "met": hier <= flat}
    if hier and baseline:
        targets["hierarchical Top-k 1% >= 2x faster than Horovod dense or fp16 (best launcher of each)"] = {
            "value": baseline / hier, "met": baseline / hier >= 2}
    return targets


def run(out, quick):
    plan = PLANS[quick]
    why = C.preflight()
    if why:
        print(f"nodes: {why}")
        return {"error": why, "checks": {"emulated cluster available (root, namespaces, sshd)": False}}, False
    runs = {}
    with tempfile.TemporaryDirectory(prefix="hc_nodes_") as tmp:
        with C.Cluster(NODES, plan["rate_gbit"]) as cluster:
            network = cluster.describe()
            print(f"nodes: {network}", flush=True)
            for launcher in plan["launchers"]:
                print(f"nodes: launch with {launcher}", flush=True)
                report = launch(cluster, plan, Path(tmp), launcher)
                rows = rows_of(report, plan)
                print(table(report, rows, plan, launcher))
                runs[launcher] = {"rows": rows, "compute_only_s": (report.get("compute_only") or {}).get("median_s"),
                                  "probe": report.get("probe"), "launch": report["launch"],
                                  "done": report.get("done", False)}
    left = C.our_namespaces()
    checks = {f"{launcher}: the launch finished and measured every configuration":
              not run["launch"]["failed"] and run["done"] and all(r["median_s"] for r in run["rows"])
              for launcher, run in runs.items()}
    checks["cluster torn down (no hcnode* namespaces left)"] = not left
    targets = targets_of(runs)
    figure = plot(runs, out / "nodes.png") if any(r["median_s"] for run in runs.values() for r in run["rows"]) \
        else None
    summary = {"network": network, "plan": plan, "params": report.get("params"), "runs": runs, "targets": targets,
               "checks": checks, "figure": figure and relpath(figure),
               "finding": "; ".join(f"{name}: {t['value']:.2f} ({'met' if t['met'] else 'NOT met'})"
                                    for name, t in targets.items())}
    return summary, all(checks.values())
