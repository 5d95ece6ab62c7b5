"""``Compression`` for TensorFlow: ``compression=`` of ``hvd.DistributedGradientTape``, of
``hvd.DistributedOptimizer``, of Horovod's Keras ``DistributedOptimizer`` (tf-keras) and, for Keras 3, of
``hvd_compress.keras.DistributedOptimizer``.

The same step as the PyTorch plug-in (the README's Design section) over the same transport objects
(``hvd_compress/bucket.py``), written for Horovod's TensorFlow path, which calls ``compress(g)``, allreduces
what it returns, and calls ``decompress()`` on the result, one gradient at a time, while tracing a
``tf.function``. So everything happens in the graph, one variable per bucket:

    compress(g)    the transport's steps, all at once: x = g + e (g clipped, and with momentum correction
                   the velocity u <- m u + g in g's place, as in PyTorch), payload p = C_w(x), its collective,
                   gbar = 1/n sum_j decode(p_j), the server pass on the root (sharded: on every rank's slice),
                   its collective, the update v; returns a one-element marker: the step number, or NaN where
                   x is not finite on some rank (the flags ride with the payloads) ("dense" variables: the
                   gradient itself, which Horovod averages)
    decompress(m)  m is the marker averaged over ranks: NaN means some rank's gradient was not finite, a
                   wrong step that ranks are out of step or that Horovod does not average (an error naming
                   the variable). Otherwise e <- x - decode(p), d <- y - v, u is committed (the sent
                   coordinates cleared from it with factor masking), and v is the gradient.

A step whose gradient is not finite anywhere leaves every buffer as it was (``state.py``: how).

Horovod passes compress() a bare gradient. Gradients arrive in the order of the variables given to the
tape or optimizer (Horovod skips variables without gradient), so ``variables=`` must be that list, in that
order: each gradient is matched to the next variable of its shape. Horovod's ``groups=`` reorders gradients
and is not supported.
"""

import itertools

import numpy as np
import tensorflow as tf
import horovod.tensorflow as hvd

from .. import options
from ..bucket import Bucket, Pending, plan
from ..plugin import CompressionBase
from . import checkpoint, horovod
from . import kernels as K
from . import ops
from .state import State

# Collectives are named after the Compression object (its number in this process: every rank of the set
# builds the same objects in the same order)
_instances = itertools.count()


