"""Benchmark `gpu`: the PyTorch kernels on a CUDA device against a device-to-device copy of the same tensor.

Per compressor and size (fp32, 2.5·10^7 and 2.5·10^8 elements): "encode" (encode + pack) and "decode"
(unpack + decode) of one payload, as ``kernels.torch_pipeline`` calls them; fraction of copy bandwidth =
copy time / (encode + decode time), copy = ``dst.copy_(x)`` into a preallocated tensor (reads and writes
4d bytes each). Beside it the worker step with error feedback plus the decode of 2 payloads into kept
buffers (``kernels.torch_step``), as a multiple of the copy's time. Every timing brackets its call with
``torch.cuda.synchronize()`` (host-side waits inside a kernel count, as they do in a step); medians of
interleaved repeats after a warm-up. The summary names the device, torch and CUDA.

Targets (the GPU issue): memory-bound compressors (sign, 1-bit, natural, QSGD, Rand-k) at both sizes
>= 0.3x the copy's bandwidth for encode + decode; Top-k >= 0.1x.

``HVD_COMPRESS_BENCH_DEVICE=cpu`` runs it on the CPU (a dry run of the script: no figure of it is a GPU one).
"""
import math
import os
import statistics
import time

import torch

from hvd_compress import compressors as C

from ..experiments.common import commit, progress
from .kernels import ERROR_SCALE, torch_pipeline, torch_step

DEVICE = os.environ.get("HVD_COMPRESS_BENCH_DEVICE", "cuda")
CONFIG = {
    True: {"sizes": [10 ** 6], "repeats": 5},
    False: {"sizes": [25 * 10 ** 6, 250 * 10 ** 6], "repeats": 11},
}
MEMORY_BOUND = ["sign", "onebit", "natural", "natural:det", "qsgd:16", "randk:0.01", "randk:0.01,shared"]
TOPK = ["topk:0.01"]
COMPRESSORS = MEMORY_BOUND + TOPK + ["topk:0.01+natural"]
TARGETS = [("memory-bound compressors >= 0.3x copy bandwidth", MEMORY_BOUND, 0.3),
           ("Top-k >= 0.1x copy bandwidth", TOPK, 0.1)]


def _sync():
    if DEVICE != "cpu":
        torch.cuda.synchronize()


def timed(fn, *args):
    _sync()
    start = time.perf_counter()
    out = fn(*args)
    _sync()
    return time.perf_counter() - start, out


def measure(d, repeats):
    gen = torch.Generator(device=DEVICE).manual_seed(d)
    x = torch.randn(d, generator=gen, device=DEVICE)
    dst = torch.empty_like(x).copy_(x)
    e_in = ERROR_SCALE * torch.randn(d, generator=gen, device=DEVICE)
    bufs = (x, e_in, torch.empty_like(x), torch.empty_like(x), torch.randn(d, generator=gen, device=DEVICE))
    pipelines, steps = {}, {}
    for spec in COMPRESSORS:
        c = C.parse(spec)
        enc, dec = torch_pipeline(c, d)
        dec(enc(x))                               # warm-up: allocator, cuBLAS/cuRAND state, lazy modules
        pipelines[spec] = (enc, dec)
        step, decode = torch_step(c, d, bufs, eager=False)
        decode(step(x))
        steps[spec] = (step, decode)
    times = {"copy": [], **{("pipeline", s): [] for s in pipelines}, **{("step", s): [] for s in steps}}
    keys = [k for k in times if k != "copy"]
    for r in range(repeats):
        times["copy"].append(timed(dst.copy_, x)[0])
        shift = (r * 3) % len(keys)               # rotate: no kernel always runs right after another
        for kind, spec in keys[shift:] + keys[:shift]:
            first, second = (pipelines if kind == "pipeline" else steps)[spec]
            t1, payload = timed(first, x)
            t2, out = timed(second, payload)
            times[(kind, spec)].append((t1, t2))
            del payload, out
    med = statistics.median
    copy_s = med(times["copy"])
    rows = []
    for (kind, spec) in keys:
        t = times[(kind, spec)]
        total = med(a + b for a, b in t)
        row = {"kind": kind, "compressor": spec, "d": d, "first_s": med(a for a, _ in t),
               "second_s": med(b for _, b in t), "total_s": total, "x_copy": total / copy_s}
        if kind == "pipeline":
            row["fraction_of_copy_bandwidth"] = copy_s / total
        rows.append(row)
    return {"copy_s": copy_s, "copy_gbps": 8 * d / copy_s / 1e9}, rows


