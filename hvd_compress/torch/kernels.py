"""PyTorch kernels: encode / decode of every compressor, and payload packing into real bytes.

``encode(c, x, seed)`` turns a flat floating tensor into the parts that ``c.layout(d)`` describes;
``decode(c, parts, d, seed)`` turns them back into a dense flat tensor. Everything stays on x's device
(no host round trips). Random compressors draw from a generator seeded by ``seed`` alone, so a call is
reproducible from (compressor, x, seed): that is what makes a multi-rank run equal its simulation. A seed
is an integer or a (key, step) pair (see ``hvd_compress.seeds``).

On the CPU (float32 / float64, contiguous tensors) the work runs in the fused C kernels of
``hvd_compress.fused`` (one or two passes over memory per call; ``step`` does a worker's whole step:
x = g + e, encode, the new error x - decode, statistics; ``step_packed`` the same with the payload written
straight into its packed bytes; ``decode_mean`` decodes and averages n payloads in one pass). Elsewhere,
or with ``HVD_COMPRESS_FUSED=0``, or without a C compiler, the same functions run as torch ops. Both paths
draw the same random numbers (a counter-based hash of the element index and the seed, ``_uniform``) and give
the same payloads up to the rounding of a reduction (a scale, a mean, a norm); each path is bitwise consistent
with itself: ``decode`` of a payload is exactly what ``step`` subtracts, and ``apply`` equals ``step``'s C(x).
"""
import math
import threading
import weakref

import torch

from .. import compressors as C
from .. import transport as T
from ..kernels import from_wire, registries, to_wire, topk_sample, unscaled
from ..seeds import hash_keys, second_stage, splitmix64
from .. import fused

_DTYPES = {C.INT32: torch.int32, C.UINT8: torch.uint8, C.INT8: torch.int8, C.INT16: torch.int16,
           C.BF16: torch.bfloat16, C.INDEX: torch.int32}


def _generator(seed, device):
    # torch's CPU generator keeps only the low 32 bits of a seed, so mix first
    g = torch.Generator(device=device)
    g.manual_seed(splitmix64(seed) >> 1)
    return g


def _mix32(h):
    # "lowbias32" on uint32 values held in an int64 tensor (products wrap mod 2^64: the low 32 bits are right)
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & 0xFFFFFFFF
    h = h ^ (h >> 15)
    h = (h * 0x846CA68B) & 0xFFFFFFFF
    return h ^ (h >> 16)


def _hash32(d, seed, device):
    """The counter-based stream: h_i = mix32(mix32(i ^ k1) + k2) for i < d (uint32 values, int64 tensor).
    The fused C kernels compute the same numbers element by element (hvd_compress/csrc/fused.c)."""
    k1, k2 = hash_keys(seed)
    i = torch.arange(d, dtype=torch.int64, device=device)
    return _mix32((_mix32(i ^ k1) + k2) & 0xFFFFFFFF)


def _uniform(x, seed):
    """Uniform draws in [0, 1) of x's shape and dtype, one per element: float32 (h >> 8) 2^-24, float64 h 2^-32."""
    h = _hash32(x.numel(), seed, x.device)
    if x.dtype == torch.float64:
        u = h.to(torch.float64).mul_(2.0 ** -32)
    else:
        u = (h >> 8).to(torch.float32).mul_(2.0 ** -24).to(x.dtype)
    return u.view(x.shape)


def _draws_below(m, d, seed, device):
    """RandK's m iid uniform draws in [0, d), d < 2^31: with hi, lo the counter-based stream's values 2t and 2t + 1,
    (hi d + (lo d >> 32)) >> 32 = floor((hi 2^32 + lo) d / 2^64) exactly (a bias below d / 2^64); the C kernels
    draw the same numbers (hvd_compress/csrc/fused.c, draws_below)."""
    h = _hash32(2 * m, seed, device)
    return (h[0::2] * d + ((h[1::2] * d) >> 32)) >> 32


def _random_indices(d, k, seed, device):
    """A uniformly random k-subset of range(d), in increasing order (the kernels walk it block by block, as
    TensorFlow's draws come too). For k << d, the first k distinct values of 1.25 k + 16 iid uniform draws (each
    new value is uniform over those not seen yet) instead of an O(d) permutation; a permutation where they hold
    fewer than k distinct values (rare) and for k > d / 8."""
    def permuted():
        return torch.randperm(d, generator=_generator(seed, device), device=device)[:k].sort().values

    if 8 * k > d:
        return permuted()
    m = k + k // 4 + 16
    lib = fused.lib() if device == "cpu" or getattr(device, "type", None) == "cpu" else None
    if lib is not None:   # the same subset, drawn and marked in a bitmap in C instead of sorted
        out = torch.empty(k + 2, dtype=torch.int64)
        k1, k2 = hash_keys(seed)
        if lib.dll.hvdc_first_distinct(m, k, d, k1, k2, _marks(d).data_ptr(), out.data_ptr()) == k:
            return out[:k]
        return permuted()
    draws = _draws_below(m, d, seed, device)
    values, inverse = torch.unique(draws, return_inverse=True)
    if values.numel() < k:   # too many repeats (rare): a permutation decides
        return permuted()
    position = torch.arange(draws.numel(), device=device)
    first = torch.full_like(values, draws.numel()).scatter_reduce_(0, inverse, position, "amin")
    return values[torch.argsort(first)[:k]].sort().values


# ---- bit packing ----------------------------------------------------------------------------------------

_GATHER_BITS = 0x0102040810204080        # x 8 flag bytes (one little-endian int64) -> the 8 flags in its top byte


def pack_bits(bits):
    """bool tensor of d -> uint8 tensor of ceil(d/8), 8 flags per byte (little-endian bit order)."""
    d = bits.numel()
    if d % 8 == 0 and bits.is_contiguous() and bits.storage_offset() % 8 == 0:
        padded = bits.view(torch.uint8)                  # no copy
    else:
        padded = torch.zeros((d + 7) // 8 * 8, dtype=torch.uint8, device=bits.device)
        padded[:d] = bits
    # the 8 flag bytes of an int64 times _GATHER_BITS land, without carries, as bits 56..63 (flag j at 56 + j)
    return (((padded.view(torch.int64) * _GATHER_BITS) >> 56) & 255).to(torch.uint8)


def unpack_bits(packed, d):
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.view(-1, 1) >> shifts) & 1).view(-1)[:d].bool()


# ---- the compressors --------------------------------------------------------------------------------------

