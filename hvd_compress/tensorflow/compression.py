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

A step whose gradient is not finite anywhere leaves every buffer as it was, as in the PyTorch plug-in. But
Horovod runs compress, allreduce and decompress one variable after the other, each in its own ``tf.cond``, so
when the third variable turns out not finite the first two have already committed. The step is then written
into ``last_skipped`` (a variable every branch can read): the variables after it do not commit, and those
before it are marked (``committed_at`` = UNDONE), so that their next ``compress()`` reads the buffers kept
from before their commit, and ``state_dict()`` or ``stats()`` restores them. This is done with selects, not
``tf.cond``s: each branch is a function to trace, and to instantiate at the step function's first call (the
selects read both buffers, one more pass over each). Steps here are counted globally: a new one starts when
a variable's index does not grow. Skipped steps do not advance the per-variable step counts (the same seeds
come again).

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

# Collectives are named after the Compression object (its number in this process: every rank of the set
# builds the same objects in the same order)
_instances = itertools.count()
UNDONE = -2   # committed_at of a variable whose last commit was in a skipped step


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
        transport, link_gbps, dense_below: as in the PyTorch plug-in: how payloads travel ("allgather",
            "allreduce", "sharded", "dense", "hierarchical", "auto"; None: allreduce for summable
            payloads, else allgather),
            the link "auto" prices them with (None: measured at the first step), and the size under which a
            variable's gradient travels uncompressed in Horovod's allreduce (0: compress every variable).
        process_set: the Horovod process set whose ranks average the gradients, the one given to
            ``hvd.DistributedGradientTape(process_set=...)`` or ``hvd.DistributedOptimizer(process_set=...)``
            (None: every rank). Every collective of this object runs on it, ranks are counted within it
            (``root_rank=0`` is its first rank), and a gradient reduced on another set is refused.
        momentum, momentum_masking, nesterov, warmup, clip: Deep Gradient Compression's momentum correction
            (with factor masking unless momentum_masking=False; Nesterov's form with nesterov=True), warm-up of
            the sparsifier's ratio and local gradient clipping, as in the PyTorch plug-in (its docstring). The
            optimizer must then have no momentum of its own: a Keras optimizer that has is refused at the first
            step. During the warm-up k changes from step to step, and so does the length of the payloads: the
            step function must not be compiled by XLA then (Horovod's ops are not anyway). 1-bit Adam's warm-up,
            ``warmup=(steps, "dense")``, sends the first steps uncompressed, as in PyTorch.
        nonfinite: what a step does when some rank's gradient holds NaN or Inf. "skip" (as stock Horovod,
            whose averaged gradient is then non-finite too): that variable's gradient, and those reduced
            after it, are NaN on every rank, so that a loss-scaling optimizer skips the step; no buffer of
            the step changes, and the same seeds come again at the next step (counted in
            ``stats()["skipped_steps"]``). "raise": every rank raises an error naming the variable, and no
            buffer of the step changes either.

    Create it on every rank of the set; the first step compares the configurations of its ranks. It is a
    ``tf.Module``: ``tf.train.Checkpoint(compression=compression)`` saves this rank's buffers;
    ``state_dict()`` gathers every rank's.
    """

    ops = ops   # the shared transports' kernels and collectives, in TensorFlow

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
        if variables is None:
            raise ValueError("Compression needs variables=model.trainable_variables (in the order Horovod "
                             "reduces their gradients): Horovod passes compress() no variable")
        variables = list(variables)
        horovod.refuse_keras3_variables(variables)
        for v in variables:
            if not isinstance(v, tf.Variable):
                raise ValueError(f"variables must be tf.Variables, got {type(v).__name__}")
            try:
                K.compute_dtype(v.dtype)
            except TypeError as err:
                raise TypeError(f"variable {v.name!r}: {err}") from None
        self.names = [f"{i}/{v.name}" for i, v in enumerate(variables)]
        self.shapes = [tuple(v.shape) for v in variables]
        self.root_rank, self.seed = int(root_rank), int(seed)
        self.tag = next(_instances)
        dtypes = [K.compute_dtype(v.dtype) for v in variables]
        self.sizes = dict(zip(self.names, (int(np.prod(s)) for s in self.shapes)))
        self.bucket_bytes = 4 * max(self.sizes.values(), default=1)   # one variable per collective
        self._transports, self._buckets, self._kernel_table = {}, {}, None

        def buffers(prefix):
            return [tf.Variable(tf.zeros([d], dt), trainable=False, name=f"{prefix}_{i}")
                    for i, (d, dt) in enumerate(zip(self.sizes.values(), dtypes))]

        # the server buffer d is the root's (sharded: each rank's slice of it; the rest stays zero)
        self.worker_error = buffers("worker_error") if self.config.error_feedback else []
        self.server_error = buffers("server_error") if self.config.server is not None else []
        # the buffers before their last commit, to undo a commit made in a step that is then skipped
        self.worker_error_before = buffers("worker_error_before") if self.config.error_feedback else []
        self.server_error_before = buffers("server_error_before") if self.config.server is not None else []
        self.velocity = buffers("velocity") if self.config.momentum else []   # u (momentum correction)
        self.velocity_before = buffers("velocity_before") if self.config.momentum else []
        count = len(self.names)
        self.steps = [tf.Variable(0, dtype=tf.int64, trainable=False, name=f"step_{i}") for i in range(count)]
        # global step count; index of the last variable compressed (a new step starts when it does not grow);
        # the global step of each variable's last commit (-1: none; UNDONE: in a skipped step); the skipped
        # steps: how many, the last
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        self.last_index = tf.Variable(count, dtype=tf.int64, trainable=False, name="last_index")
        self.committed_at = tf.Variable(tf.fill([count], tf.constant(-1, tf.int64)), trainable=False,
                                        name="committed_at")
        self.skipped_count = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_steps")
        self.last_skipped = tf.Variable(-1, dtype=tf.int64, trainable=False, name="last_skipped_step")
        # last step's ||C(x) - x||^2, ||x||^2 and ||d||^2 per variable, for stats(); bytes sent (last, total)
        self.last = tf.Variable(tf.zeros([count, 3], tf.float64), trainable=False, name="last_step_norms")
        self.sent = tf.Variable(tf.zeros([count], tf.int64), trainable=False, name="bytes_sent")
        self.sent_total = tf.Variable(tf.zeros([count], tf.int64), trainable=False, name="bytes_sent_total")
        self._index_of = horovod.GradientOrder(self.shapes)
        self._now = None   # (step, server buffer, worker buffer, velocity) in force for the variable being compressed
        self._compressors = None   # (worker, server) in force for it (see _in_force)

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
        global_step = self._global_step(i)
        with tf.control_dependencies([global_step]):
            # the buffers and step count in force: as before the last commit if that step was skipped
            undone = tf.equal(self.committed_at[i], UNDONE)
            step = self.steps[i] - tf.cast(undone, tf.int64)
            g = tf.reshape(tf.cast(tensor, K.compute_dtype(tensor.dtype)), [-1])
            e_in = _in_force(undone, self.worker_error_before[i], self.worker_error[i]) \
                if self.config.error_feedback and how != "dense" else None
            u_in = _in_force(undone, self.velocity_before[i], self.velocity[i]) if self.velocity else None
            self._now = (step, _in_force(undone, self.server_error_before[i], self.server_error[i])
                         if self.server_error else None, e_in, u_in)
            self._compressors = self._in_force(step)
        x, velocity = self._precondition(g, u_in)   # with momentum, x is u (Nesterov: g + m u)
        p = Pending(name, how, tensor.shape, tensor.dtype, 0, work=x, velocity=velocity)
        ctx = (i, global_step, p, self._now)
        if how == "dense":   # Horovod averages the gradient (with momentum correction: u) itself
            p.bytes_sent = self.sizes[name] * tensor.dtype.size
            return (tensor if x is g else tf.reshape(tf.cast(x, tensor.dtype), tensor.shape)), ctx
        bucket = self._buckets[name]
        mine = None if e_in is None else e_in[self._worker_slice(name)]   # hierarchical: this rank's slice
        try:
            bucket.transport.encode(self, p, mine, True if e_in is not None else None)
        except ValueError as err:
            slices = {"sharded": self.size(), "hierarchical": self.nodes and self.nodes.local_size}.get(how)
            where = f" (one of its {slices} slices, transport {how!r})" if slices else ""
            raise ValueError(f"variable {name!r}{where}: {err}") from None
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
        i, global_step, p, (step, d_in, e_in, u_in) = ctx
        name, dense = self.names[i], p.transport == "dense"
        expected = tf.cast(step + 1, tf.float32)
        if dense:   # the average itself says whether some rank's gradient was not finite
            not_finite = tf.logical_not(tf.reduce_all(tf.math.is_finite(reduced)))
            in_step = tf.logical_not(not_finite)
        else:
            not_finite = tf.math.is_nan(reduced[0])
            in_step = tf.abs(reduced[0] - expected) <= 1e-3 * expected
        skip_step, skip_writes = self._skip_if(not_finite, global_step)
        sent = tf.IndexedSlices(tf.reshape(tf.cast(p.bytes_sent, tf.int64), [1]), tf.constant([i]))
        sent = [self.sent.scatter_update(sent), self.sent_total.scatter_add(sent)]   # sent, even if skipped
        with tf.control_dependencies(skip_writes + sent):   # written before a "raise" stops the graph
            # the Assert op itself: tf.debugging.Assert would add a tf.cond (the graph per variable is most of
            # the tracing time)
            check = tf.raw_ops.Assert(
                condition=tf.logical_or(in_step, tf.logical_and(not_finite, self.nonfinite == "skip")),
                data=[f"hvd_compress: variable {name!r}: the gradient is not finite (NaN or Inf) on some rank "
                      f"(NaN marker), or ranks are out of step, or Horovod does not average (use op=hvd.Average). "
                      f"No buffer of this step was changed. Marker and expected step:", reduced[0], expected])
        update = tf.reshape(tf.cast(reduced, p.work.dtype), [-1]) if dense else p.update

        def commit():
            assigns = [self.steps[i].assign(step + 1), self.committed_at[i].assign(global_step)]
            if p.velocity is not None:
                assigns += [self.velocity_before[i].assign(u_in), self.velocity[i].assign(p.velocity)]
            if dense:
                with tf.control_dependencies(assigns):
                    return tf.identity(update)
            norms = [p.stats[0], p.stats[1], tf.constant(0.0, tf.float64)]
            if self.config.error_feedback:
                new = _placed(e_in, self._worker_slice(name), p.worker_error)
                assigns += [self.worker_error_before[i].assign(e_in), self.worker_error[i].assign(new)]
            if p.server_error is not None:
                new = _placed(d_in, self._server_slice(name), p.server_error)
                assigns += [self.server_error_before[i].assign(d_in), self.server_error[i].assign(new)]
                norms[2] = p.server_stats[0]
            assigns.append(self.last[i].assign(tf.stack(norms)))
            with tf.control_dependencies(assigns):
                return tf.identity(update)

        with tf.control_dependencies([check]):
            update = tf.cond(skip_step, lambda: tf.fill(tf.shape(update), tf.constant(np.nan, update.dtype)),
                             commit)
        return tf.reshape(tf.cast(update, p.grad_dtype), p.shape)

    # ---- what the shared transports ask of the step (see hvd_compress/bucket.py) ------------------------------

    def worker(self):
        return self._compressors[0]

    def server(self):
        return self._compressors[1]

    def _in_force(self, step):
        """The worker and server compressors at ``step``, a value in the graph: during a warm-up of the ratio,
        their k is looked up there, so that payloads shrink step by step as in PyTorch (their length is not
        static); with a dense warm-up, ``ops.Either`` of the warm-up's compressors and the configured ones."""
        steps, first = self.config.warmup
        if first == "dense":
            return tuple(c and ops.Either(step < steps, at(0), c) for c, at in
                         ((self.config.worker, self.config.worker_at), (self.config.server, self.config.server_at)))
        at = tf.minimum(step, steps)
        return self.config.in_force_by(lambda ks: tf.gather(tf.constant(ks, tf.int32), at))

    def _seed_step(self):
        return self._now[0]

    def server_error_of(self, name):
        return self._now[1][self._server_slice(name)]

    def _precondition(self, g, u_in):
        """Deep Gradient Compression's local clipping, then its momentum correction: (what is compressed or
        averaged in g's place, the new velocity u <- m u + g or None). The simulation's formulas."""
        if self.config.clip:
            g = K.clip_norm(g, self.config.clip_threshold(self.size()))
        if not self.config.momentum:
            return g, None
        velocity = g + self.config.momentum * u_in
        return (g + self.config.momentum * velocity if self.config.nesterov else velocity), velocity

    def _server_slice(self, name):
        """Where this rank's part of a server buffer lies in it (sharded: its slice; hierarchical: that of its
        local rank)."""
        return self._slice_of(self._transports.get(name), self.sizes[name])

    def _worker_slice(self, name):
        """Where this rank's part of a worker buffer lies in it (hierarchical: the slice of the node's average
        that its local rank compresses)."""
        how = self._transports.get(name)
        return self._slice_of(how, self.sizes[name]) if how == "hierarchical" else slice(None)

    def _spare_buffer(self, kind, name, like):
        return True   # TensorFlow: the new buffer is a new tensor, assigned when the step commits

    # ---- steps that are skipped for a non-finite gradient (see the module's docstring) -----------------------

    def _global_step(self, i):
        """The global step this gradient belongs to: a new one when the variable index does not grow."""
        new_step = tf.cast(i <= self.last_index.read_value(), tf.int64)
        with tf.control_dependencies([self.last_index.assign(i)]):
            return self.step.assign_add(new_step).read_value()

    def _skip_if(self, not_finite, global_step):
        """Whether this step is skipped (this gradient is not finite, or an earlier one was), and the writes
        that record it: the step into last_skipped (counted once), and UNDONE for the variables that
        committed in it."""
        last, committed = self.last_skipped.read_value(), self.committed_at.read_value()
        already = tf.equal(last, global_step)
        writes = [self.skipped_count.assign_add(tf.cast(tf.logical_and(not_finite, tf.logical_not(already)), tf.int64)),
                  self.last_skipped.assign(tf.where(not_finite, global_step, last)),
                  self.committed_at.assign(tf.where(tf.logical_and(not_finite, tf.equal(committed, global_step)),
                                                    tf.constant(UNDONE, tf.int64), committed))]
        return tf.logical_or(not_finite, already), writes

    def _settle(self):
        """Eagerly restores the buffers of the commits made in skipped steps, before they are read."""
        for i in np.flatnonzero(self.committed_at.numpy() == UNDONE):   # none unless a step was skipped
            self.steps[i].assign_sub(1)
            self.committed_at[i].assign(-1)
            if self.config.error_feedback:
                self.worker_error[i].assign(self.worker_error_before[i])
            if self.config.server is not None:
                self.server_error[i].assign(self.server_error_before[i])
            if self.config.momentum:
                self.velocity[i].assign(self.velocity_before[i])

    # ---- the process set: ranks are counted within it ------------------------------------------------------

    def _bind(self, theirs, optimizer):
        """At the first step: run on the set the gradients are reduced on (a Compression on another set would
        wait in its collectives for ranks that never come: refused), check that a Keras optimizer applies no
        momentum of its own over the momentum correction, then compare the configuration of its ranks (eagerly,
        also while a step function is being traced)."""
        if theirs is not None and self.process_set is not None \
                and theirs.process_set_id != self.process_set.process_set_id:
            raise ValueError(f"the gradients are reduced on the process set {theirs.ranks or 'of all ranks'} but "
                             f"this Compression was given {self.process_set.ranks or 'all ranks'}: give it the "
                             f"same process_set as the tape or optimizer (or none)")
        self.process_set = self.process_set or theirs or hvd.global_process_set
        if not 0 <= self.root_rank < self.size():
            raise ValueError(f"root_rank must be a rank of the {self.size()} ranks (of the process set), "
                             f"got {self.root_rank!r}")
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

    # ---- checkpointing and statistics ----------------------------------------------------------------------

    def state_dict(self):
        """Every rank's worker error buffers, the server buffers (the root's; sharded: every rank's slice) and
        the per-variable steps, as numpy arrays. A collective when there are several ranks: call it on every
        rank (eagerly), save it on one."""
        return checkpoint.state_dict(self)

    def load_state_dict(self, state):
        """Restores what ``state_dict()`` saved; every rank loads the same dict and takes its own part."""
        checkpoint.load_state_dict(self, state)

    def _figures(self):
        """For ``stats()`` (PyTorch's keys); one "bucket" per compressed variable (Horovod reduces one variable at
        a time)."""
        self._settle()
        steps = [int(s.numpy()) for s in self.steps]
        last, sent, sent_total = self.last.numpy(), self.sent.numpy(), self.sent_total.numpy()
        dense = [4 * d for d in self.sizes.values()]
        done = max(steps, default=0)
        now = [s == done and done > 0 for s in steps]
        small = [self._transports.get(n) == "dense" and d < self.dense_below for n, d in self.sizes.items()]
        return {"steps": done, "skipped_steps": int(self.skipped_count.numpy()),
                "last_step_skipped": int(self.last_skipped.numpy()) == int(self.step.numpy()),
                "bytes_sent": int(sum(b for b, x in zip(sent, now) if x)),
                "dense_bytes": sum(b for b, x in zip(dense, now) if x),
                "dense_small_bytes": int(sum(b for b, x, y in zip(sent, now, small) if x and y)),
                "residual": float(last[:, 0].sum()), "norm": float(last[:, 1].sum()),
                "worker_error": float(last[:, 0].sum()) if self.config.error_feedback else 0.0,
                "server_error": float(last[:, 2].sum()),
                "total_bytes_sent": int(sent_total.sum()),
                "total_dense_bytes": sum(b * s for b, s in zip(dense, steps)),
                "buckets": [[n] for n in self._buckets]}


def _placed(whole, part, piece):
    """``whole`` with ``piece`` in its ``part`` (a slice; all of it: piece itself)."""
    if part == slice(None):
        return piece
    return tf.concat([whole[:part.start], piece, whole[part.stop:]], 0)


def _in_force(undone, before, now):
    """A buffer as it is in force: the value kept from before its last commit if that was undone."""
    return tf.where(undone, before.read_value(), now.read_value())
