"""Finds the kernels of the framework a tensor belongs to."""


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
