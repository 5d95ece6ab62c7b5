"""``Compression`` for TensorFlow: ``compression=`` of ``hvd.DistributedGradientTape``, of
``hvd.DistributedOptimizer``, of Horovod's Keras ``DistributedOptimizer`` (tf-keras) and, for Keras 3, of
``hvd_compress.keras.DistributedOptimizer``.

The same step as the PyTorch plug-in (the README's Design section), written for Horovod's TensorFlow path, which
calls ``compress(g)``, allreduces what it returns, and calls ``decompress()`` on the result, one gradient
at a time, while tracing a ``tf.function``. So everything happens in the graph:

    compress(g)    x = g + e               payload p = C_w(x)                 (e: error feedback)
                   allgather p's bytes (or allreduce summable payloads)      -> gbar = 1/n sum_j decode(p_j)
                   y = gbar + d, v = C_s(y); the root's payload bytes are broadcast; every rank decodes them
                   returns a one-element marker: the step number, or NaN where x is not finite
    decompress(m)  m is the marker averaged over ranks: NaN means some rank's gradient was not finite, a
                   wrong step that ranks are out of step or that Horovod does not average (an error naming
                   the variable). Otherwise e <- x - decode(p), d <- y - v, and v is the gradient.

Every rank keeps the server buffer d: gbar, d and the server seed are the same on every rank, so d stays
identical everywhere, while the broadcast keeps the root authoritative for v.

A step whose gradient is not finite anywhere leaves every buffer as it was, as in the PyTorch plug-in. But
Horovod runs compress, allreduce and decompress one variable after the other, each in its own ``tf.cond``, so
when the third variable turns out not finite the first two have already committed. The step is then written
into ``skipped`` (a variable every branch can read): the variables after it do not commit, and those before
it undo their commit (the previous buffers are kept) at their next ``compress()``, or when ``state_dict()``
or ``stats()`` reads the buffers. Steps here are counted globally: a new one starts when a variable's index
does not grow. Skipped steps do not advance the per-variable step counts (the same seeds come again).

Horovod passes compress() a bare gradient. Gradients arrive in the order of the variables given to the
tape or optimizer (Horovod skips variables without gradient), so ``variables=`` must be that list, in that
order: each gradient is matched to the next variable of its shape. Horovod's ``groups=`` reorders gradients
and is not supported.
"""

import os
import sys

import numpy as np
import tensorflow as tf
import horovod.tensorflow as hvd

from .. import compressors as C
from .. import agreement
from ..seeds import server_seed, worker_seed
from . import kernels as K


def _is_keras3_variable(v):
    return type(v).__module__.startswith("keras.") and not isinstance(v, tf.Variable)