def _topk_indices(a, k):
    """Indices of the k largest elements of a, in increasing order (``_top``). torch.topk over millions of
    elements is many times slower than a pass over memory, so large tensors first keep the candidates above a
    threshold estimated from a strided sample (about 2k of them), and select among those alone; when fewer
    than k pass (a skewed sample), the whole tensor is selected from."""
    sampled = topk_sample(a.numel(), k)
    if sampled is not None:
        stride, rank = sampled
        candidates = torch.nonzero(a >= torch.kthvalue(a[::stride], rank).values).squeeze(1)
        if candidates.numel() >= k:
            return candidates[_top(a[candidates], k)]
    return _top(a, k)


def _top(a, k):
    """Positions of the k largest elements of a, in increasing order; of those equal to the k-th largest, the
    first ones. One rule for every path (the C kernel's ``topk_pick`` too), so that the sets agree on ties, and
    the order in which a composition's second stage draws for the values too."""
    t = torch.kthvalue(a, a.numel() - k + 1).values
    keep = a > t
    keep[torch.nonzero(a == t).squeeze(1)[:k - int(keep.sum())]] = True
    idx = torch.nonzero(keep).squeeze(1)
    return idx if idx.numel() == k else torch.topk(a, k, sorted=False).indices.sort().values   # NaN in a


def _topk_encode(c, x, seed):
    idx = _topk_indices(x.abs(), c.k_for(x.numel()))
    return [idx.to(torch.int32), x[idx]]


def _randk_indices(c, d, seed, device):
    return _random_indices(d, c.k_for(d), seed, device)


def _randk_encode(c, x, seed):
    d = x.numel()
    idx = _randk_indices(c, d, seed, x.device)
    values = x[idx] * (d / idx.numel()) if c.unbiased else x[idx]
    return [values] if c.shared else [idx.to(torch.int32), values]


def _scatter(idx, values, d):
    out = torch.zeros(d, dtype=values.dtype, device=values.device)
    out[idx.long()] = values
    return out


def _sparse_decode(c, parts, d, seed):
    if getattr(c, "shared", False):
        return _scatter(_randk_indices(c, d, seed, parts[0].device), parts[0], d)
    return _scatter(parts[0], parts[1], d)


# IEEE layouts: (int type, mantissa bits, exponent bias)
_FLOAT_BITS = {torch.float32: (torch.int32, 23, 127), torch.float64: (torch.int64, 52, 1023)}
_NO_EXPONENT = -(2 ** 30)      # stands in for the exponent of a zero: below any real one, no int32 overflow


def _natural_encode(c, x, seed):
    """The exponent and mantissa fraction straight from the float's bits instead of torch.frexp (whose CPU
    kernel is not vectorized), with few fresh tensors (page faults cost more than the arithmetic). Exactly
    frexp's answer for zeros and normal numbers; tensors with a subnormal, an inf or a NaN, and other devices,
    take the general path."""
    itype, mbits, bias = _FLOAT_BITS[x.dtype]
    if x.device.type != "cpu":
        return _natural_encode_general(c, x, seed)
    bits = x.view(itype)
    magnitude = bits & torch.iinfo(itype).max           # without the sign bit
    zero = magnitude == 0
    exp = magnitude >> mbits                            # the biased exponent field: |x| in [2^(e-bias), 2^(e-bias+1))
    if exp.max() == 2 * bias + 1 or exp.masked_fill_(zero, 1).min() == 0:   # (one sync; on CPU only)
        return _natural_encode_general(c, x, seed)      # an inf or NaN, or a subnormal (exponent field 0)
    nonzero = zero.logical_not()
    if c.deterministic:
        up = (magnitude & (2 ** mbits - 1)) >= 2 ** (mbits - 1)    # frexp's mantissa >= 0.75 (ties go up)
    else:
        fraction = (magnitude & (2 ** mbits - 1)).to(x.dtype).mul_(2.0 ** -mbits)   # = 2 * mantissa - 1, exactly
        up = _uniform(x, seed) < fraction
    exp.add_(up).sub_(bias)
    if exp.dtype != torch.int32:
        exp = exp.to(torch.int32)
    exp.masked_fill_(zero, _NO_EXPONENT)
    top = exp.max()
    top = torch.where(top > _NO_EXPONENT, top, torch.zeros_like(top))   # all zero: 0, as frexp's path gives
    code = exp.neg_().add_(top + 1)                     # 1..127 = exponent below the largest
    code.masked_fill_(code > 127, 0)                    # too small, or zero
    byte = code.to(torch.uint8)
    sign = torch.signbit(x).logical_and_(nonzero)
    return [top.reshape(1).to(torch.int32), byte.add_(sign.view(torch.uint8), alpha=128)]


def _natural_encode_general(c, x, seed):
    mantissa, exponent = torch.frexp(x.abs())          # |x| = m * 2^e, m in [0.5, 1)
    low_exp = exponent - 1                               # |x| lies in [2^low_exp, 2^(low_exp+1))
    if c.deterministic:
        up = mantissa >= 0.75                            # nearer to the upper power (ties go up)
    else:
        up = _uniform(x, seed) < 2 * mantissa - 1        # P(up) = (|x| - low) / low: unbiased
    exp = low_exp + up.to(low_exp.dtype)
    nonzero = mantissa != 0
    top = torch.where(nonzero, exp, torch.full_like(exp, torch.iinfo(exp.dtype).min)).max()
    top = torch.where(nonzero.any(), top, torch.zeros_like(top))
    code = (top - exp + 1).clamp_(max=128)               # 1..127 = exponent below the largest; 128 = too small
    code = torch.where(nonzero & (code <= 127), code, torch.zeros_like(code)).to(torch.uint8)
    return [top.reshape(1).to(torch.int32), code | (torch.signbit(x) & nonzero).to(torch.uint8) << 7]


def _natural_decode(c, parts, d, seed, dtype):
    top, code = parts
    # the 256 possible values of a byte, computed as before (ldexp, zero, sign), then looked up
    every = torch.arange(256, dtype=torch.int32, device=code.device)
    magnitude_code = every & 127
    value = torch.ldexp(torch.ones(256, dtype=dtype, device=code.device), top - magnitude_code + 1)
    value = torch.where(magnitude_code == 0, torch.zeros_like(value), value)
    table = torch.where(every >= 128, -value, value)
    return table[code.to(torch.int32)]


def _sign_encode(c, x, seed):
    return [(x.abs().sum() / x.numel()).reshape(1), pack_bits(x < 0)]


def _flip_sign(flags, value):
    """where(flags, -value, value) for a one-element value, exactly (the sign bit, through its integer view)."""
    itype, shift = (torch.int32, 31) if value.dtype == torch.float32 else (torch.int64, 63)
    out = flags.to(itype).bitwise_left_shift_(shift)    # one fresh tensor, then in place
    return out.bitwise_xor_(value.view(itype)).view(value.dtype)


