"""The single-process reference: n workers and a server simulated in one process.

It follows the pipeline of the README's Design section literally, with the compressors' C(x) and the same
per-call seeds as the Horovod plug-ins, and shares no pipeline code with them: a distributed run must match it
step for step.
With ``momentum`` (momentum correction, ``compressors.check_momentum``) each worker's velocity u <- m u + g takes
g's place (with ``nesterov``, g + m u does), and the coordinates sent (where the new error differs from x) are
cleared from u; with ``clip`` each worker's gradient is first clipped to norm ``config.clip_threshold(n)``.
With ``warmup`` each step's worker and server compressors are ``config.worker_at(step)`` and
``config.server_at(step)``. A transport (see ``hvd_compress.transport``) changes the math only where it says
so: "dense" averages the exact gradients (as do tensors under ``dense_below`` elements), "sharded" runs the
pipeline on each of the n slices on its own, "hierarchical" (nodes of ``local_size`` consecutive ranks) runs it
with one worker per node, its ranks' exact average, on each of ``local_size`` slices. Buckets do not change the
math: tensors are compressed one by one inside them. Gradients may be PyTorch or TensorFlow tensors; C(x) runs
with the kernels of their framework.
"""
from . import options
from . import transport as T
from .seeds import server_seed, worker_seed


def _torch(x):
    return type(x).__module__.startswith("torch")


def _reshape(x, shape):
    if _torch(x):
        return x.reshape(shape)
    import tensorflow as tf
    return tf.reshape(x, shape)


def _concat(pieces):
    if _torch(pieces[0]):
        import torch
        return torch.cat(pieces)
    import tensorflow as tf
    return tf.concat(pieces, 0)


def _clip(g, max_norm):
    if not _torch(g):
        from .tensorflow.kernels import clip_norm
        return clip_norm(g, max_norm)
    from .torch.kernels import clip_norm_
    return clip_norm_(g.clone(), max_norm)


def _plus_scaled(g, u, m):
    """g + m u, as each plug-in computes it."""
    return g.add(u, alpha=m) if _torch(g) else g + m * u


def _masked(u, sent):
    """u with the sent coordinates cleared."""
    if _torch(u):
        return u.masked_fill(sent, 0)
    import tensorflow as tf
    return tf.where(sent, tf.zeros_like(u), u)


class Simulation:
    def __init__(self, compressor, error_feedback=False, server=None, n=2, seed=0, transport=None, link=None,
                 dense_below=0, momentum=0.0, warmup=0, clip=0.0, local_size=1, momentum_masking=True,
                 nesterov=False):
        self.config, _ = options.config_of(compressor, error_feedback, server, transport, None, momentum, warmup,
                                           clip, momentum_masking, nesterov)
        self.worker, self.server = self.config.worker, self.config.server
        self.error_feedback, self.momentum = self.config.error_feedback, self.config.momentum
        self.transport, self.link = self.config.transport, link
        self.n, self.seed = int(n), int(seed)
        self.velocity = [{} for _ in range(self.n)]       # u_i (momentum correction), per rank and name
        self.dense_below = int(dense_below)   # tensors with fewer elements are averaged exactly (dense)
        self.local_size = int(local_size)     # ranks per node ("hierarchical": node k is ranks kL..kL+L-1)
        if self.local_size < 1 or self.n % self.local_size:
            raise ValueError(f"local_size={local_size!r} does not divide the {self.n} ranks into nodes")
        self.worker_error = [{} for _ in range(self.n)]   # e_i, per rank and parameter name
        self.server_error = {}                            # d, per parameter name (or slice name)
        self.steps = {}                                   # steps each parameter has been through
        self.transports = {}                              # the transport each parameter used

    def step(self, grads):
        """grads: one {name: gradient} per rank, the same names on every rank (a parameter without
        gradient in this step is simply absent). Returns {name: the update every rank applies}."""
        if len(grads) != self.n:
            raise ValueError(f"expected gradients of {self.n} ranks, got {len(grads)}")
        updates = {}
        for name, first in grads[0].items():
            step = self.steps.get(name, 0)
            gs = [_reshape(grads[i][name], [-1]) for i in range(self.n)]
            if self.config.clip:
                gs = [_clip(g, self.config.clip_threshold(self.n)) for g in gs]
            if self.momentum:   # u <- m u + g, and u is what is compressed (or averaged) in g's place
                us = [_plus_scaled(g, self.velocity[i][name], self.momentum) if name in self.velocity[i] else g
                      for i, g in enumerate(gs)]
                for i, u in enumerate(us):
                    self.velocity[i][name] = u
                # Nesterov: g + m u in g's place
                gs = [_plus_scaled(g, u, self.momentum) for g, u in zip(gs, us)] if self.config.nesterov else us
            d = int(gs[0].shape[0])
            how = self.transports[name] = ("dense" if d < self.dense_below else
                                           T.resolve(self.transport, self.config, d, self.n, self.link))
            if how == "dense":
                update = sum(gs[1:], gs[0]) / self.n
            elif how == "hierarchical":
                update = self._hierarchical(gs, name, step)
            else:
                xs = [g + self.worker_error[i][name] if self.error_feedback and name in self.worker_error[i] else g
                      for i, g in enumerate(gs)]
                if how == "sharded":
                    b = T.bounds(d, self.n)
                    pieces = [self._pipeline([x[b[j]:b[j + 1]] for x in xs], T.shard_name(name, j), step)
                              for j in range(self.n)]
                    ps = [_concat([p[i] for p, _ in pieces]) for i in range(self.n)]
                    update = _concat([u for _, u in pieces])
                else:
                    ps, update = self._pipeline(xs, name, step)
                if self.error_feedback:
                    for i in range(self.n):
                        self.worker_error[i][name] = xs[i] - ps[i]
                        if self.momentum and self.config.momentum_masking:   # factor masking: sent ones leave u
                            sent = self.worker_error[i][name] != xs[i]
                            self.velocity[i][name] = _masked(self.velocity[i][name], sent)
            updates[name] = _reshape(update, list(first.shape))
            self.steps[name] = step + 1
        return updates

    def _hierarchical(self, gs, name, step):
        """Node k's worker is its ranks' exact average; local rank j handles slice j, with node k's error
        buffer of that slice, among the nodes (worker k: node k)."""
        size = self.local_size
        nodes = [sum(gs[k + 1:k + size], gs[k]) / size for k in range(0, self.n, size)]
        b = T.bounds(int(gs[0].shape[0]), size)
        pieces = []
        for j in range(size):
            key = T.shard_name(name, j)
            xs = [g[b[j]:b[j + 1]] for g in nodes]
            if self.error_feedback:
                xs = [x + self.worker_error[k][key] if key in self.worker_error[k] else x for k, x in enumerate(xs)]
            ps, update = self._pipeline(xs, key, step)
            if self.error_feedback:
                for k, x in enumerate(xs):
                    self.worker_error[k][key] = x - ps[k]
            pieces.append(update)
        return _concat(pieces)

    def _pipeline(self, xs, key, step):
        """One piece (a whole tensor or a slice), keyed by ``key``: the ranks' C_w(x_i) and the update."""
        if int(xs[0].shape[0]) == 0:
            return xs, xs[0]
        worker = self.config.worker_at(step)
        ps = [worker(x, worker_seed(worker, self.seed, step, i, key)) for i, x in enumerate(xs)]
        update = sum(ps[1:], ps[0]) / len(ps)
        if self.server is not None:
            y = update + self.server_error[key] if key in self.server_error else update
            update = self.config.server_at(step)(y, server_seed(self.server, self.seed, step, key))
            self.server_error[key] = y - update
        return ps, update
