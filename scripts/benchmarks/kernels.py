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

The "step" section times what the issue's targets are about, per compressor and size: **the worker step with
error feedback plus the decode of 2 payloads**, as a multiple of memcpy time (time / memcpy time; memcpy timed
in the same interleaved repeats). PyTorch, buffers preallocated once per size (g, e_in, e_out, out):
``parts, stats = K.step(c, g, e_in, e_out, seed)``; ``data = K.pack(c, parts, d)`` (``K.step_packed`` instead of the
two where the library has it, into a payload buffer kept from call to call, as the plug-in's transports
call it); then ``K.decode_mean(c, [data, data2], d, seed, float32, out=out)``, data2 a
second rank's payload made once beforehand from another input. Summable payloads travel as they are (Horovod's
allreduce averages them): ``ops.decode_values(c, parts[0], ..., out)`` once instead, as the transport does.
The same with the fused C kernels off (``fused.disabled()``: the pure-torch path) for contrast, at the largest
size only (seconds per call).
TensorFlow: the same step with hvd_compress/tensorflow/kernels.py (x = g + e; parts = encode(x); e_out = x -
decode(parts); data = pack(parts)) and the mean of 2 decoded packed payloads, as two ``tf.function(
jit_compile=True)`` (XLA; the allgather sits between them), compiled before timing; where XLA refuses a
compressor, the reason is reported and the same functions run as plain ``tf.function``s. No target for TF.
Beside them (framework "floor", in the same repeats): the memory floor of three payload layouts, kernels that
only move a layout's bytes (``floor.py``), so that a compressor's time can be read against what its layout
cannot go below on this machine.
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

from ..experiments.common import ROOT, commit, progress, relpath, save
from . import floor

WORKER = "scripts.benchmarks.kernels_worker"   # run as a module from ROOT
BIN = Path(sys.executable).parent
CONFIG = {
    True: {"sizes": [10 ** 4, 10 ** 5, 10 ** 6],
           "compressors": ["topk:0.01", "randk:0.01", "natural", "sign"],
           "repeats": {10 ** 4: 7, 10 ** 5: 7, 10 ** 6: 5},
           # the step section: torch (fused) on these; TF/XLA on a few only (each size and compressor compiles)
           "step_compressors": ["topk:0.01", "randk:0.01", "randk:0.01,shared", "natural", "sign"],
           "tf_step_compressors": ["sign", "topk:0.01", "randk:0.01,shared"],
           "eager_repeats": 3},
    False: {"sizes": [10 ** 4, 10 ** 5, 10 ** 6, 10 ** 7, 25 * 10 ** 6],
            "compressors": ["topk:0.01", "randk:0.01", "randk:0.01,shared", "natural", "natural:det", "sign",
                            "onebit", "qsgd:16", "topk:0.01+natural"],
            "repeats": {10 ** 4: 11, 10 ** 5: 11, 10 ** 6: 7, 10 ** 7: 5, 25 * 10 ** 6: 5},
            "step_compressors": ["topk:0.01", "randk:0.01", "randk:0.01,shared", "natural", "natural:det", "sign",
                                 "onebit", "qsgd:16", "topk:0.01+natural"],
            "tf_step_compressors": ["topk:0.01", "randk:0.01", "randk:0.01,shared", "natural", "natural:det",
                                    "sign", "onebit", "qsgd:16", "topk:0.01+natural"],
            "eager_repeats": 3},   # the pure-torch step, at the largest size only: seconds per call
}
FRAMEWORKS = ["torch", "tf"]
SEED = (123456789, 7)     # a (key, step) pair, as the pipeline passes
# The issue's targets, at the largest size: memory-bound compressors reach >= 0.5x memcpy bandwidth, i.e.
# their time is <= 2x memcpy's; TopK is "no slower than 2x that", i.e. its time is <= 2 x (2x memcpy) = 4x
# memcpy's, a fraction of memcpy bandwidth >= 0.25.
MEMORY_BOUND = ["sign", "natural", "natural:det", "randk:0.01", "randk:0.01,shared"]
MEMORY_BOUND_TARGET = 0.5
TOPK = ["topk:0.01"]
TOPK_TARGET = MEMORY_BOUND_TARGET / 2
# The issue's targets for the worker step with error feedback + the decode of 2 payloads (PyTorch, one thread,
# at the largest size): time <= this many times memcpy's.
STEP_TARGETS = [("step + decode of 2 <= 2x memcpy", ["sign", "onebit", "natural", "natural:det", "qsgd:16",
                                                      "randk:0.01", "randk:0.01,shared"], 2.0),
                ("TopK step + decode of 2 <= 4x memcpy", ["topk:0.01"], 4.0)]
