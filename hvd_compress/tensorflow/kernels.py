"""TensorFlow kernels: encode / decode of every compressor, and payload packing into real bytes.

The same functions, payload parts and byte format as ``hvd_compress/torch/kernels.py``, in pure TensorFlow ops:
everything traces inside ``tf.function`` (and XLA) with static shapes, ``d`` a Python int taken from a tensor's
static shape. Except during a warm-up, where a sparsifier's k is a scalar tensor (``compressors.with_k_of``)
and so are the lengths that follow from it (the kept values, a composition's second stage, the payload's
parts). No tensor value decides a Python branch.

A seed is an integer or a (key, step) pair (see ``hvd_compress.seeds``); ``step`` may be a scalar integer
tensor (a ``tf.Variable``'s value in a graph). Random draws come from the counter-based stream of the PyTorch
and C kernels (a hash of the element's index and the seed, in integer ops that are the same on every device and
under XLA), so a call is reproducible from (compressor, x, seed) and draws the same numbers as in PyTorch: the
same payloads, but where RandK draws from a permutation (k > d / 8, or too few distinct draws: rare) and where
a reduction (a scale, a norm) rounds differently.

TensorFlow flushes subnormal floats to zero in some eager CPU kernels; Natural compression therefore reads
and writes exponents with integer bit operations only, so that it is exact over the whole float range.
"""
import numbers

import tensorflow as tf

from .. import compressors as C
from . import fused
from ..kernels import from_wire, registries, to_wire, topk_sample, unscaled
from ..seeds import as_pair, hash_keys, second_stage

_DTYPES = {C.INT32: tf.int32, C.UINT8: tf.uint8, C.INT8: tf.int8, C.INT16: tf.int16, C.BF16: tf.bfloat16,
           C.INDEX: tf.int32}
_MASK64 = 2 ** 64 - 1


def _uint64(value):
    """A seed component's low 64 bits as a uint64 scalar tensor (Python integers wrap around modulo 2^64)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return tf.constant(int(value) & _MASK64, tf.uint64)
    return tf.bitcast(tf.cast(tf.reshape(value, []), tf.int64), tf.uint64)


def _hash_keys(seed):
    """``seeds.hash_keys`` as two uint32 scalars, in the graph where the step is a tensor."""
    key, step = as_pair(seed)
    if all(isinstance(v, numbers.Integral) for v in (key, step)):
        return tuple(tf.constant(k, tf.uint32) for k in hash_keys(seed))
    low32 = tf.constant(0xFFFFFFFF, tf.uint64)

    def shr(z, n):
        return tf.bitwise.right_shift(z, tf.constant(n, tf.uint64))
    high = tf.bitwise.left_shift(tf.bitwise.bitwise_and(_uint64(key), low32), tf.constant(32, tf.uint64))
    z = tf.bitwise.bitwise_or(high, tf.bitwise.bitwise_and(_uint64(step), low32)) + \
        tf.constant(0x9E3779B97F4A7C15, tf.uint64)
    z = tf.bitwise.bitwise_xor(z, shr(z, 30)) * tf.constant(0xBF58476D1CE4E5B9, tf.uint64)
    z = tf.bitwise.bitwise_xor(z, shr(z, 27)) * tf.constant(0x94D049BB133111EB, tf.uint64)
    z = tf.bitwise.bitwise_xor(z, shr(z, 31))
    return tf.cast(tf.bitwise.bitwise_and(z, low32), tf.uint32), tf.cast(shr(z, 32), tf.uint32)


def _mix32(h):
    """"lowbias32" (hvd_compress/csrc/fused.c's mix32) on uint32 values (products wrap modulo 2^32)."""
    for shift, multiplier in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, tf.constant(shift, tf.uint32)))
        h = h * tf.constant(multiplier, tf.uint32)
    return tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, tf.constant(16, tf.uint32)))


