"""What the plug-in has to know of Horovod's PyTorch ``DistributedOptimizer``, which passes ``compress()`` a bare
gradient and no reference to itself: which parameter a gradient is, where to find the optimizer, and how to
leave it ready for the next step after a step raised."""
import sys

import torch

from . import ops


def parameters_of(named_parameters):
    """{name: parameter} of ``named_parameters``, the same as the optimizer's."""
    if named_parameters is None:
        raise ValueError("Compression needs named_parameters=model.named_parameters() (the same as the "
                         "optimizer's): Horovod passes compress() no parameter name")
    params = {}
    for item in named_parameters:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor)):
            raise ValueError(f"named_parameters must yield (name, tensor) pairs, got {item!r:.80}")
        if item[0] in params:
            raise ValueError(f"parameter name {item[0]!r} appears twice in named_parameters")
        params[item[0]] = item[1]
    return params


class GradientNames:
    """The name of the parameter whose ``.grad`` a gradient is."""

    def __init__(self, params):
        self.params, self.by_id = params, {}

    def __call__(self, grad):
        name = self.by_id.get(id(grad))
        if name is None or self.params[name].grad is not grad:
            # grads are new tensors after zero_grad(set_to_none=True): rebuild the map
            self.by_id = {id(p.grad): n for n, p in self.params.items() if p.grad is not None}
            name = self.by_id.get(id(grad))
            if name is None or self.params[name].grad is not grad:
                raise ValueError(
                    f"compress() got a tensor (shape {tuple(grad.shape)}) that is not the .grad of any parameter "
                    f"in named_parameters: give Compression the same named_parameters as the optimizer "
                    f"(sparse_as_dense=True is not supported)")
        return name


def optimizer_calling():
    """The Horovod optimizer among compress()'s callers (its _allreduce_grad_async, or the list comprehension
    of its grouped variant), or None when compress() is called otherwise."""
    frame = sys._getframe(2)   # 0: this function, 1: Compression.compress(), 2: Horovod's
    for _ in range(6):
        if frame is None:
            break
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, torch.optim.Optimizer) and hasattr(candidate, "_handles"):
            return candidate
        frame = frame.f_back
    return None


def reset(optimizer):
    """After an error inside a step, as Horovod's load_state_dict() does: wait for the collectives still in
    flight (their results are no longer wanted) and forget them, so that zero_grad() and the next backward()
    work."""
    for handle, _ in optimizer._handles.values():
        if handle is not None and not callable(handle):
            wait_quietly(handle)
    optimizer._handles.clear()
    optimizer._synchronized = False
    for p in optimizer._allreduce_delay:
        optimizer._allreduce_delay[p] = optimizer.backward_passes_per_step
    for group in optimizer._group_counts:
        optimizer._group_counts[group] = 0


def wait_quietly(handle):
    """Wait for a collective whose result is no longer wanted (its error, if any, is the one being raised)."""
    try:
        ops.wait(handle)
    except Exception:   # noqa: BLE001
        pass