def _sign_decode(c, parts, d, seed):
    scale, packed = parts
    return _flip_sign(unpack_bits(packed, d), scale)


def _onebit_encode(c, x, seed):
    negative = x < 0
    n_neg = negative.sum()
    # the sums of where(negative, -x, 0) and where(negative, 0, x), with two fresh tensors instead of five:
    # summing the negative values (-0.0 elsewhere) in the same order gives exactly the negated sum (all terms
    # share a sign); 0 - s and not -s, for +0.0 when there is no negative value
    neg_sum = 0.0 - x.masked_fill(~negative, -0.0).sum()
    pos_sum = x.masked_fill(negative, 0.0).sum()
    means = torch.stack([pos_sum / (x.numel() - n_neg).clamp(min=1), neg_sum / n_neg.clamp(min=1)])
    return [means, pack_bits(negative)]


def _onebit_decode(c, parts, d, seed):
    means, packed = parts
    # an exact where(flags, -means[1], means[0]) on the bits: pos ^ ((pos ^ neg) & -flag), in place
    itype = torch.int32 if means.dtype == torch.float32 else torch.int64
    pos, neg = means[0:1].view(itype), (-means[1:2]).view(itype)
    out = unpack_bits(packed, d).to(itype).neg_()
    return out.bitwise_and_(pos ^ neg).bitwise_xor_(pos).view(means.dtype)


def _qsgd_encode(c, x, seed):
    # ||x|| as max|x| * ||x / max|x|||: the plain sum of squares overflows float32 from |x| ~ 1e19
    peak = x.abs().max()
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    norm = peak * torch.linalg.vector_norm(x / peak)
    scaled = x.abs() / torch.where(norm > 0, norm, torch.ones_like(norm)) * c.levels
    lower = scaled.floor()
    level = lower + (_uniform(x, seed) < scaled - lower).to(x.dtype)
    signed = torch.where(x < 0, -level, level).to(torch.int8 if c.levels <= 127 else torch.int16)
    return [norm.reshape(1), signed]


def _qsgd_decode(c, parts, d, seed):
    norm, signed = parts
    return norm * signed.to(norm.dtype) / c.levels


def _bf16_encode(c, x, seed):
    if x.dtype == torch.float64:   # through float32, as TensorFlow casts, which flushes what is subnormal there
        x = torch.where(x.abs() < 2.0 ** -126, torch.zeros_like(x), x).float()
    return [x.to(torch.bfloat16)]


def _compose_encode(c, x, seed):
    idx, values = (_topk_encode if isinstance(c.first, C.TopK) else _randk_encode)(c.first, x, seed)
    return [idx] + encode(c.second, values, second_stage(seed))


def _compose_decode(c, parts, d, seed, dtype):
    idx = parts[0]
    return _scatter(idx, decode(c.second, parts[1:], idx.numel(), second_stage(seed), dtype), d)


def encode(c, x, seed=0):
    """Parts of the payload of flat tensor x (float32 or float64), in the order of ``c.layout(d)``."""
    lib = _fused_lib(x)
    if lib is not None:
        inner, lam = unscaled(c)
        if isinstance(inner, _FUSED_ENCODE):
            done = _step_fused(lib, inner, lam, x, None, None, seed)
            if done is not None:
                return done[0]
    return _encode_torch(c, x, seed)


# The kernels of each compressor class (see hvd_compress.kernels.registries)
_encode_torch, _decode_torch = registries("PyTorch", [
        (C.TopK, _topk_encode, lambda c, parts, d, seed, dtype: _sparse_decode(c, parts, d, seed)),
        (C.RandK, _randk_encode, lambda c, parts, d, seed, dtype: _sparse_decode(c, parts, d, seed)),
        (C.Natural, _natural_encode, _natural_decode),
        (C.ScaledSign, _sign_encode, lambda c, parts, d, seed, dtype: _sign_decode(c, parts, d, seed)),
        (C.OneBit, _onebit_encode, lambda c, parts, d, seed, dtype: _onebit_decode(c, parts, d, seed)),
        (C.QSGD, _qsgd_encode, lambda c, parts, d, seed, dtype: _qsgd_decode(c, parts, d, seed)),
        (C.BFloat16, _bf16_encode, lambda c, parts, d, seed, dtype: parts[0].to(dtype)),
        (C.Compose, _compose_encode, _compose_decode),
        (C.Scaled, lambda c, x, seed: encode(c.compressor, x, seed),
         lambda c, parts, d, seed, dtype: decode(c.compressor, parts, d, seed, dtype) * c.lam),
        (C.Identity, lambda c, x, seed: [x], lambda c, parts, d, seed, dtype: parts[0])])


def decode(c, parts, d, seed=0, dtype=torch.float32):
    """The dense flat tensor of d elements that the parts encode. ``dtype`` matters only where no part
    carries values (Natural)."""
    inner, lam = unscaled(c)
    if isinstance(inner, _FUSED_DECODE):
        dtype = parts[0].dtype if not isinstance(inner, C.Natural) else dtype
        lib = _fused_lib(parts[-1], dtype=dtype)
        if lib is not None:
            out = torch.empty(d, dtype=dtype)
            _decode_fused(lib, inner, lam, parts, d, out, False, 0)
            return out
    return _decode_torch(c, parts, d, seed, dtype)


def decode_sum(c, payloads, d, seed, dtype):
    """sum_j decode(payload_j), added in row order, from the rows of ``payloads`` (packed bytes, one row
    per rank). Sparse payloads are added into one dense tensor instead of decoded one dense tensor each
    (the same sums: 0 + v is v)."""
    if isinstance(c, C.TopK) or isinstance(c, C.RandK) and not c.shared:
        total = torch.zeros(d, dtype=dtype, device=payloads.device)
        for row in payloads:
            idx, values = unpack(c, row, d, dtype)
            total.index_add_(0, idx, values)
        return total
    total = None
    for row in payloads:
        decoded = decode(c, unpack(c, row, d, dtype), d, seed, dtype)
        total = decoded if total is None else total + decoded
    return total


# ---- the fused step (C kernels on the CPU) -------------------------------------------------------------------

_FUSED_ENCODE = (C.TopK, C.Natural, C.ScaledSign, C.OneBit, C.QSGD)
_FUSED_STEP = _FUSED_ENCODE + (C.RandK, C.Identity, C.Compose)
_FUSED_DECODE = (C.Natural, C.ScaledSign, C.OneBit, C.QSGD)
_FLOATS = (torch.float32, torch.float64)