def _hash32(d, seed):
    """The counter-based stream h_i = mix32(mix32(i ^ k1) + k2), i < d, as uint32: the same numbers as the
    PyTorch kernels and the C kernels draw."""
    k1, k2 = _hash_keys(seed)
    i = tf.cast(tf.range(tf.cast(d, tf.int64), dtype=tf.int64), tf.uint32)   # (i modulo 2^32, as in C)
    return _mix32(_mix32(tf.bitwise.bitwise_xor(i, k1)) + k2)


def _uniform(d, dtype, seed):
    """d uniform draws in [0, 1) of dtype, those of the PyTorch kernels: float32 (h >> 8) 2^-24, float64 h 2^-32."""
    h = _hash32(d, seed)
    if dtype == tf.float64:
        return tf.cast(h, tf.float64) * tf.constant(2.0 ** -32, tf.float64)
    u = tf.cast(tf.bitcast(tf.bitwise.right_shift(h, tf.constant(8, tf.uint32)), tf.int32), tf.float32)
    return tf.cast(u * tf.constant(2.0 ** -24, tf.float32), dtype)


def _draws_below(m, d, seed):
    """RandK's m iid uniform draws in [0, d) as int64: the PyTorch kernels' ``_draws_below``, in uint64."""
    h = tf.cast(tf.reshape(_hash32(2 * m, seed), [-1, 2]), tf.uint64)
    d = tf.cast(d, tf.uint64)
    shr32 = tf.constant(32, tf.uint64)
    draws = tf.bitwise.right_shift(h[:, 0] * d + tf.bitwise.right_shift(h[:, 1] * d, shr32), shr32)
    return tf.cast(draws, tf.int64)


def _div(x, y):
    # x / y rounded as IEEE division, like torch. Grappler rewrites RealDiv by a constant into a
    # multiplication by the rounded reciprocal in graphs (1 ulp off); DivNoNan is left alone (y is never 0)
    return tf.math.divide_no_nan(x, y)


def _random_indices(d, k, seed):
    """A uniformly random k-subset of range(d), in increasing order (see _topk_encode), as int32. For k << d, as
    PyTorch does it: the first k distinct values of 1.25 k + 16 iid uniform draws (each new value is uniform over
    those not seen yet), found with two sorts of the draws; ranking d uniform draws with top_k took 0.8 s at
    d = 2.5e7, k = 1%. Where the draws hold fewer than k distinct values (rare), and for k > d / 8: the k
    largest of d uniform draws (float64: ties practically never)."""
    def ranked():
        return tf.sort(tf.math.top_k(_uniform(d, tf.float64, seed), k, sorted=False).indices)

    def drawn():
        n = k if isinstance(k, int) else tf.cast(k, tf.int32)   # (a scalar tensor during a warm-up)
        m = n + n // 4 + 16
        draws = _draws_below(m, d, seed)
        order = tf.argsort(draws, stable=True)           # by value, equal values in draw order
        ordered = tf.gather(draws, order)
        first = tf.concat([[True], ordered[1:] != ordered[:-1]], 0)
        first = tf.scatter_nd(order[:, None], first, tf.shape(draws))   # first occurrences, in draw order
        nth = tf.cumsum(tf.cast(first, tf.int32))
        chosen = tf.where(first & (nth <= n), draws, tf.cast(d, tf.int64))
        return tf.cast(tf.sort(chosen)[:n], tf.int32), nth[-1] >= n

    def drawn_or_ranked():
        idx, enough = drawn()
        return tf.cond(enough, lambda: idx, ranked)

    if isinstance(k, int) and isinstance(d, int):
        return ranked() if 8 * k > d else drawn_or_ranked()
    return tf.cond(8 * k > d, ranked, drawn_or_ranked)


def numel(x):
    """x's number of elements: a Python int where the shape is static, else a scalar tensor (a warm-up's
    payloads: k changes from step to step)."""
    d = x.shape.num_elements()
    return d if d is not None else tf.size(x)


# ---- bit packing ----------------------------------------------------------------------------------------

