"""The fused C kernels (``hvd_compress.fused``) for TensorFlow's CPU tensors, called through ``tf.numpy_function``.

ScaledSign, OneBit, Natural and QSGD, also scaled: the worker's step (x = g + e, the payload, the new error and
the statistics in one or two passes over memory), encode, decode and the mean of n payloads, as the PyTorch
plug-in runs them on the CPU; and Top-k's step where it selects from a sample's candidates (its decode and mean
stay TensorFlow's: a scatter keeps a kept -0.0, the C mean adds it to 0, and the simulation decodes as the ops).
The numpy arrays a ``numpy_function`` receives share the tensors' memory, so nothing is copied on the way in.
TensorFlow's graph ops (``kernels.py``) took 5-25x longer for the dense ones' step and decode (2.5·10^7 floats,
one thread; README, TensorFlow).

Both paths give the same payloads (the same draws, the same bits of every element-wise value) except where a
reduction rounds: the C kernels sum in double lanes (a sign's scale, a QSGD norm, a OneBit mean) where
TensorFlow sums in the value's type. So a rank and the single-process simulation must take the same path:
they do, since both call ``kernels.encode`` / ``decode`` or ``ops.step`` / ``decode_mean``, and those come
here for the same tensors: on the CPU (placed there, or no GPU visible), float32 / float64, outside XLA, with
the library loaded (``HVD_COMPRESS_FUSED=0`` turns it off, as in PyTorch). An input the kernels do not take (a
non-finite value; for Natural also a subnormal one) goes through TensorFlow's ops in a ``tf.cond``, as PyTorch's
general path does.
"""
import math
import sys
import threading

import numpy as np
import tensorflow as tf

from .. import compressors as C
from .. import fused
from ..kernels import topk_sample, unscaled
from ..seeds import as_pair, hash_keys

DENSE = (C.ScaledSign, C.OneBit, C.Natural, C.QSGD)   # step, decode and mean in C; Top-k's step too (see usable)


def _on_cpu(t):
    device = getattr(t, "device", "") or ""
    if device:
        return "CPU" in device.upper().rsplit("/", 1)[-1]
    return not tf.config.list_logical_devices("GPU")


def usable(c, dtype, *tensors, decoding=False):
    """Whether compressor c on tensors of dtype runs the C kernels here (see the module's docstring): the DENSE
    ones, and for a step or encode (not ``decoding``) also Top-k where it selects from a sample's candidates (the
    first tensor of a static size of at least 2^17 elements, k <= d / 8; smaller ones take TensorFlow's ops,
    which select the same indices)."""
    from .kernels import _in_xla
    inner = unscaled(c)[0]
    if not isinstance(inner, DENSE) and (decoding or not _sampled_topk(inner, tensors[0])):
        return False
    return (tf.as_dtype(dtype) in (tf.float32, tf.float64) and all(_on_cpu(t) for t in tensors if t is not None)
            and not _in_xla() and fused.lib() is not None)


def _sampled_topk(c, x):
    d = x.shape.num_elements()
    if not isinstance(c, C.TopK) or d is None:
        return False
    k = c.k_for(d)   # (a scalar tensor during a warm-up: TensorFlow's ops)
    return isinstance(k, int) and topk_sample(d, k) is not None


def _ns(dtype):
    lib = fused.lib()
    return lib.f if dtype == np.float32 else lib.d


def _p(a):
    return None if a is None else a.ctypes.data


_pool, _pool_lock = {}, threading.Lock()   # size in bytes -> the large buffers handed out so far
_POOLED = 1 << 20                          # buffers of at least this many bytes are kept for reuse
_POOL_SIZE = 4                             # at most this many per size