def _fused_lib(*tensors, dtype=None):
    """The fused library, when it is on and every given tensor is one it can take (None otherwise)."""
    for t in tensors:
        if t is not None and (t.device.type != "cpu" or not t.is_contiguous()
                              or t.is_floating_point() and t.dtype not in _FLOATS):
            return None
    if dtype is not None and dtype not in _FLOATS:
        return None
    return fused.lib()


def _ptr(t):
    return None if t is None else t.data_ptr()


def _stats(residual, sumsq, finite):
    return torch.tensor([max(residual, 0.0), sumsq, 1.0 if finite else 0.0], dtype=torch.float64)


def _sparse_fixup(kept, values, lam, idx, e_out, sumsq):
    """A sparsifier's step after its k coordinates are chosen: e_out at them = kept - decode (values * lam),
    the rest of e_out already holds x; returns ||x - C(x)||^2 from ||x||^2 (sumsq) with the kept part swapped."""
    decoded = values * lam if lam != 1.0 else values
    left = kept - decoded
    if e_out is not None:
        e_out.index_copy_(0, idx, left)   # (indexing with [] is several times slower on CPU)
    kd, ld = kept.double(), left.double()
    return sumsq - torch.dot(kd, kd).item() + torch.dot(ld, ld).item()


def _materialize(ns, g, e_in, e_out, st):
    """x = g + e_in (into e_out when given, else a fresh tensor; g itself without e_in), with st = [sum x^2,
    finiteness] from the same pass."""
    xout = e_out if e_out is not None else (torch.empty_like(g) if e_in is not None else None)
    bad = ns.addx(_ptr(g), _ptr(e_in), _ptr(xout), g.numel(), st.data_ptr())
    return (g if xout is None else xout), not bad


def _natural_table(top, dtype, lam):
    """The 256 values a Natural byte decodes to (exactly as ``_natural_decode`` computes them), times lam."""
    table = _natural_decode(None, [torch.tensor(top, dtype=torch.int32), torch.arange(256, dtype=torch.uint8)],
                            256, 0, dtype)
    return table * lam if lam != 1.0 else table


# ---- a deferred error correction (ScaledSign, OneBit) -----------------------------------------------------------
# Their new error x - value needs the scale of all of x first: a second pass over memory. With ``defer`` the
# step leaves x in e_out and records what it owes (the two values, positive and negative side); the next step
# that reads the buffer subtracts them while it loads it (the same float operations: the same bits). Whatever
# else reads an error buffer calls ``settle`` first (checkpoints, momentum masking, the general path).
_owed = {}   # id(base tensor) -> (weak reference to it, {(data_ptr, numel) of a part: tensor [vpos, vneg]})


def _base(t):
    return t if t._base is None else t._base


def _parts_owing(e):
    """{(data_ptr, numel): correction} of the parts of e's base tensor that owe one (changed in place), or None."""
    base = _base(e)
    entry = _owed.get(id(base))
    return entry[1] if entry is not None and entry[0]() is base else None


def _defer(e, vpos, vneg):
    parts, base = _parts_owing(e), _base(e)
    if parts is None:
        key = id(base)

        def forget(ref):   # the buffer is gone: its memory and id may come back as another tensor's
            if _owed.get(key, (None,))[0] is ref:
                del _owed[key]
        parts = {}
        _owed[key] = (weakref.ref(base, forget), parts)
    parts[(e.data_ptr(), e.numel())] = torch.tensor([vpos, vneg], dtype=e.dtype)


def _owed_by(e):
    """The correction [vpos, vneg] that buffer e still owes as a whole, or None."""
    parts = None if e is None else _parts_owing(e)
    return None if parts is None else parts.get((e.data_ptr(), e.numel()))


def _forget(e):
    """e is about to be written whole: what it owes as a whole is void; a part of its base that overlaps it
    under other bounds (after a change of transport) is settled first."""
    parts = None if e is None else _parts_owing(e)
    if parts:
        parts.pop((e.data_ptr(), e.numel()), None)
        settle(e)