class Compression(tf.Module):
    """Gradient compression with optional worker error feedback and DoubleSqueeze server pass.

    Args:
        compressor: worker compressor C_w (object or spec such as ``"topk:0.01"``).
        error_feedback: keep an error buffer per variable on every worker.
        server: compressor C_s of the DoubleSqueeze server pass; None for none.
        variables: the variables whose gradients Horovod reduces, in the same order
            (``model.trainable_variables``).
        root_rank: the rank whose server payload every rank applies.
        seed: base of the seeds of random compressors.
        process_set: the Horovod process set whose ranks average the gradients, the one given to
            ``hvd.DistributedGradientTape(process_set=...)`` or ``hvd.DistributedOptimizer(process_set=...)``
            (None: every rank). Every collective of this object runs on it, ranks are counted within it
            (``root_rank=0`` is its first rank), and a gradient reduced on another set is refused.
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

    def __init__(self, compressor, error_feedback=False, server=None, variables=None, root_rank=0, seed=0,
                 nonfinite="skip", process_set=None):
        super().__init__(name="hvd_compress")
        if process_set is not None and not process_set.included():
            raise ValueError(f"this rank ({hvd.rank()}) is not in the process set {process_set.ranks}: "
                             f"create the Compression on the set's ranks only")
        self.process_set = process_set   # None until the first step takes the tape's or optimizer's
        self._bound = False
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
        self.nonfinite = nonfinite
        worker = C.parse(compressor) or C.Identity()
        self.config = C.Config(worker, bool(error_feedback), C.parse(server))
        if variables is None:
            raise ValueError("Compression needs variables=model.trainable_variables (in the order Horovod "
                             "reduces their gradients): Horovod passes compress() no variable")
        variables = list(variables)
        if any(_is_keras3_variable(v) for v in variables):
            raise ValueError(
                "these are Keras 3 variables. With Keras 3, Horovod 0.28's Keras DistributedOptimizer accepts "
                "compression= but never averages gradients (ranks silently diverge). For model.fit on Keras 3 use "
                "hvd_compress.keras: its Compression(...) and DistributedOptimizer(optimizer, compression=...). "
                "Or use tf-keras with Horovod's wrapper (pip install tf-keras, TF_USE_LEGACY_KERAS=1 before "
                "importing TensorFlow). For a custom loop with hvd.DistributedGradientTape, pass "
                "variables=[v.value for v in model.trainable_variables]")
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
        dtypes = [K.compute_dtype(v.dtype) for v in variables]
        sizes = [int(np.prod(s)) for s in self.shapes]

        def buffers(prefix):
            return [tf.Variable(tf.zeros([d], dt), trainable=False, name=f"{prefix}_{i}")
                    for i, (d, dt) in enumerate(zip(sizes, dtypes))]

        self.worker_error = buffers("worker_error") if self.config.error_feedback else []
        self.server_error = buffers("server_error") if self.config.server is not None else []
        # the buffers before their last commit, to undo a commit made in a step that is then skipped
        self.worker_error_before = buffers("worker_error_before") if self.config.error_feedback else []
        self.server_error_before = buffers("server_error_before") if self.config.server is not None else []
        self.steps = [tf.Variable(0, dtype=tf.int64, trainable=False, name=f"step_{i}") for i in range(len(sizes))]
        # global step count; index of the last variable compressed (a new step starts when it does not grow);
        # the global step of each variable's last commit (-1: none to undo); the skipped global steps
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        self.last_index = tf.Variable(len(sizes), dtype=tf.int64, trainable=False, name="last_index")
        self.committed_at = tf.Variable(tf.fill([len(sizes)], tf.constant(-1, tf.int64)), trainable=False,
                                        name="committed_at")
        self.skipped = tf.Variable(tf.zeros([0], tf.int64), shape=tf.TensorShape([None]), trainable=False,
                                   name="skipped_steps")
        # last step's ||C(x) - x||^2 and ||x||^2 and ||d||^2 per variable, for stats()
        self.last = tf.Variable(tf.zeros([len(sizes), 3], tf.float64), trainable=False, name="last_step_norms")
        self._bytes_per_step = [0] * len(sizes)   # what this rank hands to collectives per step (static)
        self._cursor_graph, self._cursor = None, 0

    # ---- Horovod's Compressor interface ------------------------------------------------------------------

    # Plain Python over static shapes and configuration: autograph has nothing to convert (it would only
    # slow the tracing of every step function down)
    @tf.autograph.experimental.do_not_convert
    def compress(self, tensor):
        i = self._index_of(tensor)
        if not self._bound:
            self._bind(self._process_set_of_caller())
        name, worker, server = self.names[i], self.config.worker, self.config.server
        ps = self.process_set
        global_step = self._global_step(i)
        with tf.control_dependencies([global_step, self._undo_if_skipped(i)]):
            x = tf.reshape(tf.cast(tensor, K.compute_dtype(tensor.dtype)), [-1])
            step = self.steps[i].read_value()
            if self.config.error_feedback:
                x = x + self.worker_error[i]
        dtype, d = x.dtype, x.shape[0]
        seed = worker_seed(worker, self.seed, step, self._rank(), name)
        try:
            parts = K.encode(worker, x, seed)
        except ValueError as err:
            raise ValueError(f"variable {name!r}: {err}") from None
        local = K.decode(worker, parts, d, seed, dtype)
        n, sent = self._size(), 0
        if worker.summable:
            mean = hvd.allreduce(parts[0], op=hvd.Average, name=f"hc_w_{i}", process_set=ps)
            gbar = K.decode(worker, [mean], d, seed, dtype)
            sent += parts[0].shape[0] * dtype.size
        else:
            data = K.pack(parts)
            gathered = tf.reshape(hvd.allgather(data, name=f"hc_w_{i}", process_set=ps), [n, -1])
            gbar = None
            for r in range(n):   # in rank order on every rank: bit-identical sums
                decoded = K.decode(worker, K.unpack(worker, gathered[r], d, dtype), d, seed, dtype)
                gbar = decoded if gbar is None else gbar + decoded
            # a true division: in a graph, Grappler turns "/ n" into "* (1/n)", one ulp off the simulation's
            gbar = tf.math.divide_no_nan(gbar, tf.constant(n, dtype))
            sent += data.shape[0]
        update, server_error = gbar, None
        if server is not None:
            y = gbar + self.server_error[i]
            s_seed = server_seed(server, self.seed, step, name)
            data = hvd.broadcast(K.pack(K.encode(server, y, s_seed)), self._root(), name=f"hc_s_{i}",
                                 process_set=ps)
            update = K.decode(server, K.unpack(server, data, d, dtype), d, s_seed, dtype)
            server_error = y - update
            if self._rank() == self.root_rank:
                sent += data.shape[0]
        finite = tf.reduce_all(tf.math.is_finite(x))
        marker = tf.where(finite, tf.cast(step + 1, tf.float32), float("nan"))
        self._bytes_per_step[i] = sent + 4
        ctx = (i, tensor.shape, tensor.dtype, step, global_step, x, local, update, server_error)
        return tf.reshape(marker, [1]), ctx

    @tf.autograph.experimental.do_not_convert
    def decompress(self, marker, ctx):
        i, shape, grad_dtype, step, global_step, x, local, update, server_error = ctx
        name = self.names[i]
        expected = tf.cast(step + 1, tf.float32)
        not_finite = tf.math.is_nan(marker[0])
        skip_step = self._skip_if(not_finite, global_step)
        in_step = tf.abs(marker[0] - expected) <= 1e-3 * expected
        with tf.control_dependencies([skip_step]):   # written into skipped before a "raise" stops the graph
            check = tf.debugging.Assert(
                tf.logical_or(in_step, tf.logical_and(not_finite, self.nonfinite == "skip")),
                [f"hvd_compress: variable {name!r}: the gradient is not finite (NaN or Inf) on some rank "
                 f"(NaN marker), or ranks are out of step, or Horovod does not average (use op=hvd.Average). "
                 f"No buffer of this step was changed. Marker and expected step:", marker, expected])

        def commit():
            residual = tf.reduce_sum(tf.cast(tf.square(x - local), tf.float64))
            norms = [residual, tf.reduce_sum(tf.cast(tf.square(x), tf.float64)), tf.constant(0.0, tf.float64)]
            assigns = [self.steps[i].assign_add(1), self.committed_at[i].assign(global_step)]
            if self.config.error_feedback:
                assigns.append(_keep_and_assign(self.worker_error_before[i], self.worker_error[i], x - local))
            if server_error is not None:
                assigns.append(_keep_and_assign(self.server_error_before[i], self.server_error[i], server_error))
                norms[2] = tf.reduce_sum(tf.cast(tf.square(server_error), tf.float64))
            assigns.append(self.last[i].assign(tf.stack(norms)))
            with tf.control_dependencies(assigns):
                return tf.identity(update)

        with tf.control_dependencies([check]):
            update = tf.cond(skip_step, lambda: tf.fill(tf.shape(update), tf.constant(np.nan, update.dtype)),
                             commit)
        return tf.reshape(tf.cast(update, grad_dtype), shape)

    # ---- steps that are skipped for a non-finite gradient (see the module's docstring) -----------------------

    def _global_step(self, i):
        """The global step this gradient belongs to: a new one when the variable index does not grow."""
        new_step = tf.cast(i <= self.last_index.read_value(), tf.int64)
        with tf.control_dependencies([self.last_index.assign(i)]):
            return self.step.assign_add(new_step).read_value()

    def _skip_if(self, not_finite, global_step):
        """Writes the step into ``skipped`` if this gradient is not finite; whether the step is skipped."""
        def record():
            return self.skipped.assign(tf.concat([self.skipped, [global_step]], 0)).read_value()
        already = tf.reduce_any(tf.equal(self.skipped, global_step))
        skipped = tf.cond(tf.logical_and(not_finite, tf.logical_not(already)), record, self.skipped.read_value)
        return tf.reduce_any(tf.equal(skipped, global_step))

    def _undo(self, i):
        """Variable i's buffers and step count as before its last commit."""
        ops = [self.steps[i].assign_sub(1), self.committed_at[i].assign(-1)]
        if self.config.error_feedback:
            ops.append(self.worker_error[i].assign(self.worker_error_before[i]))
        if self.config.server is not None:
            ops.append(self.server_error[i].assign(self.server_error_before[i]))
        return ops

    def _committed_in_skipped_step(self, i):
        return tf.reduce_any(tf.equal(self.skipped, self.committed_at[i]))

    def _undo_if_skipped(self, i):
        def undo():
            with tf.control_dependencies(self._undo(i)):
                return tf.constant(True)
        return tf.cond(self._committed_in_skipped_step(i), undo, lambda: tf.constant(False))

    def _settle(self):
        """Eagerly undoes the commits made in skipped steps, before the buffers are read."""
        if not int(tf.size(self.skipped)):   # no step was ever skipped (stats() may be read every step)
            return
        for i in range(len(self.names)):
            if bool(self._committed_in_skipped_step(i)):
                self._undo(i)

    # ---- matching gradients to variables, and agreeing on the configuration ------------------------------

    def _index_of(self, tensor):
        graph = tf.compat.v1.get_default_graph()
        while type(graph).__name__ == "CondBranchFuncGraph":   # Horovod wraps each reduction in a tf.cond
            graph = graph.outer_graph
        if graph is not self._cursor_graph or self._cursor >= len(self.shapes):
            self._cursor_graph, self._cursor = graph, 0
        shape = tuple(tensor.shape)
        while self._cursor < len(self.shapes) and self.shapes[self._cursor] != shape:
            self._cursor += 1   # a variable without gradient: Horovod skipped it
        if self._cursor == len(self.shapes):
            raise ValueError(f"compress() got a gradient of shape {shape} that matches no remaining variable: "
                             f"give Compression the variables in the order their gradients are reduced")
        self._cursor += 1
        return self._cursor - 1

    # ---- the process set: ranks are counted within it ------------------------------------------------------

    def _bind(self, theirs):
        """At the first step: run on the set the gradients are reduced on (a Compression on another set would
        wait in its collectives for ranks that never come: refused), then compare the configuration of its
        ranks (eagerly, also while a step function is being traced)."""
        if theirs is not None and self.process_set is not None \
                and theirs.process_set_id != self.process_set.process_set_id:
            raise ValueError(f"the gradients are reduced on the process set {theirs.ranks or 'of all ranks'} but "
                             f"this Compression was given {self.process_set.ranks or 'all ranks'}: give it the "
                             f"same process_set as the tape or optimizer (or none)")
        self.process_set = self.process_set or theirs or hvd.global_process_set
        if not 0 <= self.root_rank < self._size():
            raise ValueError(f"root_rank must be a rank of the {self._size()} ranks (of the process set), "
                             f"got {self.root_rank!r}")
        with tf.init_scope():
            self._check_same_config_everywhere()
        self._bound = True

    @property
    def _set(self):
        """The process set collectives run on (all ranks until the first step binds one)."""
        return self.process_set or hvd.global_process_set

    def _size(self):
        return self._set.size()

    def _rank(self):
        return self._set.rank()

    def _root(self):
        """The global rank of the root (Horovod's broadcast takes a global rank)."""
        return self.root_rank if self._set.process_set_id == 0 else self._set.ranks[self.root_rank]

    @staticmethod
    def _process_set_of_caller():
        """The process_set of Horovod's allreduce that called compress() (None for a direct call)."""
        frame = sys._getframe(1)   # compress(), maybe a decorator's frame, then Horovod's allreduce
        for _ in range(5):
            if frame is None:
                return None
            if frame.f_code.co_filename.endswith(os.path.join("horovod", "tensorflow", "__init__.py")) \
                    and "process_set" in frame.f_locals:
                return frame.f_locals["process_set"]
            frame = frame.f_back
        return None

    def _allgather_object(self, obj, name):
        """Every rank's ``obj`` in rank order, over this object's process set (see
        ``agreement.allgather_object``)."""
        def allgather(array, part):
            return hvd.allgather(tf.constant(array), name=f"{name}_{part}", process_set=self._set).numpy()
        return agreement.allgather_object(obj, allgather)

    def fingerprint(self):
        return (agreement.fingerprint(self.config, self.root_rank, self.seed, zip(self.names, self.shapes))
                + f" nonfinite={self.nonfinite}")

    def _check_same_config_everywhere(self):
        if self._size() == 1:
            return
        mine = self.fingerprint()
        digests = hvd.allgather(tf.constant([agreement.digest(mine)], tf.int64), name="hc_config_check",
                                process_set=self.process_set).numpy()
        if (digests != agreement.digest(mine)).any():
            everyone = self._allgather_object(mine, "hc_config_check_text")
            raise agreement.mismatch_error(everyone)

    # ---- checkpointing and statistics ----------------------------------------------------------------------

    def state_dict(self):
        """Every rank's worker error buffers, the server buffers and the per-variable steps, as numpy arrays.
        A collective when there are several ranks: call it on every rank (eagerly), save it on one."""
        self._settle()
        mine = {n: e.numpy() for n, e in zip(self.names, self.worker_error)}
        everyone = self._allgather_object(mine, "hc_state_dict") if self._size() > 1 else [mine]
        return {"format": agreement.STATE_FORMAT, "fingerprint": self.fingerprint(), "size": len(everyone),
                "steps": {n: int(s.numpy()) for n, s in zip(self.names, self.steps)},
                "worker_error": everyone,
                "server_error": {n: d.numpy() for n, d in zip(self.names, self.server_error)}}

    def load_state_dict(self, state):
        """Restores what ``state_dict()`` saved; every rank loads the same dict and takes its own part."""
        agreement.check_state(state, self.fingerprint(), self._size())
        for name, e in zip(self.names, self.worker_error):
            e.assign(state["worker_error"][self._rank()][name])
        for name, d in zip(self.names, self.server_error):
            d.assign(state["server_error"][name])
        for name, s in zip(self.names, self.steps):
            s.assign(state["steps"][name])
        self.committed_at.assign(tf.fill([len(self.names)], tf.constant(-1, tf.int64)))

    def stats(self):
        """About the last completed step, with the PyTorch plug-in's keys (see its ``stats()``). Here every
        variable is compressed and travels on its own (allreduce for summable payloads, else allgather): no
        dense small tensors, one "bucket" per variable, no link measured."""
        self._settle()
        skipped = self.skipped.numpy()
        steps = [int(s.numpy()) for s in self.steps]
        last = self.last.numpy()
        dense = [4 * int(np.prod(s)) for s in self.shapes]
        done = max(steps, default=0)
        sent = sum(b for b, s in zip(self._bytes_per_step, steps) if s == done and done)
        dense_now = sum(b for b, s in zip(dense, steps) if s == done and done)
        return {"steps": done, "skipped_steps": len(skipped),
                "last_step_skipped": bool(len(skipped)) and int(skipped[-1]) == int(self.step.numpy()),
                "bytes_sent": sent, "dense_bytes": dense_now,
                "ratio": sent / dense_now if dense_now else 0.0,
                "variance": float(last[:, 0].sum() / last[:, 1].sum()) if last[:, 1].sum() else 0.0,
                "worker_error_norm": float(np.sqrt(last[:, 0].sum())) if self.config.error_feedback else 0.0,
                "server_error_norm": float(np.sqrt(last[:, 2].sum())),
                "dense_small_bytes": 0,
                "total_bytes_sent": sum(b * s for b, s in zip(self._bytes_per_step, steps)),
                "total_dense_bytes": sum(b * s for b, s in zip(dense, steps)),
                "transports": {n: "allreduce" if self.config.worker.summable else "allgather" for n in self.names},
                "buckets": [[n] for n in self.names], "link_gbps": None,
                "worker_ratio": C.ratio_of(self.config.worker)}

    def __repr__(self):
        return f"Compression({self.config.fingerprint()})"


def _keep_and_assign(before, buffer, value):
    """buffer's value into before, then value into buffer (in this order, whatever the graph's scheduling)."""
    with tf.control_dependencies([before.assign(buffer)]):
        return buffer.assign(value)