def pack_bits(bits):
    """bool tensor of d -> uint8 tensor of ceil(d/8), 8 flags per byte (little-endian bit order)."""
    d = numel(bits)
    padded = tf.pad(tf.cast(tf.reshape(bits, [-1]), tf.int32), [[0, (d + 7) // 8 * 8 - d]])
    weights = tf.constant([1, 2, 4, 8, 16, 32, 64, 128], tf.int32)
    return tf.cast(tf.reduce_sum(tf.reshape(padded, [-1, 8]) * weights, axis=1), tf.uint8)


def unpack_bits(packed, d):
    shifts = tf.range(8, dtype=tf.int32)
    packed = tf.reshape(tf.cast(packed, tf.int32), [(d + 7) // 8, 1])
    bits = tf.bitwise.bitwise_and(tf.bitwise.right_shift(packed, shifts), 1)
    return tf.cast(tf.reshape(bits, [-1])[:d], tf.bool)


# ---- the compressors --------------------------------------------------------------------------------------

def _scatter(idx, values, d):
    # assignment, not addition: a kept -0.0 stays -0.0, as in torch
    idx = tf.reshape(tf.cast(idx, tf.int32), [-1, 1])
    return tf.tensor_scatter_nd_update(tf.zeros([d], values.dtype), idx, values)


def _topk_indices(a, k):
    """Positions of the k largest of a, in increasing order: top_k(sorted=False) orders them one way in
    TensorFlow's kernel and another under XLA, and the order decides which random draw a Compose's second stage
    spends on which value. As PyTorch does it, a large tensor first keeps the candidates at or above a threshold
    estimated from a strided sample (about 2k of them, in increasing order: top_k keeps its rule on ties) and
    selects among those alone (top_k over 2.5e7 elements took 0.5 s); where fewer than k pass (a skewed
    sample), the whole tensor is selected from."""
    def whole():
        return tf.sort(tf.math.top_k(a, k, sorted=False).indices)

    d = a.shape.num_elements()
    sampled = topk_sample(d, k) if isinstance(k, int) and d is not None else None
    if sampled is None or _in_xla():
        return whole()   # (XLA pads the candidates to d: 7 s instead of 0.5 s)
    stride, rank = sampled
    sample = a[::stride]
    n = sample.shape.num_elements()
    threshold = tf.math.top_k(sample, n - rank + 1).values[-1]   # the rank-th smallest of the sample
    candidates = tf.where(a >= threshold)[:, 0]

    def among_candidates():
        picked = tf.math.top_k(tf.gather(a, candidates), k, sorted=False).indices
        return tf.sort(tf.cast(tf.gather(candidates, picked), tf.int32))
    return tf.cond(tf.size(candidates) >= k, among_candidates, whole)


def _in_xla():
    """Whether the graph being built is compiled by XLA (``tf.function(jit_compile=True)``); TensorFlow says so
    only through a module of its own internals (Keras asks it the same way)."""
    try:
        from tensorflow.python.ops import control_flow_util
        return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))
    except (ImportError, AttributeError):
        return False


def _topk_encode(c, x, seed):
    idx = _topk_indices(tf.abs(x), c.k_for(numel(x)))
    return [idx, tf.gather(x, idx)]


def _randk_indices(c, d, seed):
    return _random_indices(d, c.k_for(d), seed)


def _randk_encode(c, x, seed):
    d = numel(x)
    idx = _randk_indices(c, d, seed)
    values = tf.gather(x, idx)
    if c.unbiased:
        # d / k rounded in float64 as Python divides, then to x's dtype (k may be a tensor: see numel)
        values = values * tf.cast(_div(tf.cast(d, tf.float64), tf.cast(c.k_for(d), tf.float64)), x.dtype)
    return [values] if c.shared else [idx, values]


def _sparse_decode(c, parts, d, seed):
    if getattr(c, "shared", False):
        return _scatter(_randk_indices(c, d, seed), parts[0], d)
    return _scatter(parts[0], parts[1], d)


# IEEE layouts: (int type, mantissa bits, exponent bias, exponent of the smallest subnormal, magnitude mask)
_FLOAT_BITS = {tf.float32: (tf.int32, 23, 127, -149, 0x7FFFFFFF),
               tf.float64: (tf.int64, 52, 1023, -1074, 0x7FFFFFFFFFFFFFFF)}


def _exponent_fraction(x):
    """(e, f, sign, nonzero) with |x| = (1 + f / 2^mbits) * 2^e exactly for nonzero finite x (subnormals
    included), from the bits alone. ``e`` is int32, ``f`` the mantissa fraction in x's int type."""
    itype, mbits, bias, tiny, mask = _FLOAT_BITS[x.dtype]
    bits = tf.bitcast(x, itype)
    magnitude = tf.bitwise.bitwise_and(bits, tf.constant(mask, itype))
    field = tf.bitwise.right_shift(magnitude, tf.constant(mbits, itype))
    fraction = tf.bitwise.bitwise_and(magnitude, tf.constant(2 ** mbits - 1, itype))
    # a subnormal is fraction * 2^tiny; the fraction (< 2^mbits) is exact as a float of x's type, normal
    # there, and its own bits give the normalized exponent and fraction
    renormal = tf.bitcast(tf.cast(fraction, x.dtype), itype)
    sub_field = tf.bitwise.right_shift(renormal, tf.constant(mbits, itype))
    sub_fraction = tf.bitwise.bitwise_and(renormal, tf.constant(2 ** mbits - 1, itype))
    normal = field > 0
    exponent = tf.where(normal, field - bias, sub_field - bias + tiny)
    fraction = tf.where(normal, fraction, sub_fraction)
    return tf.cast(exponent, tf.int32), fraction, bits < 0, magnitude != 0


def _power_of_two(exponent, dtype, negative):
    """Exactly (-1)^negative * 2^exponent in dtype (int32 exponents; inf above the range, 0 below), by bits."""
    itype, mbits, bias, tiny, _ = _FLOAT_BITS[dtype]
    e = tf.cast(exponent, itype)
    one = tf.constant(1, itype)
    normal = tf.bitwise.left_shift(tf.clip_by_value(e + bias, 1, 2 * bias), tf.constant(mbits, itype))
    subnormal = tf.bitwise.left_shift(one, tf.clip_by_value(e - tiny, 0, mbits - 1))
    inf = tf.constant((2 * bias + 1) << mbits, itype)
    bits = tf.where(e > bias, inf, tf.where(e >= 1 - bias, normal, tf.where(e >= tiny, subnormal,
                                                                              tf.zeros_like(e))))
    sign = tf.constant(itype.min, itype)   # the sign bit alone
    bits = tf.where(negative, tf.bitwise.bitwise_or(bits, sign), bits)
    return tf.bitcast(bits, dtype)


def _natural_encode(c, x, seed):
    _, mbits, _, _, _ = _FLOAT_BITS[x.dtype]
    low_exp, fraction, negative, nonzero = _exponent_fraction(x)   # |x| in [2^low_exp, 2^(low_exp+1))
    if c.deterministic:
        up = fraction >= 2 ** (mbits - 1)                  # mantissa >= 0.75 in frexp's terms (ties go up)
    else:                                                  # P(up) = (|x| - low) / low: unbiased
        up = _uniform(numel(x), x.dtype, seed) < tf.cast(fraction, x.dtype) * tf.constant(2.0 ** -mbits, x.dtype)
    exp = low_exp + tf.cast(up, tf.int32)
    top = tf.reduce_max(tf.where(nonzero, exp, tf.fill(tf.shape(exp), tf.constant(tf.int32.min, tf.int32))))
    top = tf.where(tf.reduce_any(nonzero), top, tf.zeros_like(top))
    code = tf.minimum(top - exp + 1, 128)                   # 1..127 = exponent below the largest; 128 = too small
    code = tf.where(nonzero & (code <= 127), code, tf.zeros_like(code))
    code = code + 128 * tf.cast(negative & nonzero, tf.int32)
    return [tf.reshape(top, [1]), tf.cast(code, tf.uint8)]


def _natural_decode(c, parts, d, seed, dtype):
    top, code = parts
    code = tf.cast(code, tf.int32)
    magnitude_code = tf.bitwise.bitwise_and(code, 127)
    exponent = tf.where(magnitude_code == 0, tf.fill([d], tf.constant(tf.int32.min, tf.int32)),
                        tf.cast(top, tf.int32) - magnitude_code + 1)
    return _power_of_two(exponent, tf.as_dtype(dtype), code >= 128)


def _sign_encode(c, x, seed):
    d = numel(x)
    return [tf.reshape(_div(tf.reduce_sum(tf.abs(x)), tf.cast(d, x.dtype)), [1]), pack_bits(x < 0)]


def _sign_decode(c, parts, d, seed):
    scale, packed = parts
    return tf.where(unpack_bits(packed, d), -scale, scale)


def _onebit_encode(c, x, seed):
    d = numel(x)
    negative = x < 0
    n_neg = tf.reduce_sum(tf.cast(negative, tf.int64))
    zeros = tf.zeros_like(x)
    neg_sum = tf.reduce_sum(tf.where(negative, -x, zeros))
    pos_sum = tf.reduce_sum(tf.where(negative, zeros, x))
    means = tf.stack([_div(pos_sum, tf.cast(tf.maximum(tf.cast(d, tf.int64) - n_neg, 1), x.dtype)),
                      _div(neg_sum, tf.cast(tf.maximum(n_neg, 1), x.dtype))])
    return [means, pack_bits(negative)]


def _onebit_decode(c, parts, d, seed):
    means, packed = parts
    return tf.where(unpack_bits(packed, d), -means[1], means[0])


def _qsgd_encode(c, x, seed):
    # ||x|| as max|x| * ||x / max|x|||: the plain sum of squares overflows float32 from |x| ~ 1e19
    peak = tf.reduce_max(tf.abs(x))
    peak = tf.where(peak > 0, peak, tf.ones_like(peak))
    norm = peak * tf.sqrt(tf.reduce_sum(tf.square(_div(x, peak))))
    scaled = _div(tf.abs(x), tf.where(norm > 0, norm, tf.ones_like(norm))) * tf.constant(c.levels, x.dtype)
    lower = tf.floor(scaled)
    level = lower + tf.cast(_uniform(numel(x), x.dtype, seed) < scaled - lower, x.dtype)
    signed = tf.cast(tf.where(x < 0, -level, level), tf.int8 if c.levels <= 127 else tf.int16)
    return [tf.reshape(norm, [1]), signed]


def _qsgd_decode(c, parts, d, seed):
    norm, signed = parts
    return _div(norm * tf.cast(signed, norm.dtype), tf.constant(c.levels, norm.dtype))


def _bf16_encode(c, x, seed):
    if x.dtype == tf.float64:   # through float32 (the cast flushes what is subnormal there; the PyTorch kernel too)
        x = tf.cast(tf.where(tf.abs(x) < 2.0 ** -126, tf.zeros_like(x), x), tf.float32)
    return [tf.cast(x, tf.bfloat16)]


def _compose_encode(c, x, seed):
    idx, values = (_topk_encode if isinstance(c.first, C.TopK) else _randk_encode)(c.first, x, seed)
    return [idx] + encode(c.second, values, second_stage(seed))


def _compose_decode(c, parts, d, seed, dtype):
    idx, k = parts[0], c.first.k_for(d)
    return _scatter(idx, decode(c.second, parts[1:], k, second_stage(seed), dtype), d)


def _scaled_decode(c, parts, d, seed, dtype):
    out = decode(c.compressor, parts, d, seed, dtype)
    return out * tf.constant(c.lam, out.dtype)


# The kernels of each compressor class (see hvd_compress.kernels.registries)
_encode_tf, _decode_tf = registries("TensorFlow", [
        (C.TopK, _topk_encode, lambda c, parts, d, seed, dtype: _sparse_decode(c, parts, d, seed)),
        (C.RandK, _randk_encode, lambda c, parts, d, seed, dtype: _sparse_decode(c, parts, d, seed)),
        (C.Natural, _natural_encode, _natural_decode),
        (C.ScaledSign, _sign_encode, lambda c, parts, d, seed, dtype: _sign_decode(c, parts, d, seed)),
        (C.OneBit, _onebit_encode, lambda c, parts, d, seed, dtype: _onebit_decode(c, parts, d, seed)),
        (C.QSGD, _qsgd_encode, lambda c, parts, d, seed, dtype: _qsgd_decode(c, parts, d, seed)),
        (C.BFloat16, _bf16_encode, lambda c, parts, d, seed, dtype: tf.cast(parts[0], dtype)),
        (C.Compose, _compose_encode, _compose_decode),
        (C.Scaled, lambda c, x, seed: encode(c.compressor, x, seed), _scaled_decode),
        (C.Identity, lambda c, x, seed: [x], lambda c, parts, d, seed, dtype: parts[0])])


def encode(c, x, seed=0):
    """Parts of the payload of flat tensor x (float32 or float64), in the order of ``c.layout(d)``: with the
    fused C kernels where they apply (``hvd_compress.tensorflow.fused``), else TensorFlow's ops."""
    if fused.usable(c, x.dtype, x):
        return fused.encode(c, x, seed, lambda: _encode_tf(c, x, seed))
    return _encode_tf(c, x, seed)


def decode(c, parts, d, seed=0, dtype=tf.float32):
    """The dense flat tensor of d elements that the parts encode. ``dtype`` matters only where no part
    carries values (Natural)."""
    value_dtype = dtype if isinstance(unscaled(c)[0], C.Natural) else parts[0].dtype
    if fused.usable(c, value_dtype, *parts, decoding=True):
        return fused.decode(c, parts, d, value_dtype)
    return _decode_tf(c, parts, d, seed, dtype)


# TensorFlow's ops alone, never the C kernels (their fallback)
encode_ops, decode_ops = _encode_tf, _decode_tf


# ---- payloads as bytes -------------------------------------------------------------------------------------

def part_dtypes(c, d, value_dtype):
    """The dtypes of the parts (``c.layout(d)``)."""
    return [tf.as_dtype(value_dtype) if kind == C.VALUE else _DTYPES[kind] for kind, _ in c.layout(d)]


def wire_dtypes(c, d, value_dtype):
    """The dtypes of the parts that travel (``c.wire_layout(d)``)."""
    return [tf.as_dtype(value_dtype) if kind == C.VALUE else _DTYPES[kind] for kind, _ in c.wire_layout(d)]


def _packing_order(dtypes):
    # widest parts first, so that every part starts at an offset aligned to its item size (stable)
    return sorted(range(len(dtypes)), key=lambda i: -dtypes[i].size)


def _as_bytes(part):
    if part.dtype == tf.uint8:
        return tf.reshape(part, [-1])
    return tf.reshape(tf.bitcast(part, tf.uint8), [-1])


def index_to_wire(idx, d):
    """Increasing int32 indices into d elements as they travel (``Compressor.wire_layout``): their low 16 bits
    (int16), and how many lie below the end of each block of 2^16 elements but the last (int32)."""
    idx = tf.cast(idx, tf.int32)
    low = tf.cast(tf.bitwise.bitwise_and(idx + 32768, 0xFFFF) - 32768, tf.int16)
    n = C.index_counts(d)
    if not n:
        return [low, tf.zeros([0], tf.int32)]
    counts = tf.math.unsorted_segment_sum(tf.ones_like(idx), idx // C.INDEX_BLOCK, n + 1)
    return [low, tf.cumsum(counts)[:n]]


def index_from_wire(low, below):
    """The int32 indices of ``index_to_wire``: the j-th one lies in the block of how many ``below`` are <= j."""
    k = tf.shape(low)[0]   # static in a payload, not in an exact slice (data-dependent count)
    starts = tf.tensor_scatter_nd_add(tf.zeros([k + 1], tf.int32), tf.reshape(below, [-1, 1]), tf.ones_like(below))
    block = tf.cumsum(starts)[:k]
    return block * C.INDEX_BLOCK + tf.bitwise.bitwise_and(tf.cast(low, tf.int32), 0xFFFF)


def pack(c, parts, d):
    """The parts of compressor c on d elements as one 1-D uint8 tensor: the bytes that travel."""
    wire = [tf.convert_to_tensor(p) for p in to_wire(c, parts, d, index_to_wire)]
    order = _packing_order([p.dtype for p in wire])
    return tf.concat([_as_bytes(wire[i]) for i in order], axis=0)


def unpack(c, data, d, value_dtype):
    """Inverse of ``pack`` for compressor c on d elements."""
    dtypes = wire_dtypes(c, d, value_dtype)
    lengths = [n for _, n in c.wire_layout(d)]
    data = tf.reshape(data, [-1])
    total = sum(n * dt.size for n, dt in zip(lengths, dtypes))
    if isinstance(total, int) and data.shape[0] is not None and data.shape[0] != total:
        raise ValueError(f"payload of {data.shape[0]} bytes, expected {total} for {c!r} on {d} elements")
    order, parts = _packing_order(dtypes), [None] * len(dtypes)
    # one split with static sizes: static shapes even where data's length is not, and few ops to trace
    chunks = tf.split(data, [lengths[i] * dtypes[i].size for i in order]) if len(order) > 1 else [data]
    for i, chunk in zip(order, chunks):
        n, dtype = lengths[i], dtypes[i]
        if dtype == tf.uint8:
            parts[i] = tf.reshape(chunk, [n])
        elif dtype.size == 1:
            parts[i] = tf.bitcast(tf.reshape(chunk, [n]), dtype)
        else:
            parts[i] = tf.bitcast(tf.reshape(chunk, [n, dtype.size]), dtype)
    return from_wire(c, parts, d, index_from_wire)


def compute_dtype(dtype):
    """Half-precision gradients are compressed in float32 (and their error buffers kept in float32)."""
    dtype = tf.as_dtype(dtype)
    if not dtype.is_floating:
        raise TypeError(f"gradients must be floating point, got {dtype}")
    return dtype if dtype in (tf.float32, tf.float64) else tf.float32


def apply(c, x, seed=0):
    """C(x) for a tensor of any (static) shape, returned in x's dtype."""
    x = tf.convert_to_tensor(x)
    flat = tf.reshape(tf.cast(x, compute_dtype(x.dtype)), [-1])
    d = numel(x)
    out = decode(c, encode(c, flat, seed), d, seed, flat.dtype)
    return tf.reshape(tf.cast(out, x.dtype), x.shape)


def precondition(config, g, u_in, n):
    """Deep Gradient Compression's local clipping (for ``n`` ranks), then its momentum correction: (what is
    compressed or averaged in g's place, the new velocity u <- m u + g or None). The simulation's formulas."""
    if config.clip:
        g = clip_norm(g, config.clip_threshold(n))
    if not config.momentum:
        return g, None
    velocity = g + config.momentum * u_in
    return (g + config.momentum * velocity if config.nesterov else velocity), velocity


def clip_norm(x, max_norm):
    """x scaled down to norm ``max_norm`` if it is longer (the PyTorch kernel's formula, see
    ``compressors.check_clip``); a non-finite x stays non-finite."""
    norm = tf.sqrt(tf.reduce_sum(tf.square(x)))
    return x * tf.minimum(_div(tf.constant(max_norm, x.dtype), norm + tf.constant(1e-6, x.dtype)),
                          tf.constant(1.0, x.dtype))
