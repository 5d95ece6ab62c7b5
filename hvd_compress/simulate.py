"""The single-process reference: n workers and a server simulated in one process.

It follows DESIGN.md section 1 literally, with the compressors' C(x) and the same per-call seeds as the
Horovod plug-ins, and shares no pipeline code with them: a distributed run must match it step for step.
Gradients may be PyTorch or TensorFlow tensors; C(x) runs with the kernels of their framework.
"""
from . import compressors as C
from .seeds import server_seed, worker_seed


def _reshape(x, shape):
    if type(x).__module__.startswith("torch"):
        return x.reshape(shape)
    import tensorflow as tf
    return tf.reshape(x, shape)


class Simulation:
    def __init__(self, compressor, error_feedback=False, server=None, n=2, seed=0):
        self.worker, self.server = C.parse(compressor) or C.Identity(), C.parse(server)
        self.error_feedback, self.n, self.seed = bool(error_feedback), int(n), int(seed)
        self.worker_error = [{} for _ in range(self.n)]   # e_i, per rank and parameter name
        self.server_error = {}                            # d, per parameter name
        self.steps = {}                                   # steps each parameter has been through

    def step(self, grads):
        """grads: one {name: gradient} per rank, the same names on every rank (a parameter without
        gradient in this step is simply absent). Returns {name: the update every rank applies}."""
        if len(grads) != self.n:
            raise ValueError(f"expected gradients of {self.n} ranks, got {len(grads)}")
        updates = {}
        for name, first in grads[0].items():
            step = self.steps.get(name, 0)
            total = None
            for i in range(self.n):
                x = _reshape(grads[i][name], [-1])
                if self.error_feedback and name in self.worker_error[i]:
                    x = x + self.worker_error[i][name]
                p = self.worker(x, worker_seed(self.worker, self.seed, step, i, name))
                if self.error_feedback:
                    self.worker_error[i][name] = x - p
                total = p if total is None else total + p
            update = total / self.n
            if self.server is not None:
                y = update + self.server_error[name] if name in self.server_error else update
                update = self.server(y, server_seed(self.server, self.seed, step, name))
                self.server_error[name] = y - update
            updates[name] = _reshape(update, list(first.shape))
            self.steps[name] = step + 1
        return updates
