"""Finds the kernels of the framework a tensor belongs to; builds each framework's kernel registries."""
import functools


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