# A step path taking over SLOW_S s per call (probed once before timing; the probe is its first sample) gets
# SLOW_REPEATS samples, over VERY_SLOW_S s the probe only (TF/XLA's RandK takes ~30 s per call at 2.5e7)
SLOW_S, SLOW_REPEATS, VERY_SLOW_S = 1.0, 3, 8.0
ERROR_SCALE = 0.01   # the error buffer e_in: small random values (a residual is small against the gradient)


# ---- the pipelines ------------------------------------------------------------------------------------------

def torch_pipeline(c, d):
    from hvd_compress.torch import kernels as K
    if c.summable:   # the values travel as they are (allreduce), nothing to pack
        return (lambda x: K.encode(c, x, SEED)[0]), (lambda v: K.decode(c, [v], d, SEED, torch.float32))
    return (lambda x: K.pack(c, K.encode(c, x, SEED), d),
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
    return (tf.function(lambda x: K.pack(c, K.encode(c, x, SEED), d), input_signature=[x_spec]),
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


# ---- the worker step with error feedback + the decode of 2 payloads ------------------------------------------

def _settled(e):
    """e as the error it stands for (a deferred correction applied, where the library defers one)."""
    from hvd_compress.torch import kernels as K
    return K.settle(e) if hasattr(K, "settle") else e


def torch_step(c, d, bufs, eager):
    """(step, decode): step(g) = the worker step with error feedback into the preallocated buffers,
    returning what travels (packed bytes; the values for summable payloads); decode(payload) = the mean of
    payload and data2 decoded into ``out`` (summable: payload decoded once). ``eager``: fused kernels off."""
    from hvd_compress import fused
    from hvd_compress.torch import kernels as K
    from hvd_compress.torch import ops
    _, e_in, e_out, out, g2 = bufs
    step_packed = getattr(K, "step_packed", None)   # one call where the library has it
    defer = {"defer": True} if hasattr(K, "settle") else {}   # as the plug-in steps (where the library has it)
    if defer and isinstance(c.compressor if isinstance(c, C.Scaled) else c, (C.ScaledSign, C.OneBit)):
        # its own e_in, owing the correction a step left it, as the plug-in's buffers do after a step
        e_in = e_in.clone()
        K.step(c, g2, e_in.clone(), e_in, SEED, **defer)
    # the payload's buffer, reused as the transports reuse theirs (fresh pages every call would be timed too)
    payload = None if c.summable else torch.empty(K.packed_nbytes(c, d, torch.float32), dtype=torch.uint8)

    def step(g):
        if c.summable:   # the values travel as they are
            return K.step(c, g, e_in, e_out, SEED, **defer)[0][0]
        if step_packed is not None:
            return step_packed(c, g, e_in, e_out, SEED, out=payload, **defer)[0]
        parts, _ = K.step(c, g, e_in, e_out, SEED)
        return K.pack(c, parts, d)

    data2 = None
    if c.summable:   # Horovod's allreduce averages the values: one decode, into the gradient's memory
        def decode(values):
            return ops.decode_values(c, values, d, SEED, out)
    else:
        def decode(data):
            return K.decode_mean(c, [data, data2], d, SEED, torch.float32, out=out)
    if eager:
        step_fused, decode_fused = step, decode

        def step(g):
            with fused.disabled():
                return step_fused(g)

        def decode(data):
            with fused.disabled():
                return decode_fused(data)
    if not c.summable:   # a second rank's payload, made once from another input (a copy: nothing reuses it)
        data2 = step(g2).clone()
    return step, decode


def tf_step(c, d, xla):
    """(step, decode) of the same worker step in TensorFlow, each a ``tf.function`` (``jit_compile=xla``),
    not yet traced: step(g, e, seed_step) -> (what travels, e_out); decode(data, data2) -> their decoded mean
    (summable: decode(values)). The seed's step is an input, as in training (no constant folding of draws)."""
    import tensorflow as tf
    from hvd_compress.tensorflow import kernels as K
    x_spec, s_spec = tf.TensorSpec([d], tf.float32), tf.TensorSpec([], tf.int64)

    def step(g, e, seed_step):
        seed = (SEED[0], seed_step)
        x = g + e
        parts = K.encode(c, x, seed)
        e_out = x - K.decode(c, parts, d, seed, tf.float32)
        return (parts[0] if c.summable else K.pack(c, parts, d)), e_out

    if c.summable:
        def decode(values, seed_step):
            return K.decode(c, [values], d, (SEED[0], seed_step), tf.float32)
        d_specs = [tf.TensorSpec([c.wire_bytes(d) // 4], tf.float32), s_spec]
    else:
        def decode(data, data2, seed_step):
            seed = (SEED[0], seed_step)
            total = K.decode(c, K.unpack(c, data, d, tf.float32), d, seed, tf.float32) + \
                K.decode(c, K.unpack(c, data2, d, tf.float32), d, seed, tf.float32)
            return total / 2.0
        d_specs = [tf.TensorSpec([c.wire_bytes(d)], tf.uint8)] * 2 + [s_spec]
    return (tf.function(step, input_signature=[x_spec, x_spec, s_spec], jit_compile=xla),
            tf.function(decode, input_signature=d_specs, jit_compile=xla))


def _reason(err):
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}"


def tf_step_kernel(c, d, g, e, g2, tf):
    """(step, decode, path, reason): the TF step compiled with XLA, else as plain tf.functions (path
    "tf.function", with the reason XLA refused); traced / compiled here, before timing."""
    seed_step = tf.constant(SEED[1], tf.int64)
    reason = None
    for xla in (True, False):
        step_fn, decode_fn = tf_step(c, d, xla)
        try:
            def step(x, step_fn=step_fn):
                return step_fn(x, e, seed_step)[0]   # e_out is computed (an output), not kept

            if c.summable:
                def decode(values, decode_fn=decode_fn):
                    return decode_fn(values, seed_step)
            else:
                data2 = step(g2)   # a second rank's payload, made once

                def decode(data, decode_fn=decode_fn, data2=data2):
                    return decode_fn(data, data2, seed_step)
            decode(step(g))   # trace + compile
            return step, decode, ("xla" if xla else "tf.function"), reason
        except Exception as err:   # XLA refused an op (or the function failed): say why, run without XLA
            if not xla:
                raise
            reason = _reason(err)


def tf_fused_kernel(c, d, g, e, g2, tf):
    """(step, decode) as the TensorFlow plug-in runs them on the CPU where the C kernels apply (``ops.packed_step``
    with the new error, ``ops.decode_mean`` of 2 payloads: hvd_compress/tensorflow/fused.py), traced here."""
    from hvd_compress.tensorflow import ops
    seed_step, like = tf.constant(SEED[1], tf.int64), tf.zeros([0], g.dtype)
    step_fn = tf.function(lambda x, e, s: ops.packed_step(None, c, "x", x, e, True, (SEED[0], s))[:2])
    mean_fn = tf.function(lambda a, b, s: ops.decode_mean(c, [a, b], d, (SEED[0], s), like))

    def step(x):
        return step_fn(x, e, seed_step)[0]
    data2 = step(g2)

    def decode(data):
        return mean_fn(data, data2, seed_step)
    decode(step(g))   # trace
    return step, decode


def measure_steps(d, step_specs, tf_specs, repeats, eager_repeats, tf):
    """Median times at one size of the worker step with EF (step_s) + the decode of 2 payloads (decode_s), per
    path (torch fused; torch eager when eager_repeats; TF with XLA or plain), and memcpy's in the same repeats."""
    gen = torch.Generator().manual_seed(d + 1)
    g, g2 = torch.randn(d, generator=gen), torch.randn(d, generator=gen)
    e_in = ERROR_SCALE * torch.randn(d, generator=gen)
    e_out, out = torch.empty_like(g), torch.empty_like(g)
    bufs = (g, e_in, e_out, out, g2)
    dst = torch.empty_like(g)
    dst.copy_(g)   # touched once, as in measure_size
    kernels, extra = {}, {}
    for spec in step_specs:
        c = C.parse(spec)
        for path in ("fused", "eager") if eager_repeats else ("fused",):
            step, decode = torch_step(c, d, bufs, path == "eager")
            result = decode(step(g))   # warm-up
            kernels[("torch", path, spec)] = (step, decode, g)
            if path == "fused":
                reference = (result.clone(), _settled(e_out).clone())
            else:   # the same numbers with and without the fused kernels? (information, not a check)
                extra[("torch", path, spec)] = {
                    "same_as_fused": bool(torch.equal(result, reference[0]) and torch.equal(e_out, reference[1]))}
            del result
    lib = floor.library()   # the memory floor of three payload layouts, timed alike (framework "floor")
    for label, (step, decode) in floor.kernels(lib, d, g, e_in, e_out, out).items() if lib else ():
        kernels[("floor", "c", label)] = (step, decode, g)
    if tf_specs:
        from hvd_compress.tensorflow import fused as tf_fused
        tg, tg2, te = (tf.constant(t.numpy()) for t in (g, g2, e_in))
        for spec in tf_specs:
            step, decode, path, reason = tf_step_kernel(C.parse(spec), d, tg, te, tg2, tf)
            kernels[("tf", path, spec)] = (step, decode, tg)
            if reason is not None:
                extra[("tf", path, spec)] = {"xla_refused": reason}
            if tf_fused.usable(C.parse(spec), tg.dtype, tg):
                kernels[("tf", "fused", spec)] = (*tf_fused_kernel(C.parse(spec), d, tg, te, tg2, tf), tg)
    keys = list(kernels)
    times = {"memcpy": [], **{key: [] for key in kernels}}
    limit = {}   # samples per path: eager_repeats for eager; fewer where one call is slow (the probe counts)
    for key in keys:
        if key[1] == "eager":
            limit[key] = min(repeats, eager_repeats)
            continue
        step, decode, arg = kernels[key]
        w_step, c_step, payload = timed(step, arg)
        w_dec, c_dec, result = timed(decode, payload)
        del payload, result
        took = w_step + w_dec
        limit[key] = 1 if took > VERY_SLOW_S else min(repeats, SLOW_REPEATS) if took > SLOW_S else repeats
        if took > SLOW_S:
            times[key].append((w_step, w_dec, c_step + c_dec))
    for r in range(repeats):
        times["memcpy"].append(timed(dst.copy_, g)[:2])
        active = [k for k in keys if len(times[k]) < limit[k]]
        shift = (r * 3) % max(len(active), 1)
        for key in active[shift:] + active[:shift]:
            step, decode, arg = kernels[key]
            w_step, c_step, payload = timed(step, arg)
            w_dec, c_dec, result = timed(decode, payload)
            times[key].append((w_step, w_dec, c_step + c_dec))
            del payload, result
        times["memcpy"].append(timed(dst.copy_, g)[:2])
    med = statistics.median
    memcpy_s, memcpy_cpu_s = med(t[0] for t in times["memcpy"]), med(t[1] for t in times["memcpy"])
    rows = []
    for key in keys:
        fw, path, spec = key
        t = times[key]
        total = med(p[0] + p[1] for p in t)
        total_cpu = med(p[2] for p in t)
        rows.append({"d": d, "framework": fw, "path": path, "compressor": spec, "step_s": med(p[0] for p in t),
                     "decode_s": med(p[1] for p in t), "total_s": total, "total_min_s": min(p[0] + p[1] for p in t),
                     "total_cpu_s": total_cpu, "x_memcpy": total / memcpy_s,
                     "x_memcpy_cpu": total_cpu / max(memcpy_cpu_s, 1e-9), "repeats": len(t), **extra.get(key, {})})
    return {"memcpy_s": memcpy_s, "memcpy_cpu_s": memcpy_cpu_s, "repeats": repeats}, rows


def step_targets(rows, d):
    """The issue's step targets at size d (PyTorch, the fused path: what a torch rank runs)."""
    out = {}
    for label, specs, limit in STEP_TARGETS:
        mine = [r for r in rows if r["d"] == d and r["framework"] == "torch" and r["path"] == "fused"
                and r["compressor"] in specs]
        if mine:
            measured = {r["compressor"]: r["x_memcpy"] for r in mine}
            out[f"torch: {label}"] = {
                "d": d, "target_x_memcpy": limit, "measured_x_memcpy": measured,
                "met": {s: v <= limit for s, v in measured.items()},
                "all_met": all(v <= limit for v in measured.values()),
                "measured_x_memcpy_cpu": {r["compressor"]: r["x_memcpy_cpu"] for r in mine}}
    return out


def step_table(memcpy, rows):
    lines = ["step: the worker step with error feedback + the decode of 2 payloads, time / memcpy time "
             "(torch: fused kernels, K.step+pack or step_packed, decode_mean; eager: fused.disabled(); "
             "TF: tf.function(jit_compile=True), and TF C: the TF plug-in's step on the C kernels (tf.numpy_function); "
             "floor: only the bytes of a payload layout, scripts/benchmarks/floor.c)"]
    for d, m in memcpy.items():
        lines.append(f"d = {d:,}: memcpy {m['memcpy_s'] * 1e3:.3f} ms")
        lines.append(f"  {'compressor':20s} {'torch step ms':>13s} {'decode ms':>10s} {'x memcpy':>9s} "
                     f"{'(cpu)':>7s} {'eager x':>8s} {'TF step ms':>11s} {'decode ms':>10s} {'x memcpy':>9s}  TF path"
                     f"  {'TF C x memcpy':>13s}")
        mine = [r for r in rows if r["d"] == d]
        for spec in dict.fromkeys(r["compressor"] for r in mine):
            get = {(r["framework"], r["path"]): r for r in mine if r["compressor"] == spec}
            t, e = get.get(("torch", "fused")) or get.get(("floor", "c")), get.get(("torch", "eager"))
            f = get.get(("tf", "xla")) or get.get(("tf", "tf.function"))
            line = f"  {spec:20s} "
            line += (f"{t['step_s'] * 1e3:13.3f} {t['decode_s'] * 1e3:10.3f} {t['x_memcpy']:9.2f} "
                     f"{t['x_memcpy_cpu']:7.2f} " if t else f"{'-':>13s} {'-':>10s} {'-':>9s} {'-':>7s} ")
            line += f"{e['x_memcpy']:8.2f} " if e else f"{'-':>8s} "
            line += (f"{f['step_s'] * 1e3:11.3f} {f['decode_s'] * 1e3:10.3f} {f['x_memcpy']:9.2f}  {f['path']:11s}"
                     if f else f"{'-':>11s} {'-':>10s} {'-':>9s}  {'-':11s}")
            c_row = get.get(("tf", "fused"))
            line += f"  {c_row['x_memcpy']:13.2f}" if c_row else f"  {'-':>13s}"
            lines.append(line)
            if f and f.get("xla_refused"):
                lines.append(f"  {'':20s} TF XLA: not compiled ({f['xla_refused']}); timed as plain tf.function")
    return "\n".join(lines)


def allreduce_times(sizes, repeats, tmp):
    """Dense fp32 hvd.allreduce of each size on 2 ranks (a Gloo job)."""
    out = Path(tmp) / "allreduce.json"
    cmd = [str(BIN / "horovodrun"), "-np", "2", "--gloo", sys.executable, "-m", WORKER, str(out), str(repeats),
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


def plot(results, rows, allreduce, compressors, path, step_memcpy=None, step_rows=()):
    sizes = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(20, 5), gridspec_kw={"width_ratios": [1, 1, 1.1]})
    axes[1].sharey(axes[0])
    colors = plt.get_cmap("tab10")
    specs = list(dict.fromkeys(list(compressors) + [r["compressor"] for r in step_rows]))
    color = {spec: colors(i % 10) for i, spec in enumerate(s for s in specs if s not in floor.LAYOUTS)}
    color.update({label: str(0.2 + 0.25 * i) for i, label in enumerate(floor.LAYOUTS)})   # the floors in greys
    for ax, fw, title in zip(axes, FRAMEWORKS, ["PyTorch kernels", "TensorFlow kernels (tf.function)"]):
        ax.plot(sizes, [4 * d / results[d]["memcpy_s"] / 1e9 for d in sizes], "k-", lw=2.5, label="memcpy (copy_)")
        ax.plot(sizes, [4 * d / results[d]["clone_s"] / 1e9 for d in sizes], "k:", lw=1.5, label="clone")
        ax.plot(sizes, [4 * d / allreduce[d]["allreduce_s"] / 1e9 for d in sizes], "--", color="grey", lw=2,
                label="dense allreduce, 2 ranks")
        for i, spec in enumerate(compressors):
            ys = [next(r["throughput_gbps"] for r in rows if r["d"] == d and r["framework"] == fw
                       and r["compressor"] == spec) for d in sizes]
            ax.plot(sizes, ys, "o-", color=color[spec], ms=4, label=spec)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("fp32 elements d")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("GB/s of fp32 input (4d bytes / time)")
    ax = axes[2]   # the worker step with EF + the decode of 2 payloads, as a multiple of memcpy time
    for spec in dict.fromkeys(r["compressor"] for r in step_rows):
        for fw, paths, style, lw in (("torch", ("fused",), "o-", 1.5), ("tf", ("xla", "tf.function"), "s--", 1),
                                     ("tf", ("fused",), "^-.", 1), ("floor", ("c",), "d:", 1.5)):
            mine = sorted((r for r in step_rows if r["compressor"] == spec and r["framework"] == fw
                           and r["path"] in paths), key=lambda r: r["d"])
            if mine:
                ax.plot([r["d"] for r in mine], [r["x_memcpy"] for r in mine], style, color=color[spec], ms=4,
                        lw=lw, label=spec if fw != "tf" else None)
        eager = [r for r in step_rows if r["compressor"] == spec and r["path"] == "eager"]
        ax.plot([r["d"] for r in eager], [r["x_memcpy"] for r in eager], "x", color=color[spec], ms=8, mew=2)
    for limit in sorted({limit for _, _, limit in STEP_TARGETS}):
        ax.axhline(limit, color="k", ls=":", lw=1.2)
        ax.text(0.01, limit * 1.05, f"target {limit:g}x", fontsize=7, transform=ax.get_yaxis_transform())
    ax.plot([], [], "k-", label="PyTorch (fused)")
    ax.plot([], [], "k--", lw=1, label="TensorFlow (XLA, else tf.function)")
    ax.plot([], [], "k^-.", lw=1, label="TensorFlow plug-in (C kernels)")
    ax.plot([], [], "kx", ms=8, mew=2, label="PyTorch eager")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("fp32 elements d")
    ax.set_ylabel("time / memcpy time")
    ax.set_title("worker step with EF + decode of 2 payloads")
    ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[1].get_legend_handles_labels()
    h2, l2 = ax.get_legend_handles_labels()
    seen = set(labels)
    handles += [h for h, lab in zip(h2, l2) if lab not in seen]
    labels += [lab for lab in l2 if lab not in seen]
    ax.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("compress + decompress throughput (encode+pack, unpack+decode) and the worker step, "
                 "one CPU core")
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
    step_memcpy, step_rows = {}, []
    largest = max(cfg["sizes"])
    for d in progress(cfg["sizes"], quick, desc="kernels: step"):
        if not quick:
            print(f"kernels: step, d = {d:,} ...", flush=True)
        step_memcpy[d], mine = measure_steps(d, cfg["step_compressors"], cfg["tf_step_compressors"],
                                             cfg["repeats"][d], cfg["eager_repeats"] if d == largest else 0, tf)
        step_rows += mine
    rows = rows_of(results, allreduce)
    print(table(results, rows, allreduce))
    print(step_table(step_memcpy, step_rows))
    figure = plot(results, rows, allreduce, cfg["compressors"], out / "kernels.png", step_memcpy, step_rows)
    targets = targets_of(rows, largest)
    for label, t in targets.items():
        shown = ", ".join(f"{s} {f:.3f} (vs clone {t['measured_vs_clone'][s]:.3f})"
                          for s, f in t["measured"].items())
        print(f"  target at d={largest:,} {label}: {'met' if t['all_met'] else 'NOT met'} ({shown})")
    s_targets = step_targets(step_rows, largest)
    for label, t in s_targets.items():
        shown = ", ".join(f"{s} {x:.2f}x" for s, x in t["measured_x_memcpy"].items())
        print(f"  step target at d={largest:,} {label}: {'met' if t['all_met'] else 'NOT met'} ({shown})")
    from hvd_compress import fused
    from hvd_compress.torch import kernels as torch_kernels
    fused_loaded = fused.lib() is not None
    if not fused_loaded:
        print("  note: the fused library did not load: the torch 'fused' step rows ran the pure-torch kernels")
    every = [(fw, s, d) for fw in FRAMEWORKS for s in cfg["compressors"] for d in cfg["sizes"]]
    step_every = {("torch", s, d) for s in cfg["step_compressors"] for d in cfg["sizes"]} | \
        {("tf", s, d) for s in cfg["tf_step_compressors"] for d in cfg["sizes"]}
    checks = {
        "a finite positive throughput for every framework x compressor x size": len(rows) == len(every) and all(
            math.isfinite(r["throughput_gbps"]) and r["throughput_gbps"] > 0 for r in rows),
        "finite positive memcpy and allreduce times at every size": all(
            0 < results[d]["memcpy_s"] < math.inf and 0 < allreduce[d]["allreduce_s"] < math.inf
            for d in cfg["sizes"]),
        "a finite positive step time (torch at every size, TF at every size) for every step compressor": {
            (r["framework"], r["compressor"], r["d"]) for r in step_rows
            if r["path"] not in ("eager", "c") and 0 < r["total_s"] < math.inf} == step_every
        and all(0 < r["total_s"] < math.inf for r in step_rows),
        "the memory floor of every payload layout at every size (where floor.c builds)": floor.library() is None
        or {(r["compressor"], r["d"]) for r in step_rows if r["framework"] == "floor"} ==
        {(label, d) for label in floor.LAYOUTS for d in cfg["sizes"]},
    }
    summary = {
        "setup": {"sizes": cfg["sizes"], "compressors": cfg["compressors"], "frameworks": FRAMEWORKS,
                  "repeats": cfg["repeats"], "threads": {"torch": torch.get_num_threads(),
                                                         "tf_intra_op": 1, "tf_inter_op": 1},
                  "timed": "encode+pack (encode_s) and unpack+decode (decode_s); total_s = median of their sum",
                  "memcpy": "dst.copy_(x), dst preallocated and touched; clone_s: x.clone()",
                  "allreduce": "hvd.allreduce (Average, fp32) on 2 ranks, horovodrun --gloo, the slower rank",
                  "cpu": _cpu_name(), "commit": commit(), "loadavg_before": load_before,
                  "loadavg_after": os.getloadavg(),
                  "torch": torch.__version__, "tensorflow": tf.__version__},
        "memcpy": {d: {"memcpy_s": r["memcpy_s"], "memcpy_cpu_s": r["memcpy_cpu_s"], "clone_s": r["clone_s"],
                       "memcpy_gbps": 4 * d / r["memcpy_s"] / 1e9} for d, r in results.items()},
        "allreduce": allreduce, "rows": rows, "targets": targets,
        "step": {
            "setup": {"compressors": cfg["step_compressors"], "tf_compressors": cfg["tf_step_compressors"],
                      "eager_sizes": [largest], "repeats": cfg["repeats"], "eager_repeats": cfg["eager_repeats"],
                      "slow": f"paths over {SLOW_S} s per call (probed once before timing, the probe being "
                              f"the first sample) get {SLOW_REPEATS} samples, over {VERY_SLOW_S} s the probe only "
                              f"(the row's repeats)",
                      "fused_library_loaded": fused_loaded,
                      "step_packed": hasattr(torch_kernels, "step_packed"), "error_scale": ERROR_SCALE,
                      "timed": "step_s: torch K.step(c, g, e_in, e_out, seed) + K.pack (K.step_packed where it "
                               "exists; summable: parts[0] as it is), buffers preallocated per size; TF: x = g + "
                               "e, encode, e_out = x - decode, pack, one tf.function. decode_s: torch "
                               "K.decode_mean(c, [data, data2], ..., out=out) (summable: K.decode once); TF: "
                               "the mean of the 2 payloads decoded, one tf.function. total_s = median of their "
                               "sum; x_memcpy = total_s / memcpy_s (memcpy timed in the same repeats)",
                      "paths": {"fused": "torch, the fused C kernels (as a rank runs them)",
                                "eager": "torch under fused.disabled(): the pure-torch kernels (largest size)",
                                "xla": "TF, tf.function(jit_compile=True)",
                                "tf.function": "TF without XLA, where XLA refused (xla_refused: why)",
                                "c": "framework floor: the bytes of a payload layout moved, no other arithmetic "
                                     "(scripts/benchmarks/floor.c): a bound for the compressors of that layout"}},
            "memcpy": step_memcpy, "rows": step_rows, "targets": s_targets,
            "xla_not_compiled": {f"{r['compressor']} d={r['d']}": r["xla_refused"] for r in step_rows
                                 if r.get("xla_refused")}},
        "figures": {"throughput": relpath(figure)}, "checks": checks,
    }
    return summary, all(checks.values())


def _cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"