def settle(e):
    """Apply in place every deferred correction owed by error buffer e, or by a part of its base tensor that
    overlaps it (a no-op for the others)."""
    parts = None if e is None else _parts_owing(e)
    if not parts:
        return e
    base, size = _base(e), e.element_size()
    lo, hi = e.data_ptr(), e.data_ptr() + e.numel() * size
    for (ptr, n), corr in list(parts.items()):
        if ptr < hi and ptr + n * size > lo:
            del parts[(ptr, n)]
            x = base.view(-1)[(ptr - base.data_ptr()) // size:][:n]
            x.sub_(torch.where(x < 0, corr[1], corr[0]))   # x - value, as the step would have
    return e


def _step_fused(lib, c, lam, g, e_in, e_out, seed, into=None, defer=False):
    """((parts, stats)) of compressor c (unscaled; lam the Scaled factor) with the C kernels, or None where the
    general path must decide (a non-finite or subnormal input for the kernels that cannot take one). ``into``:
    tensors for the parts, in layout order (views of a packed payload, see ``step_packed``), which the dense
    kernels (sign, onebit, Natural, QSGD) write and return; the others ignore it. ``defer``: see ``_defer``."""
    d, dtype = g.numel(), g.dtype
    ns = lib.f if dtype == torch.float32 else lib.d
    st = torch.zeros(8, dtype=torch.float64)
    sp = st.data_ptr()
    G, E, O = _ptr(g), _ptr(e_in), _ptr(e_out)
    if isinstance(c, (C.ScaledSign, C.OneBit)):
        bits = into[1] if into else torch.empty((d + 7) // 8, dtype=torch.uint8)
        R = _ptr(_owed_by(e_in))
        if isinstance(c, C.ScaledSign):
            if ns.sign1(G, E, R, O, d, bits.data_ptr(), sp):
                return None
            sumsq, sumabs = st[0].item(), st[1].item()
            head = torch.tensor([sumabs / d if d else math.nan], dtype=dtype)
            vals = head * lam if lam != 1.0 else head
            vpos, vneg = vals.item(), (-vals).item()
            npos, nneg, spos, sneg = d, 0, sumabs, 0.0
        else:
            if ns.onebit1(G, E, R, O, d, bits.data_ptr(), sp):
                return None
            sumsq, spos, sneg, nneg = st[0].item(), st[1].item(), st[2].item(), int(st[3].item())
            npos = d - nneg
            head = torch.tensor([spos / max(npos, 1), (0.0 - sneg) / max(nneg, 1)], dtype=dtype)
            vals = head * lam if lam != 1.0 else head
            vpos, vneg = vals[0].item(), (-vals[1]).item()
        if e_out is not None and not defer:
            ns.select2(G, E, O, d, vpos, vneg, sp)
            residual = st[0].item()
        else:   # sum over both groups of (x - value)^2, in closed form
            if e_out is not None:
                _defer(e_out, vpos, vneg)
            residual = sumsq - 2 * vpos * spos + npos * vpos * vpos - 2 * vneg * sneg + nneg * vneg * vneg if d else 0.0
        return _parts_into(into, [head, bits]), _stats(residual, sumsq, True)
    if isinstance(c, C.Natural):
        code = into[1] if into else torch.empty(d, dtype=torch.uint8)
        top = torch.zeros(1, dtype=torch.int64)
        k1, k2 = (0, 0) if c.deterministic else hash_keys(seed)
        if lam == 1.0:   # one pass (the values decoded do not depend on the largest exponent)
            tops = torch.empty(fused.blocks(d) + 1, dtype=torch.int64)
            if ns.natural_step(G, E, O, d, int(c.deterministic), k1, k2, code.data_ptr(), top.data_ptr(),
                               tops.data_ptr(), sp):
                return None
            return _parts_into(into, [top.to(torch.int32), code]), _stats(st[0].item(), st[1].item(), True)
        if ns.natural1(G, E, O, d, int(c.deterministic), k1, k2, code.data_ptr(), top.data_ptr(), sp):
            return None
        sumsq, top = st[0].item(), int(top.item())
        table = _natural_table(top, dtype, lam)
        ns.natural2(G, E, O, d, top, code.data_ptr(), table.data_ptr(), sp)
        return _parts_into(into, [torch.tensor([top], dtype=torch.int32), code]), _stats(st[0].item(), sumsq, True)
    if isinstance(c, C.QSGD):
        if ns.qsgd1(G, E, O, d, sp):
            return None
        sumsq, peak = st[0].item(), st[1].item()
        if dtype == torch.float64 and (peak > 1e150 or 0 < peak < 1e-150):   # the sum of squares over/underflows
            x = e_out if e_out is not None else (g if e_in is None else g + e_in)
            norm = peak * torch.linalg.vector_norm(x / peak).item()
        else:
            norm = math.sqrt(sumsq)
        head = torch.tensor([norm], dtype=dtype)
        wide = c.levels > 127
        levels = into[1] if into else torch.empty(d, dtype=torch.int16 if wide else torch.int8)
        k1, k2 = hash_keys(seed)
        ns.qsgd2(G, E, O, d, head.item(), float(c.levels), lam, k1, k2, levels.data_ptr(), int(wide), sp)
        return _parts_into(into, [head, levels]), _stats(st[0].item(), sumsq, True)
    if isinstance(c, C.TopK):
        k = c.k_for(d)
        sampled = topk_sample(d, k)
        if sampled is None:
            x, finite = _materialize(ns, g, e_in, e_out, st)
            if not finite:
                return None
            idx = _top(x.abs(), k)
            values = x[idx]
        else:   # the sampled threshold of _topk_indices, its candidates found in the one pass
            step, rank = sampled
            sample = (g[::step] if e_in is None else g[::step] + e_in[::step]).abs()
            threshold = torch.kthvalue(sample, rank).values.item()
            cap = min(d, 3 * k + 1024)
            cidx, cval = _scratch("cidx", cap, torch.int64), _scratch("cval", cap, dtype)
            count = ns.topk1(G, E, O, d, threshold, cidx.data_ptr(), cval.data_ptr(), cap, sp)
            if st[1].item() != 0.0:
                return None
            if k <= count <= cap:
                idx32, values = into if into else (torch.empty(k, dtype=torch.int32), torch.empty(k, dtype=dtype))
                fix = st[4:6]
                ns.topk_pick(cidx.data_ptr(), cval.data_ptr(), count, k, _scratch("ckeys", count, dtype).data_ptr(),
                             O, lam, idx32.data_ptr(), values.data_ptr(), fix.data_ptr())
                residual = st[0].item() - fix[0].item() + fix[1].item()
                return [idx32, values], _stats(residual, st[0].item(), True)
            else:   # a skewed sample: the whole tensor is selected from
                x = e_out if e_out is not None else (g if e_in is None else g + e_in)
                idx = _top(x.abs(), k)
                values = x[idx]
        sumsq = st[0].item()
        residual = _sparse_fixup(values, values, lam, idx, e_out, sumsq)
        return _parts_into(into, [idx.to(torch.int32), values]), _stats(residual, sumsq, True)
    if isinstance(c, C.RandK):
        idx = _randk_indices(c, d, seed, g.device)
        k = idx.numel()
        values = into[-1] if into else torch.empty(k, dtype=dtype)
        if not ns.randk_step(G, E, O, d, idx.data_ptr(), k, int(c.unbiased), d / k if c.unbiased else 1.0, lam,
                             values.data_ptr(), sp):
            sumsq = st[0].item()
            residual = sumsq - st[2].item() + st[3].item()
            parts = [values] if c.shared else [idx.to(torch.int32), values]
            return _parts_into(into, parts), _stats(residual, sumsq, st[1].item() == 0.0)
        x, finite = _materialize(ns, g, e_in, e_out, st)
        sumsq = st[0].item()
        kept = x[idx]
        values = kept * (d / idx.numel()) if c.unbiased else kept
        residual = _sparse_fixup(kept, values, lam, idx, e_out, sumsq)
        parts = [values] if c.shared else [idx.to(torch.int32), values]
        return _parts_into(into, parts), _stats(residual, sumsq, finite)
    if isinstance(c, C.Compose):   # the sparsifier's one pass, then the second stage on its k values only
        done = _step_fused(lib, c.first, 1.0, g, e_in, e_out, seed)
        if done is None:
            return None
        (idx32, values), first_stats = done
        idx = idx32.long()
        if isinstance(c.first, C.TopK):   # its values are x there, as the one pass formed it
            kept = values
        else:
            kept = g.index_select(0, idx) if e_in is None else g.index_select(0, idx) + e_in.index_select(0, idx)
        if first_stats[2] == 0:   # not finite: leave x in e_out, for the general path
            if e_out is not None:
                e_out[idx] = kept
            return None
        parts2 = encode(c.second, values, second_stage(seed))
        decoded = decode(c.second, parts2, values.numel(), second_stage(seed), dtype)
        sumsq = first_stats[1].item()
        residual = _sparse_fixup(kept, decoded, lam, idx, e_out, sumsq)
        return _parts_into(into, [idx32] + parts2), _stats(residual, sumsq, True)
    if isinstance(c, C.Identity):
        x = torch.empty_like(g) if e_in is not None else None
        bad = ns.addx(G, E, _ptr(x), d, sp)
        x = g if x is None else x
        if e_out is not None:
            torch.sub(x, x, out=e_out)
        return [x], _stats(0.0 if not bad else math.nan, st[0].item(), not bad)
    raise TypeError(f"no fused kernel for {c!r}")


def _parts_into(into, parts):
    """parts, with the small ones (the heads) copied into ``into`` where given (the large ones are into's)."""
    if not into:
        return parts
    for target, part in zip(into, parts):
        if target is not part:
            target.copy_(part)
    return list(into)


def _step_general(c, g, e_in, e_out, seed):
    x = g if e_in is None else g + settle(e_in)
    d = x.numel()
    parts = encode(c, x, seed)
    decoded = decode(c, parts, d, seed, x.dtype)
    left = torch.sub(x, decoded, out=e_out) if e_out is not None else x - decoded
    left = left.double()
    residual = torch.dot(left, left) if d else torch.zeros((), dtype=torch.float64)
    xd = x.double()
    sumsq = torch.dot(xd, xd) if d else torch.zeros((), dtype=torch.float64)
    return parts, torch.stack([residual, sumsq, torch.isfinite(x).all().double()])


def _owed_in_step(inner, lib, e_in, e_out):
    """Before a step: e_in settled unless the fused step of ``inner`` takes its correction as it loads it (what
    e_in owes as a whole; what a part of its base owes under other bounds, as after a change of transport, is
    settled); e_out owes nothing (the step writes it whole)."""
    if lib is None or not isinstance(inner, (C.ScaledSign, C.OneBit)) or _owed_by(e_in) is None:
        settle(e_in)
    _forget(e_out)


def step(c, g, e_in=None, e_out=None, seed=0, defer=False):
    """One step on flat tensor g (float32 or float64): x = g + e_in (x = g without e_in), parts = encode(c, x,
    seed), and, when e_out is given, e_out[:] = x - decode(parts) (e_out preallocated like g, never the same
    tensor as e_in). Returns (parts, stats) with stats = float64 [||x - C(x)||^2, ||x||^2, 1.0 if every
    element of x is finite else 0.0]. g and e_in are not modified (but for ``settle``). ``defer``: ScaledSign
    and OneBit may leave x in e_out and what it owes to the next step (``_defer``); settle(e_out) applies it."""
    lib = _fused_lib(g, e_in, e_out)
    inner, lam = unscaled(c)
    _owed_in_step(inner, lib, e_in, e_out)
    if lib is not None:
        if isinstance(inner, _FUSED_STEP):
            done = _step_fused(lib, inner, lam, g, e_in, e_out, seed, defer=defer)
            if done is not None:
                return done
            if e_out is not None:        # the kernel's first pass left x in e_out
                g, e_in = e_out, None
    return _step_general(c, g, e_in, e_out, seed)


def step_packed(c, g, e_in=None, e_out=None, seed=0, out=None, defer=False):
    """``(pack(parts), stats)`` for ``(parts, stats) = step(c, g, e_in, e_out, seed)``: the same bytes, which the
    fused kernels of sign, onebit, Natural, QSGD, TopK and RandK write straight into the packed payload (no
    copy of the large part). The payload is a fresh buffer (the caller may keep it), or ``out`` when given: a
    contiguous uint8 tensor of ``packed_nbytes(c, g.numel(), g.dtype)`` bytes, which a caller that knows its
    previous payload is no longer needed can pass again and again (no fresh pages to fault in on every call)."""
    d = g.numel()
    if out is not None and (out.dtype != torch.uint8 or not out.is_contiguous() or out.device != g.device
                            or out.numel() != packed_nbytes(c, d, g.dtype)):
        raise ValueError(f"out must be a contiguous uint8 tensor of {packed_nbytes(c, d, g.dtype)} bytes")
    lib = _fused_lib(g, e_in, e_out)
    inner, lam = unscaled(c)
    _owed_in_step(inner, lib, e_in, e_out)
    if lib is not None:
        if isinstance(inner, (C.ScaledSign, C.OneBit, C.Natural, C.QSGD, C.TopK, C.RandK)):
            packed = out if out is not None else torch.empty(packed_nbytes(c, d, g.dtype), dtype=torch.uint8)
            wire = _wire_views(c, d, g.dtype, packed)
            into, at = [], 0   # the kernels write in place; indices as int32 (then as they travel)
            for kind, n in c.layout(d):
                into.append(_scratch("widx", n, torch.int32) if kind == C.INDEX else wire[at])
                at += 2 if kind == C.INDEX else 1
            done = _step_fused(lib, inner, lam, g, e_in, e_out, seed, into, defer)
            if done is not None:
                for target, part in zip(wire, to_wire(c, into, d, index_to_wire)):
                    if target is not part:
                        target.copy_(part)
                return packed, done[1]
            if e_out is not None:        # the kernel left x in e_out
                g, e_in = e_out, None
            parts, stats = _step_general(c, g, e_in, e_out, seed)
            return _pack_into(c, parts, d, out), stats
    parts, stats = step(c, g, e_in, e_out, seed, defer)
    return _pack_into(c, parts, d, out), stats


def packed_nbytes(c, d, value_dtype):
    """The size in bytes of the packed payload of compressor c on d elements of value_dtype."""
    return sum(n * t.itemsize for (_, n), t in zip(c.wire_layout(d), wire_dtypes(c, d, value_dtype)))


def _pack_into(c, parts, d, out):
    data = pack(c, parts, d)
    return data if out is None else out.copy_(data)


def _decode_fused(lib, c, lam, parts, d, out, accumulate, divide):
    """out = decode(parts) (accumulate False) or out + decode(parts) (True), then / divide when divide != 0:
    with the C kernels, for an unscaled c of _FUSED_DECODE (lam the Scaled factor)."""
    ns = lib.f if out.dtype == torch.float32 else lib.d
    acc, div = int(accumulate), float(divide)
    if isinstance(c, C.Natural):
        table = _natural_table(int(parts[0].item()), out.dtype, lam)
        ns.dec_table(parts[1].data_ptr(), d, table.data_ptr(), out.data_ptr(), acc, div)
    elif isinstance(c, C.ScaledSign):
        vals = parts[0] * lam if lam != 1.0 else parts[0]
        ns.dec_bits(parts[1].data_ptr(), d, vals.item(), (-vals).item(), out.data_ptr(), acc, div)
    elif isinstance(c, C.OneBit):
        vals = parts[0] * lam if lam != 1.0 else parts[0]
        ns.dec_bits(parts[1].data_ptr(), d, vals[0].item(), (-vals[1]).item(), out.data_ptr(), acc, div)
    else:   # QSGD
        ns.dec_qsgd(parts[1].data_ptr(), int(c.levels > 127), d, parts[0].item(), float(c.levels), lam,
                    out.data_ptr(), acc, div)
    return out


def _addresses(tensors):
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)


def _mean_fused(lib, c, lam, parts, d, out):
    """out = (sum_j decode(parts_j)) / n in one pass of the C kernels (c unscaled, of _FUSED_DECODE)."""
    ns = lib.f if out.dtype == torch.float32 else lib.d
    n, dtype = len(parts), out.dtype
    rows = _addresses([p[1] for p in parts])
    if isinstance(c, C.Natural):
        tops = [int(p[0].item()) for p in parts]
        tables = torch.stack([_natural_table(t, dtype, lam) for t in tops])
        top_t = torch.tensor(tops, dtype=torch.int64)
        ns.mean_table(rows.data_ptr(), tables.data_ptr(), top_t.data_ptr(),
                      int(lam == 1.0), n, d, out.data_ptr(), float(n))
    elif isinstance(c, (C.ScaledSign, C.OneBit)):
        heads = torch.stack([p[0] for p in parts])           # (n, 1) or (n, 2)
        vals = heads * lam if lam != 1.0 else heads
        vpos = vals[:, 0].contiguous()
        vneg = (-vals[:, 0 if isinstance(c, C.ScaledSign) else 1]).contiguous()
        ns.mean_bits(rows.data_ptr(), vpos.data_ptr(), vneg.data_ptr(), n, d, out.data_ptr(), float(n))
    else:   # QSGD
        norms = torch.cat([p[0].reshape(1) for p in parts]).to(dtype)
        ns.mean_qsgd(rows.data_ptr(), int(c.levels > 127), norms.data_ptr(), float(c.levels), lam, n, d,
                     out.data_ptr(), float(n))


_local = threading.local()
def _scratch(name, n, dtype):
    """A thread's scratch tensor of n elements, kept from call to call (fresh pages cost more than the work)."""
    scratch = _local.__dict__.setdefault("scratch", {})
    have = scratch.get((name, dtype))
    if have is None or have.numel() < n:
        have = scratch[(name, dtype)] = torch.empty(n, dtype=dtype)
    return have[:n]


def _marks(d):
    """A thread's bitmap of at least d bits, all clear (the kernels that use it leave it clear)."""
    have = getattr(_local, "marks", None)
    if have is None or have.numel() * 8 < d:
        have = _local.marks = torch.zeros((d + 7) // 8 + 64, dtype=torch.uint8)
    return have


def _sparse_rows(c, rows, d, seed, dtype):
    """The parts of each sparse row: (indices, values), a composition's values decoded from its second stage
    (k of them: the dense decode of each row is left out)."""
    parts = [unpack(c, row, d, dtype) for row in rows]
    if isinstance(c, C.Compose):
        parts = [[p[0], decode(c.second, p[1:], p[0].numel(), second_stage(seed), dtype)] for p in parts]
    return parts


def _mean_sparse_fused(lib, c, rows, d, seed, dtype, out):
    """decode_mean of TopK / RandK rows with the C kernels: zero, scatter, divide the touched coordinates.
    False where the torch path must decide (an index out of range: torch raises)."""
    ns = lib.f if dtype == torch.float32 else lib.d
    parts = _sparse_rows(c, rows, d, seed, dtype)
    n = len(parts)
    if isinstance(c, C.RandK) and c.shared:
        idx = _randk_indices(c, d, seed, out.device).contiguous()
        vals = _addresses([p[0] for p in parts])       # (held: the kernel reads it)
        return ns.mean_shared(idx.data_ptr(), idx.numel(), vals.data_ptr(), n, d, out.data_ptr(), float(n)) == 0
    ks = torch.tensor([p[0].numel() for p in parts], dtype=torch.int64)
    idx, vals = _addresses([p[0] for p in parts]), _addresses([p[1] for p in parts])
    total = int(ks.sum())
    sidx, sval = _scratch("sidx", total, torch.int32), _scratch("sval", total, dtype)
    start = _scratch("start", fused.blocks(d) + 1, torch.int64)
    return ns.mean_sparse(idx.data_ptr(), vals.data_ptr(), ks.data_ptr(), n, d, out.data_ptr(), float(n),
                          sidx.data_ptr(), sval.data_ptr(), start.data_ptr()) == 0


def decode_mean(c, rows, d, seed, dtype, out=None):
    """(sum_j decode(row_j)) / n for the packed payloads ``rows`` (n of them, as ``pack`` makes them; rows of
    an allgather may start unaligned): summed left to right from decode(row_0), then divided by n, exactly as
    torch's elementwise ops in ``dtype`` give it. Written into ``out`` (d elements of dtype) when given."""
    n = len(rows)
    if n == 0:
        raise ValueError("decode_mean needs at least one payload")
    device = rows[0].device
    if out is None:
        out = torch.empty(d, dtype=dtype, device=device)
    inner, lam = unscaled(c)
    lib = _fused_lib(out, *rows, dtype=dtype) if isinstance(inner, _FUSED_DECODE) else None
    if lib is not None:
        _mean_fused(lib, inner, lam, [unpack(c, row, d, dtype) for row in rows], d, out)
        return out
    if isinstance(c, (C.TopK, C.RandK, C.Compose)) and rows[0].device.type == "cpu" and out.is_contiguous():
        lib = _fused_lib(out, dtype=dtype)
        if lib is not None and _mean_sparse_fused(lib, c, rows, d, seed, dtype, out):
            return out
    if isinstance(c, (C.TopK, C.Compose)) or isinstance(c, C.RandK) and not c.shared:
        out.zero_()
        for idx, values in _sparse_rows(c, rows, d, seed, dtype):
            out.index_add_(0, idx, values)
        return out.div_(n)
    for j, row in enumerate(rows):
        decoded = decode(c, unpack(c, row, d, dtype), d, seed, dtype)
        if j == 0:
            out.copy_(decoded)
        else:
            out.add_(decoded)
    return out.div_(n)


# ---- payloads as bytes -------------------------------------------------------------------------------------

def part_dtypes(c, d, value_dtype):
    """The dtypes of the parts (``c.layout(d)``)."""
    return [value_dtype if kind == C.VALUE else _DTYPES[kind] for kind, _ in c.layout(d)]


def wire_dtypes(c, d, value_dtype):
    """The dtypes of the parts that travel (``c.wire_layout(d)``)."""
    return [value_dtype if kind == C.VALUE else _DTYPES[kind] for kind, _ in c.wire_layout(d)]


def _packing_order(dtypes):
    # widest parts first, so that every part starts at an offset aligned to its item size
    return sorted(range(len(dtypes)), key=lambda i: -dtypes[i].itemsize)


def index_to_wire(idx, d):
    """Increasing int32 indices into d elements as they travel (``Compressor.wire_layout``): their low 16 bits
    (int16), and how many lie below the end of each block of 2^16 elements but the last (int32)."""
    low = (((idx + 32768) & 0xFFFF) - 32768).to(torch.int16)
    ends = torch.arange(1, C.index_counts(d) + 1, dtype=torch.int32, device=idx.device) * C.INDEX_BLOCK
    return [low, torch.searchsorted(idx, ends).to(torch.int32)]


def index_from_wire(low, below):
    """The int32 indices of ``index_to_wire``: the j-th one lies in the block of how many ``below`` are <= j."""
    k = low.numel()
    lib = _fused_lib(low, below)
    if lib is not None:
        idx = torch.empty(k, dtype=torch.int32)
        lib.dll.hvdc_index_expand(low.data_ptr(), k, below.data_ptr(), below.numel(), idx.data_ptr())
        return idx
    block = torch.searchsorted(below, torch.arange(k, dtype=torch.int32, device=low.device), right=True)
    return (block.to(torch.int32) * C.INDEX_BLOCK).add_(low.to(torch.int32) & 0xFFFF)


def _wire_views(c, d, value_dtype, data):
    """The parts that travel as views into the packed bytes ``data`` (copies only where ``data`` itself starts
    unaligned, as rows of an allgather can)."""
    dtypes = wire_dtypes(c, d, value_dtype)
    lengths = [n for _, n in c.wire_layout(d)]
    parts, offset = [None] * len(dtypes), 0
    for i in _packing_order(dtypes):
        nbytes = lengths[i] * dtypes[i].itemsize
        part = data[offset:offset + nbytes]
        if part.storage_offset() % dtypes[i].itemsize:
            part = part.clone()
        parts[i] = part.view(dtypes[i])
        offset += nbytes
    if offset != data.numel():
        raise ValueError(f"payload of {data.numel()} bytes, expected {offset} for {c!r} on {d} elements")
    return parts


def pack(c, parts, d):
    """The parts of compressor c on d elements as one uint8 tensor: the bytes that travel (a view, not a copy,
    of a single part)."""
    wire = to_wire(c, parts, d, index_to_wire)
    if len(wire) == 1:
        return wire[0].contiguous().view(torch.uint8)
    order = _packing_order([p.dtype for p in wire])
    return torch.cat([wire[i].contiguous().view(torch.uint8) for i in order])


def unpack(c, data, d, value_dtype):
    """Inverse of ``pack``: views into ``data`` where the parts travel as they are."""
    return from_wire(c, _wire_views(c, d, value_dtype, data), d, index_from_wire)


def _view(data, dtype):
    """data (uint8) viewed as dtype, copied first where it starts unaligned for dtype."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return (data.clone() if data.storage_offset() % itemsize else data).view(dtype)


def pack_exact(v):
    """A slice of an exact average as bytes (``hvd_compress.transport.exact_bytes``): an int32 header,
    then its nonzeros (header = their count; the counts of the indices' blocks, the values, the indices' low
    16 bits, as a sparsifier's travel), or all of it (header = -1) when that is not larger. The average of n
    sparse payloads is sparse: this keeps it exact and small."""
    idx = torch.nonzero(v).squeeze(1).to(torch.int32)
    d, itemsize = v.numel(), v.element_size()
    if T.sparse_exact_bytes(d, idx.numel(), itemsize) < d * itemsize:
        low, below = index_to_wire(idx, d)
        parts = [below, v.index_select(0, idx), low]
    else:
        idx, parts = None, [v]
    header = torch.tensor([-1 if idx is None else idx.numel()], dtype=torch.int32, device=v.device)
    return torch.cat([t.contiguous().view(torch.uint8) for t in [header] + parts])


def unpack_exact(data, sizes, dtype):
    """The concatenated slices (of ``sizes`` elements) from the back-to-back ``pack_exact`` bytes."""
    out = torch.zeros(sum(sizes), dtype=dtype, device=data.device)
    itemsize, offset, start = out.element_size(), 0, 0
    for size in sizes:
        count = int(_view(data[offset:offset + 4], torch.int32).item())
        offset += 4
        if count < 0:
            out[start:start + size] = _view(data[offset:offset + size * itemsize], dtype)
            offset += size * itemsize
        else:
            nbelow = C.index_counts(size)
            below = _view(data[offset:offset + 4 * nbelow], torch.int32)
            offset += 4 * nbelow
            values = _view(data[offset:offset + count * itemsize], dtype)
            offset += count * itemsize
            low = _view(data[offset:offset + 2 * count], torch.int16)
            offset += 2 * count
            out[start + index_from_wire(low, below).long()] = values
        start += size
    if offset != data.numel():
        raise ValueError(f"exact slices of {data.numel()} bytes, parsed {offset}")
    return out


def compute_dtype(dtype):
    """Half-precision gradients are compressed in float32 (and their error buffers kept in float32)."""
    if not dtype.is_floating_point:
        raise TypeError(f"gradients must be floating point, got {dtype}")
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def apply(c, x, seed=0):
    """C(x) for a tensor of any shape, returned in x's dtype."""
    flat = x.reshape(-1).to(compute_dtype(x.dtype))
    out = decode(c, encode(c, flat, seed), flat.numel(), seed, flat.dtype)
    return out.to(x.dtype).view(x.shape)


def clip_norm_(x, max_norm):
    """Scales x in place down to norm ``max_norm`` if it is longer (``torch.nn.utils.clip_grad_norm_``'s
    formula, as local gradient clipping does, see ``compressors.check_clip``); a non-finite x stays non-finite."""
    return x.mul_((max_norm / (torch.linalg.vector_norm(x) + 1e-6)).clamp(max=1.0))


def momentum_step(config, work, old, velocity):
    """Deep Gradient Compression's momentum correction of one gradient g, in g's memory ``work``: ``velocity``
    (a free buffer) <- momentum * old + g, and ``work`` then holds what is compressed in g's place: u, or with
    Nesterov g + momentum * u. Returns the velocity. The simulation's formulas: the same bits."""
    m = config.momentum
    if not config.nesterov:
        if old is not None:
            work.add_(old, alpha=m)
        return velocity.copy_(work)
    velocity.copy_(work)
    if old is not None:
        velocity.add_(old, alpha=m)
    work.add_(velocity, alpha=m)
    return velocity