class Compression(CompressionBase, tf.Module):
    """Gradient compression with optional worker error feedback and DoubleSqueeze server pass.

    Args:
        compressor: worker compressor C_w (object or spec such as ``"topk:0.01"``).
        error_feedback: keep an error buffer per variable on every worker.
        server: compressor C_s of the DoubleSqueeze server pass; None for none.
        variables: the variables whose gradients Horovod reduces, in the same order
            (``model.trainable_variables``).
        root_rank: the rank whose server payload every rank applies.
        seed: base of the seeds of random compressors.
        transport, link_gbps, dense_below: as in the PyTorch plug-in (its docstring): how payloads travel, the
            link "auto" prices them with, and the size under which a gradient travels uncompressed.
        process_set: the Horovod process set whose ranks average the gradients, the one given to
            ``hvd.DistributedGradientTape(process_set=...)`` or ``hvd.DistributedOptimizer(process_set=...)``
            (None: every rank). Every collective of this object runs on it, ranks are counted within it
            (``root_rank=0`` is its first rank), and a gradient reduced on another set is refused.
        momentum, momentum_masking, nesterov, warmup, clip: Deep Gradient Compression's recipe, as in the
            PyTorch plug-in (a Keras optimizer with momentum of its own is refused at the first step). During a
            warm-up the payloads' length changes from step to step: do not compile the step function with XLA.
        nonfinite: when some rank's gradient holds NaN or Inf, "skip": that variable's gradient and those
            reduced after it are NaN on every rank (a loss-scaling optimizer then skips the step), or "raise":
            an error naming the variable on every rank. Either way no buffer of the step changes.

    Create it on every rank of the set; the first step compares the configurations of its ranks. It is a
    ``tf.Module``: ``tf.train.Checkpoint(compression=compression)`` saves this rank's buffers;
    ``state_dict()`` gathers every rank's.
    """

    ops, checkpoint, noun = ops, checkpoint, "variable"   # the shared transports' kernels and collectives, in TF

    def __init__(self, compressor, error_feedback=False, server=None, variables=None, root_rank=0, seed=0,
                 transport=None, link_gbps=None, dense_below=1024, nonfinite="skip", process_set=None,
                 momentum=0.0, warmup=0, clip=0.0, momentum_masking=True, nesterov=False):
        super().__init__(name="hvd_compress")
        if process_set is not None and not process_set.included():
            raise ValueError(f"this rank ({hvd.rank()}) is not in the process set {process_set.ranks}: "
                             f"create the Compression on the set's ranks only")
        self.process_set = process_set   # None until the first step takes the tape's or optimizer's
        self._bound = False
        self.config, self._link = options.config_of(compressor, error_feedback, server, transport, link_gbps,
                                                    momentum, warmup, clip, momentum_masking, nesterov)
        self.dense_below, self.nonfinite = options.check(dense_below, nonfinite)
        variables = horovod.variables_of(variables, K.compute_dtype)
        self.names = [f"{i}/{v.name}" for i, v in enumerate(variables)]
        self.shapes = [tuple(v.shape) for v in variables]
        self.root_rank, self.seed = int(root_rank), int(seed)
        self.tag = next(_instances)
        dtypes = [K.compute_dtype(v.dtype) for v in variables]
        self.sizes = dict(zip(self.names, (int(np.prod(s)) for s in self.shapes)))
        self.bucket_bytes = 4 * max(self.sizes.values(), default=1)   # one variable per collective
        self._transports, self._buckets, self._kernel_table = {}, {}, None
        self.state = State(list(self.sizes.values()), dtypes, self.config.error_feedback,
                           self.config.server is not None, bool(self.config.momentum))
        self._index_of = horovod.GradientOrder(self.shapes)
        self._now = None   # (step, server buffer, worker buffer, velocity) in force for the variable being compressed
        self._compressors = None   # (worker, server) in force for it (``ops.compressors_at``)

    # ---- Horovod's Compressor interface ------------------------------------------------------------------

    # Plain Python over static shapes and configuration: autograph has nothing to convert (it would only
    # slow the tracing of every step function down)
    @tf.autograph.experimental.do_not_convert
    def compress(self, tensor):
        i = self._index_of(tensor)
        if not self._bound:
            # the Keras optimizer: a walk up the whole stack, only where its momentum matters
            optimizer = horovod.optimizer_of_caller() if self.config.momentum else None
            self._bind(horovod.process_set_of_caller(), optimizer)
        name, how = self.names[i], self._transports[self.names[i]]
        global_step, self._now = self.state.begin(i, self.config.error_feedback and how != "dense")
        step, _, e_in, u_in = self._now
        self._compressors = ops.compressors_at(self.config, step)
        g = tf.reshape(tf.cast(tensor, K.compute_dtype(tensor.dtype)), [-1])
        x, velocity = K.precondition(self.config, g, u_in, self.size())   # with momentum, x is u (Nesterov: g + m u)
        p = Pending(name, how, tensor.shape, tensor.dtype, 0, work=x, velocity=velocity)
        ctx = (i, global_step, p, self._now)
        if how == "dense":   # Horovod averages the gradient (with momentum correction: u) itself
            p.bytes_sent = self.sizes[name] * tensor.dtype.size
            return (tensor if x is g else tf.reshape(tf.cast(x, tensor.dtype), tensor.shape)), ctx
        bucket = self._buckets[name]
        mine = None if e_in is None else e_in[self._worker_slice(name)]   # hierarchical: this rank's slice
        self._encode(bucket, p, mine, True if e_in is not None else None)
        if self.config.momentum and self.config.momentum_masking:   # factor masking: the sent coordinates leave u
            p.velocity = tf.where(tf.equal(p.worker_error, x + e_in), p.velocity, tf.zeros_like(p.velocity))
        self._pending = {name: p}
        bucket.reset()
        bucket.add(self, p)
        # the ranks' finiteness flags go into the marker (which also keeps the payload collective in the graph
        # on ranks that do not decode it: TensorFlow prunes ops whose results nobody uses)
        not_finite = tf.reduce_sum(bucket.transport.receive(self, bucket)) > 0
        bucket.transport.reduce_and_serve(self, bucket)
        bucket.transport.finish(self, bucket)
        marker = tf.where(not_finite, float("nan"), tf.cast(step + 1, tf.float32))
        p.bytes_sent += 4
        # named: Horovod names its allreduce after this tensor, and the root's graph has more ops than the others'
        return tf.reshape(marker, [1], name=f"hc_marker_{self.tag}_{i}"), ctx

    @tf.autograph.experimental.do_not_convert
    def decompress(self, reduced, ctx):
        i, global_step, p, now = ctx
        step = now[0]
        name, dense = self.names[i], p.transport == "dense"
        expected = tf.cast(step + 1, tf.float32)
        if dense:   # the average itself says whether some rank's gradient was not finite
            not_finite = tf.logical_not(tf.reduce_all(tf.math.is_finite(reduced)))
            in_step = tf.logical_not(not_finite)
        else:
            not_finite = tf.math.is_nan(reduced[0])
            in_step = tf.abs(reduced[0] - expected) <= 1e-3 * expected
        skip_step, skip_writes = self.state.skip_if(i, not_finite, global_step, p.bytes_sent)
        with tf.control_dependencies(skip_writes):   # written before a "raise" stops the graph
            # the Assert op itself: tf.debugging.Assert would add a tf.cond (the graph per variable is most of
            # the tracing time)
            check = tf.raw_ops.Assert(
                condition=tf.logical_or(in_step, tf.logical_and(not_finite, self.nonfinite == "skip")),
                data=[f"hvd_compress: variable {name!r}: the gradient is not finite (NaN or Inf) on some rank "
                      f"(NaN marker), or ranks are out of step, or Horovod does not average (use op=hvd.Average). "
                      f"No buffer of this step was changed. Marker and expected step:", reduced[0], expected])
        update = tf.reshape(tf.cast(reduced, p.work.dtype), [-1]) if dense else p.update

        def commit():
            with tf.control_dependencies(self.state.commit(i, global_step, now, p, self._worker_slice(name),
                                                           self._server_slice(name))):
                return tf.identity(update)

        with tf.control_dependencies([check]):
            update = tf.cond(skip_step, lambda: tf.fill(tf.shape(update), tf.constant(np.nan, update.dtype)),
                             commit)
        return tf.reshape(tf.cast(update, p.grad_dtype), p.shape)

    # ---- what the shared transports ask of the step (see hvd_compress/bucket.py) ------------------------------

    def _in_force(self):
        return self._compressors

    def _seed_step(self):
        return self._now[0]

    def server_error_of(self, name):
        return self._now[1][self._server_slice(name)]

    def _server_slice(self, name):
        """Where this rank's part of a server buffer lies (sharded: its slice; hierarchical: its local rank's)."""
        return self._slice_of(self._transports.get(name), self.sizes[name])

    def _worker_slice(self, name):
        """Where this rank's part of a worker buffer lies (hierarchical: its local rank's slice of the node's)."""
        how = self._transports.get(name)
        return self._slice_of(how, self.sizes[name]) if how == "hierarchical" else slice(None)

    def _spare_buffer(self, kind, name, like):
        return True   # TensorFlow: the new buffer is a new tensor, assigned when the step commits

    # ---- the process set: ranks are counted within it ------------------------------------------------------

    def _bind(self, theirs, optimizer):
        """At the first step: run on the set the gradients are reduced on (a Compression on another set would
        wait in its collectives for ranks that never come: refused), check that a Keras optimizer applies no
        momentum of its own over the momentum correction, then compare the configuration of its ranks (eagerly,
        also while a step function is being traced)."""
        self.process_set = horovod.process_set_for(self.process_set, theirs)
        self._check_root(self.size())
        with tf.init_scope():   # eager collectives: the configuration check and what "auto" measures
            horovod.check_momentum_of(self.config, optimizer)
            self._check_same_config_everywhere()
            todo = {n: d for n, d in self.sizes.items() if n not in self._transports}   # all, but after a resume
            self._transports.update(plan(self, self.sizes, todo))
        self._buckets = {n: Bucket(f"{self.tag}.{i}", [n], how) for i, (n, how) in
                         enumerate(self._transports.items()) if how != "dense"}
        self._bound = True

    def _shapes(self):
        return zip(self.names, self.shapes)

    def _options(self):
        return {"dense_below": self.dense_below, "nonfinite": self.nonfinite}

    def _figures(self):
        """For ``stats()``: one "bucket" per compressed variable (Horovod reduces one variable at a time)."""
        small = [self._transports.get(n) == "dense" and d < self.dense_below for n, d in self.sizes.items()]
        return {**self.state.figures([4 * d for d in self.sizes.values()], small, self.config.error_feedback),
                "buckets": [[n] for n in self._buckets]}
