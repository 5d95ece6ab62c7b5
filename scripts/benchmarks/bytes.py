"""Benchmark `bytes`: wire bytes per rank per step for every compressor x mode x transport, counted from the
tensors actually handed to Horovod collectives in a real multi-rank job, against the payload formula, against
``Compression.stats()["bytes_sent"]`` and against a dense fp32 allreduce.

The worker (``bytes_worker.py``, 2 ranks under horovodrun --gloo; full mode also 4 ranks under mpirun) trains
a ~0.96M-parameter conv + linear model a few steps per configuration and counts bytes where every
horovod.torch collective passes. A broadcast counts on its root only (the other ranks hand Horovod a receive
buffer: nothing leaves them). The formula per rank and step, for T gradient tensors of d_p elements:

    payload                       allgather / allreduce: sum_p C.wire_bytes(d_p), the worker payload (its
                                  bytes allgathered, or summable values allreduced);
                                  sharded: sum_p [sum_j C.wire_bytes(slice_j) (alltoall: all n slices' payloads)
                                  + C_s.wire_bytes(own slice) (allgather)]; without a server compressor the
                                  slice's exact average travels, as 4 + min(4 s, 8 nnz) bytes: nnz depends on
                                  the data, so those rows are checked against an upper bound (nnz <= n k)
  + 4 T                           the step marker: a float32 per gradient, what compress() returns for
                                  Horovod's own allreduce
  + F T                           the finiteness flags, in the payload's collective: per gradient one byte
                                  (allgather), one fp32 value (allreduce), one byte per destination rank
                                  (sharded alltoall: F = n)
  + sum_p C_s.wire_bytes(d_p)     allgather / allreduce with DoubleSqueeze, root only: the server payload it
                                  broadcasts
    transport "dense": 4 d_p per tensor and nothing else (Horovod's fp32 allreduce of the gradient).

Dense baseline: Horovod's DistributedOptimizer without hvd_compress, 4 bytes per parameter (also counted).
DoubleSqueeze rows use the worker's compressor on the server too.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from hvd_compress import compressors as C

from ..experiments.common import ROOT, commit

BIN = Path(sys.executable).parent

WORKER = "scripts.benchmarks.bytes_worker"   # run as a module from ROOT

COMPRESSORS = ["topk:0.01", "randk:0.01", "randk:0.01,shared", "randk:0.01,biased", "natural", "natural:det",
               "sign", "onebit", "qsgd:16", "qsgd:1024", "topk:0.01+natural", "topk:0.01+natural:det",
               "topk:0.01+bf16", "0.5*topk:0.01", "none"]
QUICK_COMPRESSORS = ["topk:0.01", "randk:0.01,shared", "natural", "sign", "onebit", "topk:0.01+natural"]
MODES = ["plain", "ef", "doublesqueeze"]   # doublesqueeze: error feedback + the same compressor on the server
# Compression's transport= values to try (one list; hvd_compress/transport.py describes them). A Compression
# without a transport= argument runs each compressor once, on its built-in transport (allreduce for summable
# payloads, allgather otherwise), and lists the others as skipped; refused combinations are skipped too.
TRANSPORTS = ["allgather", "allreduce", "sharded", "dense"]


def _bounds(d, n):
    return [(j * d) // n for j in range(n + 1)]   # the n contiguous slices of the sharded transport


def _sharded(c, server, d, n, rank):
    """Sharded, from its description: an alltoall of the n slices' payloads (this rank hands all n, its own
    included), then an allgather of this rank's slice of the result: the server's payload; without a server
    compressor the exact average of the slice, as an int32 header + its nonzeros (int32 index + fp32 value
    each) or all its values, whichever is smaller. That depends on the data (how many nonzeros n payloads
    leave): here its upper bound (n payloads' nonzeros, none shared). Returns (bytes, exact)."""
    b = _bounds(d, n)
    sizes = [b[j + 1] - b[j] for j in range(n)]
    up = sum(c.wire_bytes(s) for s in sizes if s)
    s = sizes[rank]
    if not s:
        return up, True
    if server is not None:
        return up + server.wire_bytes(s), True
    return up + 4 + min(4 * s, 8 * min(s, n * c.max_nonzeros(s))), False


# Bytes one rank hands to collectives for one gradient of d elements, per transport, without the per-tensor
# step marker and flag: payload(c, server, d, n, rank) -> (bytes, exact: False for an upper bound). A transport
# missing here gets "n/a" (its rows are still checked against stats()).
PAYLOAD_FORMULA = {
    "allgather": lambda c, server, d, n, rank: (c.wire_bytes(d), True),
    "allreduce": lambda c, server, d, n, rank: (c.wire_bytes(d), True),
    "sharded": _sharded,
    "dense": lambda c, server, d, n, rank: (4 * d, True),    # Horovod's fp32 allreduce of the gradient itself
}
MARKER_BYTES = 4    # per gradient: the step marker compress() hands to Horovod's allreduce
# per gradient: its finiteness flag, appended to the bucket's payload collective
FLAG_BYTES = {"allgather": lambda n: 1, "allreduce": lambda n: 4, "sharded": lambda n: n}
TOLERANCE = 0.01    # counted vs formula (the "within 1%"; in practice they are equal)
TARGETS = {         # ratio to dense fp32 per rank (uplink, plain mode): (spec, expected, allowed range)
    "TopK 1% ~ 1.5% of dense": ("topk:0.01", 0.015, (0.014, 0.016)),   # 2.0% while indices travelled as int32
    "ScaledSign ~ 3.2% of dense": ("sign", 0.032, (0.030, 0.033)),
    "OneBit ~ 3.2% of dense": ("onebit", 0.032, (0.030, 0.033)),
    "Natural ~ 25% of dense": ("natural", 0.25, (0.245, 0.255)),
}
CONFIG = {True: {"ranks": [2], "warmup": 1, "counted": 2},
          False: {"ranks": [2, 4], "warmup": 1, "counted": 3}}


def builtin_transport(spec):
    return "allreduce" if C.parse(spec).summable else "allgather"


def configs(compressors):
    rows = [{"compressor": "dense", "mode": "-", "transport": "allreduce", "builtin": True}]
    for spec in compressors:
        for mode in MODES:
            for transport in TRANSPORTS:
                rows.append({"compressor": spec, "mode": mode, "transport": transport,
                             "builtin": transport == builtin_transport(spec)})
    return rows


def launch(ranks, configs_path, out, cfg):
    """The worker on `ranks` ranks: horovodrun --gloo for 2, mpirun for more (both launchers get used)."""
    args = [sys.executable, "-m", WORKER, str(out), str(configs_path), str(cfg["warmup"]), str(cfg["counted"])]
    if ranks == 2:
        cmd = [str(BIN / "horovodrun"), "-np", "2", "--gloo", *args]
    else:
        mpirun = shutil.which("mpirun")
        if mpirun is None:
            raise SystemExit("mpirun not found: install OpenMPI (bash scripts/setup.sh does)")
        cmd = [mpirun, "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np", str(ranks), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=1800)
    if proc.returncode != 0 or not out.exists():
        raise SystemExit(f"the {ranks}-rank bytes worker failed (exit {proc.returncode}):\n{proc.stdout[-5000:]}")
    return json.loads(out.read_text())


def formula(cfg, params, n, rank):
    """(total, terms, exact) of the formula for one rank; total None where the transport has no formula here,
    exact False where it is an upper bound (the data decide)."""
    dense = 4 * sum(params.values())
    if cfg["compressor"] == "dense":
        return dense, {"dense fp32 allreduce": dense}, True
    c, payload = C.parse(cfg["compressor"]), PAYLOAD_FORMULA.get(cfg["transport"])
    if payload is None:
        return None, {}, True
    server = c if cfg["mode"] == "doublesqueeze" else None
    if cfg["transport"] == "dense":   # no compression: no step marker, no finiteness flag
        return dense, {"dense fp32 allreduce": dense}, True
    pieces = [payload(c, server, d, n, rank) for d in params.values()]
    terms = {"payload": sum(b for b, _ in pieces),
             "step markers": MARKER_BYTES * len(params),
             "finiteness flags": FLAG_BYTES[cfg["transport"]](n) * len(params)}
    if server is not None and cfg["transport"] in ("allgather", "allreduce") and rank == 0:
        terms["server payload (root's broadcast)"] = sum(server.wire_bytes(d) for d in params.values())
    return sum(terms.values()), terms, all(exact for _, exact in pieces)


def analyse(report):
    """One row per (configuration, group of ranks with the same count): root and others differ only with a
    server pass."""
    params, n = report["params"], report["size"]
    dense = 4 * sum(params.values())
    rows, skipped = [], []
    for r in report["rows"]:
        cfg = {k: r[k] for k in ("compressor", "mode", "transport")}
        if "skipped" in r:
            skipped.append({**cfg, "ranks": n, "reason": r["skipped"]})
            continue
        per_rank = []
        for rank, steps in enumerate(r["ranks"]):
            counted = [s["counted"] for s in steps]
            stats = [s["stats_bytes_sent"] for s in steps]
            total, terms, exact = formula(cfg, params, n, rank)
            # data-dependent rows (an upper bound) may change from step to step: their largest step is shown
            per_rank.append({"rank": rank, "counted": counted[0] if exact else max(counted),
                             "steps_identical": len(set(counted)) == 1 or not exact,
                             "stats": stats[0] if exact else stats[counted.index(max(counted))],
                             "stats_equal": r["compressor"] == "dense" or stats == counted,
                             "formula": total, "exact": exact, "terms": terms, "by_purpose": steps[0]["by_purpose"],
                             "by_kind": steps[0]["by_kind"]})
        groups = [[per_rank[0]]]
        for p in per_rank[1:]:
            same = [g for g in groups if g[0]["counted"] == p["counted"] and g[0]["formula"] == p["formula"]
                    and g[0]["stats"] == p["stats"]]
            (same[0].append(p) if same else groups.append([p]))
        for g in groups:
            p = g[0]
            ranks = [q["rank"] for q in g]
            root = cfg["mode"] == "doublesqueeze" and cfg["transport"] in ("allgather", "allreduce")
            who = "every rank" if len(ranks) == n else ("rank 0 (root)" if ranks == [0] and root else
                                                         ("rank " if len(ranks) == 1 else "ranks ") +
                                                         ",".join(map(str, ranks)))
            agreement = None if p["formula"] is None else (p["counted"] - p["formula"]) / p["formula"]
            rows.append({**cfg, "ranks": n, "which": who, "counted": p["counted"], "formula": p["formula"],
                         "formula_kind": "exact" if p["exact"] else "upper bound",
                         "stats": p["stats"], "ratio_to_dense": p["counted"] / dense, "agreement": agreement,
                         "steps_identical": all(q["steps_identical"] for q in g),
                         "stats_equal": all(q["stats_equal"] for q in g), "terms": p["terms"],
                         "by_purpose": p["by_purpose"], "by_kind": p["by_kind"]})
    return rows, skipped, dense


def table(rows):
    head = (f"{'compressor':22s} {'mode':13s} {'transport':9s} {'n':>2s} {'which':13s} {'counted B/step':>14s} "
            f"{'formula':>10s} {'stats':>10s} {'/dense':>8s} {'vs formula':>10s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        agreement = "n/a" if r["agreement"] is None else f"{100 * r['agreement']:+.3f}%"
        if r["formula_kind"] == "upper bound":
            agreement = "<= bound" if r["counted"] <= r["formula"] else "> BOUND"
        lines.append(f"{r['compressor']:22s} {r['mode']:13s} {r['transport']:9s} {r['ranks']:2d} {r['which']:13s} "
                     f"{r['counted']:14,d} {r['formula'] if r['formula'] is not None else 'n/a':>10} "
                     f"{r['stats'] if r['stats'] is not None else '-':>10} {100 * r['ratio_to_dense']:7.3f}% "
                     f"{agreement:>10s}")
    return "\n".join(lines)


def run(out, quick):
    cfg = CONFIG[quick]
    all_rows, all_skipped, params = [], [], None
    with tempfile.TemporaryDirectory() as tmp:
        configs_path = Path(tmp) / "configs.json"
        configs_path.write_text(json.dumps(configs(QUICK_COMPRESSORS if quick else COMPRESSORS)))
        for ranks in cfg["ranks"]:
            print(f"bytes: {ranks} ranks ...", flush=True)
            report = launch(ranks, configs_path, Path(tmp) / f"report{ranks}.json", cfg)
            rows, skipped, dense = analyse(report)
            all_rows += rows
            all_skipped += skipped
            params = report["params"]
    print(table(all_rows))
    for transport in TRANSPORTS:   # one line per transport: why its missing rows did not run
        skipped = [s for s in all_skipped if s["transport"] == transport]
        if skipped:
            print(f"skipped {len(skipped)} x transport {transport}: {skipped[0]['reason'][:100]}")

    with_formula = [r for r in all_rows if r["agreement"] is not None and r["formula_kind"] == "exact"]
    bounded = [r for r in all_rows if r["agreement"] is not None and r["formula_kind"] == "upper bound"]
    targets = {}
    for label, (spec, expected, (low, high)) in TARGETS.items():
        found = [r["ratio_to_dense"] for r in all_rows
                 if r["compressor"] == spec and r["mode"] == "plain" and r["transport"] == builtin_transport(spec)]
        targets[label] = {"compressor": spec, "expected": expected, "measured": found[0] if found else None,
                          "met": bool(found) and all(low <= f <= high for f in found)}
    checks = {
        "every configuration with an exact formula counted within 1% of it": all(
            abs(r["agreement"]) <= TOLERANCE for r in with_formula) and len(with_formula) > 0,
        "data-dependent rows (sharded without a server) within their upper bound": all(
            r["counted"] <= r["formula"] for r in bounded),
        "counted bytes equal stats()['bytes_sent'] on every rank and step": all(r["stats_equal"] for r in all_rows),
        "the same count at every counted step (rows with an exact formula)": all(
            r["steps_identical"] for r in all_rows),
        "dense baseline counted = 4 bytes x parameters": all(
            r["counted"] == dense for r in all_rows if r["compressor"] == "dense"),
        "every compressor x mode ran on its built-in transport": all(
            any(r["compressor"] == spec and r["mode"] == mode for r in all_rows)
            for spec in (QUICK_COMPRESSORS if quick else COMPRESSORS) for mode in MODES),
        **{f"target: {label}": t["met"] for label, t in targets.items()},
    }
    for label, t in targets.items():
        print(f"  {label}: measured {100 * t['measured']:.3f}%")
    summary = {
        "setup": {"ranks": cfg["ranks"], "warmup_steps": cfg["warmup"], "counted_steps": cfg["counted"],
                  "model": "conv(1->32) + batchnorm(32) + conv(32->64) + linear(3136->300) + linear(300->10)",
                  "parameters": sum(params.values()), "tensors": len(params), "param_sizes": params,
                  "dense_bytes": dense, "compressors": QUICK_COMPRESSORS if quick else COMPRESSORS,
                  "modes": MODES, "transports": TRANSPORTS, "tolerance": TOLERANCE, "commit": commit(),
                  "formula": "sum_p wire_bytes(d_p) + 4 T (step markers) + F T (finiteness flags: F = 1 "
                             "allgather, 4 allreduce, n sharded) "
                             "[+ sum_p server wire_bytes(d_p) on the root with DoubleSqueeze]"},
        "rows": all_rows, "skipped": all_skipped, "targets": targets,
        "max_abs_agreement": max((abs(r["agreement"]) for r in with_formula), default=None),
        "checks": checks,
    }
    return summary, all(checks.values())