def _empty(n, dtype):
    """An array of n elements at a 64-byte boundary: TensorFlow then takes the array a numpy_function returns
    as the tensor's memory instead of copying it (5 ms less per 100 MB). A large one is reused once TensorFlow
    has let go of it (nothing but the pool refers to it): fresh pages cost 8-10 ms per 100 MB here, and on this
    VM at times 200 ms (measured: Top-k's step 34 ms or 245 ms on the same input, natural's alike)."""
    dtype = np.dtype(dtype)
    nbytes = n * dtype.itemsize
    raw = None
    if nbytes >= _POOLED:
        with _pool_lock:
            buffers = _pool.setdefault(nbytes, [])
            for held in buffers:
                if sys.getrefcount(held) == 3:   # the pool's list, the name held, getrefcount's argument
                    raw = held
                    break
            if raw is None:
                raw = np.empty(nbytes + 64, np.uint8)
                if len(buffers) < _POOL_SIZE:
                    buffers.append(raw)
    else:
        raw = np.empty(nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + nbytes].view(dtype)


# ---- the numpy side: what runs inside the numpy_functions ------------------------------------------------

def natural_table(top, dtype, lam):
    """The 256 values a Natural byte decodes to at largest exponent ``top`` (as ``kernels._natural_decode``
    computes them: +-2^(top - m + 1) for m = byte & 127 > 0, +-0 for m = 0, minus where byte >= 128), times lam."""
    dtype, code = np.dtype(dtype), np.arange(256)
    magnitude = code & 127
    with np.errstate(over="ignore"):   # (2^e past the largest float is inf, as intended)
        value = np.ldexp(np.ones(256, dtype), np.where(magnitude > 0, top - magnitude + 1, 0)).astype(dtype)
    value[magnitude == 0] = 0
    value = np.where(code >= 128, -value, value)
    return value * dtype.type(lam) if lam != 1.0 else value


