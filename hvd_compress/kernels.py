"""Finds the kernels of the framework a tensor belongs to; builds each framework's kernel registries; turns
parts into what travels and back (the same walk of the layout for both frameworks)."""
import functools

from . import compressors as C


def apply(compressor, x, seed=0):
    """C(x) with the kernels of x's framework (torch or TensorFlow tensors; numpy arrays go through torch)."""
    module = type(x).__module__
    if module.startswith("torch"):
        from .torch import kernels
        return kernels.apply(compressor, x, seed)
    if module.startswith("tensorflow"):
        from .tensorflow import kernels
        return kernels.apply(compressor, x, seed)
    if module.startswith("numpy"):
        import torch
        from .torch import kernels
        return kernels.apply(compressor, torch.from_numpy(x), seed).numpy()
    raise TypeError(f"no kernels for tensors of type {type(x).__name__}; hvd_compress supports torch and "
                    f"TensorFlow tensors and numpy arrays here")


def to_wire(c, parts, d, index_to_wire):
    """The parts (in ``c.layout(d)`` order) as the parts that travel (in ``c.wire_layout(d)`` order): an INDEX
    part as the two of the framework's ``index_to_wire(idx, d)``, the others as they are."""
    wire = []
    for (kind, _), part in zip(c.layout(d), parts):
        wire += index_to_wire(part, d) if kind == C.INDEX else [part]
    return wire


def from_wire(c, wire, d, index_from_wire):
    """Inverse of ``to_wire``, with the framework's ``index_from_wire(low, below)``."""
    parts = []
    for kind, _ in c.layout(d):
        parts.append(index_from_wire(*wire[:2]) if kind == C.INDEX else wire[0])
        wire = wire[2:] if kind == C.INDEX else wire[1:]
    return parts


def unscaled(c):
    """(compressor, lam): Scaled(c, lam) as its parts, any other compressor with lam = 1 (the fused kernels take
    lam as an argument)."""
    if isinstance(c, C.Scaled) and not isinstance(c.compressor, C.Scaled):
        return c.compressor, c.lam
    return c, 1.0


def topk_sample(d, k):
    """How Top-k of k among d elements selects on a large tensor: (stride, rank) where it first keeps the
    candidates at or above the rank-th smallest of a strided sample (about 2k of them), then selects among those
    alone (the whole tensor again where fewer than k pass); None where it selects from the whole tensor (small
    tensors, k > d / 8). The stride is odd, for about 2^14 samples: a power-of-two stride over a weight matrix
    whose rows are a power of two wide sees only a few columns (a skewed threshold, then the slow full top-k)."""
    if d < (1 << 17) or 8 * k > d:
        return None
    stride = (d // (1 << 14)) | 1
    n = (d + stride - 1) // stride   # the sample's length
    return stride, max(1, min(n, int(n * (1 - 2 * k / d))))


def registries(framework, kernels):
    """(encode, decode) that dispatch on the compressor's class (a subclass inherits its base class's kernels),
    from [(class, encode(c, x, seed), decode(c, parts, d, seed, dtype))]; a class without kernels raises
    TypeError. Each framework's kernels module builds its pair (a test checks every Compressor class is in both)."""
    @functools.singledispatch
    def encode(c, x, seed):
        raise TypeError(f"no {framework} kernel for {c!r}")

    @functools.singledispatch
    def decode(c, parts, d, seed, dtype):
        raise TypeError(f"no {framework} kernel for {c!r}")

    for cls, enc, dec in kernels:
        encode.register(cls, enc)
        decode.register(cls, dec)
    return encode, decode