def targets_of(rows, sizes):
    targets = {}
    for label, specs, floor in TARGETS:
        measured = {f"{r['compressor']} d={r['d']:,}": r["fraction_of_copy_bandwidth"] for r in rows
                    if r["kind"] == "pipeline" and r["compressor"] in specs and r["d"] in sizes}
        targets[label] = {"floor": floor, "measured": measured,
                          "all_met": bool(measured) and all(f >= floor for f in measured.values())}
    return targets


def table(copies, rows):
    lines = [f"{'compressor':<20} {'d':>12} {'encode ms':>10} {'decode ms':>10} {'x copy bw':>10} "
             f"{'step+decode2 ms':>16} {'x copy time':>12}"]
    steps = {(r["compressor"], r["d"]): r for r in rows if r["kind"] == "step"}
    for r in (r for r in rows if r["kind"] == "pipeline"):
        s = steps[(r["compressor"], r["d"])]
        lines.append(f"{r['compressor']:<20} {r['d']:>12,} {1e3 * r['first_s']:>10.3f} {1e3 * r['second_s']:>10.3f} "
                     f"{r['fraction_of_copy_bandwidth']:>10.3f} {1e3 * s['total_s']:>16.3f} {s['x_copy']:>12.2f}")
    for d, c in copies.items():
        lines.append(f"copy d={d:,}: {1e3 * c['copy_s']:.3f} ms ({c['copy_gbps']:.0f} GB/s read + written)")
    return "\n".join(lines)


def device_name():
    if DEVICE == "cpu":
        return "cpu (dry run: not a GPU)"
    p = torch.cuda.get_device_properties(0)
    return f"{p.name}, {p.total_memory / 2 ** 30:.0f} GiB, {p.multi_processor_count} SMs"


def run(out, quick):
    if DEVICE != "cpu" and not torch.cuda.is_available():
        raise SystemExit("the gpu benchmark needs a CUDA device (torch.cuda.is_available() is False here); "
                         "HVD_COMPRESS_BENCH_DEVICE=cpu runs it on the CPU as a dry run")
    cfg = CONFIG[quick]
    copies, rows = {}, []
    for d in progress(cfg["sizes"], quick, desc="gpu: sizes"):
        print(f"gpu: d = {d:,} ...", flush=True)
        copies[d], mine = measure(d, cfg["repeats"])
        rows += mine
        if DEVICE != "cpu":
            torch.cuda.empty_cache()
    print(table(copies, rows))
    targets = targets_of(rows, cfg["sizes"])
    for label, t in targets.items():
        shown = ", ".join(f"{k} {v:.3f}" for k, v in t["measured"].items())
        print(f"  target {label}: {'met' if t['all_met'] else 'NOT met'} ({shown})")
    checks = {"a finite positive time for every compressor x size x kind": len(rows) == 2 * len(COMPRESSORS) * len(
        cfg["sizes"]) and all(0 < r["total_s"] < math.inf for r in rows)}
    summary = {
        "setup": {"device": device_name(), "device_kind": DEVICE, "sizes": cfg["sizes"], "repeats": cfg["repeats"],
                  "torch": torch.__version__, "cuda": torch.version.cuda, "commit": commit(),
                  "timed": "pipeline: encode+pack (first_s), unpack+decode (second_s); step: the worker step with "
                           "error feedback (first_s) + decode_mean of 2 payloads into a kept buffer (second_s); "
                           "each call bracketed by torch.cuda.synchronize(); medians of interleaved repeats",
                  "copy": "dst.copy_(x), fp32, dst preallocated; copy_gbps counts 8d bytes (read + written)"},
        "copy": copies, "rows": rows, "targets": targets, "checks": checks,
    }
    return summary, all(checks.values())