def step_arrays(c, lam, g, e, want_error, seed):
    """(parts, stats, new error or None) of compressor c (unscaled, of DENSE) on x = g + e (e may be None), numpy
    arrays in and out; None where the kernels do not take x (then TensorFlow's ops decide)."""
    d, dtype, ns = g.size, g.dtype, _ns(g.dtype)
    st = np.zeros(8, np.float64)
    out = _empty(d, dtype) if want_error else None
    G, E, O, S = _p(g), _p(e), _p(out), _p(st)
    if isinstance(c, (C.ScaledSign, C.OneBit)):
        bits = _empty((d + 7) // 8, np.uint8)
        if isinstance(c, C.ScaledSign):
            if ns.sign1(G, E, None, O, d, _p(bits), S):
                return None
            head = np.array([st[1] / d if d else math.nan], dtype)
            vals = head * dtype.type(lam) if lam != 1.0 else head
            vpos, vneg = float(vals[0]), float(-vals[0])
            npos, spos, sneg = d, float(st[1]), 0.0
        else:
            if ns.onebit1(G, E, None, O, d, _p(bits), S):
                return None
            nneg = int(st[3])
            head = np.array([st[1] / max(d - nneg, 1), (0.0 - st[2]) / max(nneg, 1)], dtype)
            vals = head * dtype.type(lam) if lam != 1.0 else head
            vpos, vneg = float(vals[0]), float(-vals[1])
            npos, spos, sneg = d - nneg, float(st[1]), float(st[2])
        sumsq = float(st[0])
        if out is not None:
            ns.select2(G, E, O, d, vpos, vneg, S)
            residual = st[0]
        else:   # the sum over both sides of (x - value)^2 in closed form, as the PyTorch kernels' deferred step
            residual = (sumsq - 2 * vpos * spos + npos * vpos * vpos - 2 * vneg * sneg + (d - npos) * vneg * vneg
                        if d else 0.0)
        return [head, bits], _stats(residual, sumsq), out
    if isinstance(c, C.Natural):
        code, top = _empty(d, np.uint8), np.zeros(1, np.int64)
        k1, k2 = (0, 0) if c.deterministic else hash_keys(seed)
        if lam == 1.0:   # one pass: the values decoded do not depend on the largest exponent
            tops = np.empty(fused.blocks(d) + 1, np.int64)
            if ns.natural_step(G, E, O, d, int(c.deterministic), k1, k2, _p(code), _p(top), _p(tops), S):
                return None
        else:
            if ns.natural1(G, E, O, d, int(c.deterministic), k1, k2, _p(code), _p(top), S):
                return None
            sumsq, table = st[0], natural_table(int(top[0]), dtype, lam)   # (a name keeps the array alive)
            ns.natural2(G, E, O, d, int(top[0]), _p(code), _p(table), S)
            return [top.astype(np.int32), code], _stats(st[0], sumsq), out
        return [top.astype(np.int32), code], _stats(st[0], st[1]), out
    if isinstance(c, C.QSGD):
        if ns.qsgd1(G, E, O, d, S):
            return None
        sumsq, peak = st[0], st[1]
        if dtype == np.float64 and (peak > 1e150 or 0 < peak < 1e-150):   # the sum of squares over/underflows
            x = out if out is not None else (g if e is None else g + e)
            norm = peak * np.linalg.norm(x / peak)
        else:
            norm = math.sqrt(sumsq)
        head = np.array([norm], dtype)
        wide = c.levels > 127
        levels = _empty(d, np.int16 if wide else np.int8)
        k1, k2 = hash_keys(seed)
        ns.qsgd2(G, E, O, d, float(head[0]), float(c.levels), lam, k1, k2, _p(levels), int(wide), S)
        return [head, levels], _stats(st[0], sumsq), out
    if isinstance(c, C.TopK):   # its candidates at or above a sample's threshold in one pass, then the k largest
        k = c.k_for(d)
        stride, rank = topk_sample(d, k)
        sample = np.abs(g[::stride] if e is None else g[::stride] + e[::stride])
        threshold = np.partition(sample, rank - 1)[rank - 1]   # the rank-th smallest, as torch.kthvalue
        cap = min(d, 3 * k + 1024)
        cidx, cval = np.empty(cap, np.int64), np.empty(cap, dtype)
        count = ns.topk1(G, E, O, d, float(threshold), _p(cidx), _p(cval), cap, S)
        if st[1] != 0.0 or not k <= count <= cap:
            return None   # not finite, or a skewed sample: TensorFlow's ops select from the whole tensor
        idx, values = _empty(k, np.int32), _empty(k, dtype)
        keys, fix = np.empty(count, np.dtype(f"u{dtype.itemsize}")), st[4:6]   # (fix: 2 sums the pick returns)
        ns.topk_pick(_p(cidx), _p(cval), count, k, _p(keys), O, lam, _p(idx), _p(values), _p(fix))
        return [idx, values], _stats(st[0] - fix[0] + fix[1], st[0]), out
    raise TypeError(f"no fused kernel for {c!r}")


def _stats(residual, sumsq):
    return np.array([max(residual, 0.0), sumsq, 1.0], np.float64)


def mean_arrays(c, lam, rows, d, dtype):
    """(sum_j decode(rows[j])) / n in one pass, rows the parts [head, body] of n payloads (numpy)."""
    dtype = np.dtype(dtype)
    ns, n = _ns(dtype), len(rows)
    out = _empty(d, dtype)
    addresses = np.array([r[1].ctypes.data for r in rows], np.int64)
    if isinstance(c, C.Natural):
        tops = np.array([int(r[0][0]) for r in rows], np.int64)
        tables = np.stack([natural_table(int(t), dtype, lam) for t in tops])
        ns.mean_table(_p(addresses), _p(tables), _p(tops), int(lam == 1.0), n, d, _p(out), float(n))
    elif isinstance(c, (C.ScaledSign, C.OneBit)):
        heads = np.stack([r[0] for r in rows])   # (n, 1) or (n, 2)
        vals = heads * dtype.type(lam) if lam != 1.0 else heads
        vpos = np.ascontiguousarray(vals[:, 0])
        vneg = np.ascontiguousarray(-vals[:, 0 if isinstance(c, C.ScaledSign) else 1])
        ns.mean_bits(_p(addresses), _p(vpos), _p(vneg), n, d, _p(out), float(n))
    else:   # QSGD
        norms = np.concatenate([r[0].reshape(1) for r in rows]).astype(dtype)
        ns.mean_qsgd(_p(addresses), int(c.levels > 127), _p(norms), float(c.levels), lam, n, d, _p(out), float(n))
    return out


# ---- the TensorFlow side ---------------------------------------------------------------------------------------

def _steps(seed):
    """(key, step tensor or None, step int or None): a step that is a tensor enters the numpy_function."""
    key, step = as_pair(seed)
    if isinstance(step, int):
        return key, None, step
    return key, tf.cast(tf.reshape(step, []), tf.int64), None


def _static(n):
    return n if isinstance(n, int) else None


def step(c, g, e, want_error, seed, general):
    """(parts, stats, new error or None) as ``ops.step`` defines them, with the C kernels; ``general()`` gives
    the same with TensorFlow's ops, for an x the kernels do not take. g's length may be known only in the graph
    (a composition's second stage during a warm-up)."""
    from .kernels import numel, part_dtypes
    inner, lam = unscaled(c)
    d, dtype, has_e = numel(g), g.dtype, e is not None
    key, step_t, step_i = _steps(seed)
    types = part_dtypes(c, d, dtype)

    def run(g, e, *step_v):
        with fused.ieee():
            done = step_arrays(inner, lam, g, e if has_e else None, want_error,
                               (key, int(step_v[0]) if step_v else step_i))
        if done is None:   # (placeholders: the tf.cond below takes general())
            return [np.zeros(n, t.as_numpy_dtype) for t, (_, n) in zip(types, inner.layout(g.size))] + [
                np.zeros(3), np.zeros(g.size if want_error else 0, g.dtype), np.array(False)]
        parts, stats, out = done
        return parts + [stats, out if want_error else np.zeros(0, g.dtype), np.array(True)]

    inputs = [g, e if has_e else g] + ([step_t] if step_t is not None else [])
    outs = tf.numpy_function(run, inputs, types + [tf.float64, dtype, tf.bool], stateful=False)
    for t, n in zip(outs, [n for _, n in c.layout(d)] + [3, d if want_error else 0]):
        t.set_shape([_static(n)])
    outs[-1].set_shape([])
    parts, stats, left, ok = list(outs[:len(types)]), outs[-3], outs[-2], outs[-1]
    if tf.executing_eagerly():
        return (parts, stats, left if want_error else None) if bool(ok) else general()

    def general_filled():
        g_parts, g_stats, g_left = general()
        return g_parts, g_stats, g_left if want_error else left
    parts, stats, left = tf.cond(ok, lambda: (parts, stats, left), general_filled)
    return list(parts), stats, left if want_error else None


def encode(c, x, seed, general):
    """encode(c, x, seed) with the C kernels; ``general()`` the parts from TensorFlow's ops."""
    return step(c, x, None, False, seed, lambda: (general(), tf.zeros([3], tf.float64), None))[0]


def decode(c, parts, d, dtype):
    """decode(parts) with the C kernels (the same bits as TensorFlow's ops)."""
    return decode_mean(c, [parts], d, dtype)


def decode_mean(c, rows, d, dtype):
    """(sum_j decode(rows[j])) / n, rows the parts of n payloads: the same bits as TensorFlow's ops give, summing
    the decoded rows in order and dividing by n. d may be a scalar tensor (see ``step``)."""
    inner, lam = unscaled(c)
    dtype = tf.as_dtype(dtype)
    width = len(rows[0])
    inputs = [p for parts in rows for p in parts] + ([] if isinstance(d, int) else [tf.cast(d, tf.int64)])

    def run(*flat):
        n = d if isinstance(d, int) else int(flat[-1])
        arrays = [list(flat[i:i + width]) for i in range(0, len(rows) * width, width)]
        with fused.ieee():
            return mean_arrays(inner, lam, arrays, n, dtype.as_numpy_dtype)

    out = tf.numpy_function(run, inputs, dtype, stateful=False)
    out.set_shape([_static(d)])
    return out
