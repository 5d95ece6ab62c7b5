"""The TensorFlow plug-in's state, as variables, and how a step commits it or, when the step turns out to be
skipped, undoes it.

A step whose gradient is not finite anywhere leaves every buffer as it was, as in the PyTorch plug-in. But
Horovod runs compress, allreduce and decompress one variable after the other, each in its own ``tf.cond``, so
when the third variable turns out not finite the first two have already committed. The step is then written
into ``last_skipped`` (a variable every branch can read): the variables after it do not commit, and those
before it are marked (``committed_at`` = UNDONE), so that their next step reads the buffers kept from before
their commit, and ``settle()`` (before ``state_dict()`` or ``stats()``) restores them. This is done with
selects, not ``tf.cond``s: each branch is a function to trace, and to instantiate at the step function's first
call (the selects read both buffers, one more pass over each). Steps here are counted globally: a new one
starts when a variable's index does not grow. Skipped steps do not advance the per-variable step counts (the
same seeds come again).
"""
import numpy as np
import tensorflow as tf

UNDONE = -2   # committed_at of a variable whose last commit was in a skipped step


class State(tf.Module):
    """Per variable i: the worker error buffer e, the server buffer d (the root's; sharded and hierarchical:
    this rank's slice of it, the rest zero) and the velocity u, each with its value from before its last commit;
    the step count; the last step's ||C(x) - x||^2, ||x||^2, ||d||^2 and bytes sent, and the bytes in all."""

    def __init__(self, sizes, dtypes, error_feedback, server, momentum):
        super().__init__(name="state")

        def buffers(prefix, needed):
            return [tf.Variable(tf.zeros([d], dt), trainable=False, name=f"{prefix}_{i}")
                    for i, (d, dt) in enumerate(zip(sizes, dtypes))] if needed else []

        self.worker_error, self.worker_error_before = buffers("worker_error", error_feedback), \
            buffers("worker_error_before", error_feedback)
        self.server_error, self.server_error_before = buffers("server_error", server), \
            buffers("server_error_before", server)
        self.velocity, self.velocity_before = buffers("velocity", momentum), buffers("velocity_before", momentum)
        count = len(sizes)
        self.steps = [tf.Variable(0, dtype=tf.int64, trainable=False, name=f"step_{i}") for i in range(count)]
        # the global step count; the index of the last variable compressed; the global step of each variable's
        # last commit (-1: none; UNDONE: in a skipped step); the skipped steps: how many, the last
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        self.last_index = tf.Variable(count, dtype=tf.int64, trainable=False, name="last_index")
        self.committed_at = tf.Variable(tf.fill([count], tf.constant(-1, tf.int64)), trainable=False,
                                        name="committed_at")
        self.skipped_count = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_steps")
        self.last_skipped = tf.Variable(-1, dtype=tf.int64, trainable=False, name="last_skipped_step")
        self.last = tf.Variable(tf.zeros([count, 3], tf.float64), trainable=False, name="last_step_norms")
        self.sent = tf.Variable(tf.zeros([count], tf.int64), trainable=False, name="bytes_sent")
        self.sent_total = tf.Variable(tf.zeros([count], tf.int64), trainable=False, name="bytes_sent_total")

    def begin(self, i, error_feedback):
        """Variable i's step begins: (the global step it belongs to, and in force for it (as before its last
        commit if that step was skipped): its step count, d, e (None without ``error_feedback``) and u)."""
        new_step = tf.cast(i <= self.last_index.read_value(), tf.int64)   # the index did not grow
        with tf.control_dependencies([self.last_index.assign(i)]):
            global_step = self.step.assign_add(new_step).read_value()
        with tf.control_dependencies([global_step]):
            undone = tf.equal(self.committed_at[i], UNDONE)

            def in_force(before, now):
                return tf.where(undone, before[i].read_value(), now[i].read_value()) if now else None

            return global_step, (self.steps[i] - tf.cast(undone, tf.int64),
                                 in_force(self.server_error_before, self.server_error),
                                 in_force(self.worker_error_before, self.worker_error) if error_feedback else None,
                                 in_force(self.velocity_before, self.velocity))

    def skip_if(self, i, not_finite, global_step, bytes_sent):
        """Whether this step is skipped (variable i's gradient is not finite, or an earlier one was), and the
        writes that record it: the step into last_skipped (counted once), UNDONE for the variables that
        committed in it, and the bytes variable i sent (even in a skipped step)."""
        last, committed = self.last_skipped.read_value(), self.committed_at.read_value()
        already = tf.equal(last, global_step)
        sent = tf.IndexedSlices(tf.reshape(tf.cast(bytes_sent, tf.int64), [1]), tf.constant([i]))
        writes = [self.skipped_count.assign_add(tf.cast(tf.logical_and(not_finite, tf.logical_not(already)), tf.int64)),
                  self.last_skipped.assign(tf.where(not_finite, global_step, last)),
                  self.committed_at.assign(tf.where(tf.logical_and(not_finite, tf.equal(committed, global_step)),
                                                    tf.constant(UNDONE, tf.int64), committed)),
                  self.sent.scatter_update(sent), self.sent_total.scatter_add(sent)]
        return tf.logical_or(not_finite, already), writes

    def commit(self, i, global_step, now, p, worker_part, server_part):
        """The writes of variable i's step: its count, u, and (compressed) e and d in their parts (slices, the
        rest as it was) with their values before, and the norms for ``stats()``."""
        step, d_in, e_in, u_in = now
        assigns = [self.steps[i].assign(step + 1), self.committed_at[i].assign(global_step)]
        if p.velocity is not None:
            assigns += [self.velocity_before[i].assign(u_in), self.velocity[i].assign(p.velocity)]
        if p.transport == "dense":
            return assigns
        norms = [p.stats[0], p.stats[1], tf.constant(0.0, tf.float64)]
        if e_in is not None:
            assigns += [self.worker_error_before[i].assign(e_in),
                        self.worker_error[i].assign(_placed(e_in, worker_part, p.worker_error))]
        if p.server_error is not None:
            assigns += [self.server_error_before[i].assign(d_in),
                        self.server_error[i].assign(_placed(d_in, server_part, p.server_error))]
            norms[2] = p.server_stats[0]
        return assigns + [self.last[i].assign(tf.stack(norms))]

    def settle(self):
        """Eagerly restores the buffers of the commits made in skipped steps, before they are read."""
        for i in np.flatnonzero(self.committed_at.numpy() == UNDONE):   # none unless a step was skipped
            self.steps[i].assign_sub(1)
            self.committed_at[i].assign(-1)
            for now, before in ((self.worker_error, self.worker_error_before),
                                (self.server_error, self.server_error_before), (self.velocity, self.velocity_before)):
                if now:
                    now[i].assign(before[i])

    def figures(self, dense_bytes, small, error_feedback):
        """For ``stats()`` (PyTorch's keys), from the variables' ``dense_bytes`` (fp32) and whether each is
        ``small`` (dense for being under ``dense_below``)."""
        self.settle()
        steps = [int(s.numpy()) for s in self.steps]
        last, sent, sent_total = self.last.numpy(), self.sent.numpy(), self.sent_total.numpy()
        done = max(steps, default=0)
        now = [s == done and done > 0 for s in steps]
        return {"steps": done, "skipped_steps": int(self.skipped_count.numpy()),
                "last_step_skipped": int(self.last_skipped.numpy()) == int(self.step.numpy()),
                "bytes_sent": int(sum(b for b, x in zip(sent, now) if x)),
                "dense_bytes": sum(b for b, x in zip(dense_bytes, now) if x),
                "dense_small_bytes": int(sum(b for b, x, y in zip(sent, now, small) if x and y)),
                "residual": float(last[:, 0].sum()), "norm": float(last[:, 1].sum()),
                "worker_error": float(last[:, 0].sum()) if error_feedback else 0.0,
                "server_error": float(last[:, 2].sum()),
                "total_bytes_sent": int(sent_total.sum()),
                "total_dense_bytes": sum(b * s for b, s in zip(dense_bytes, steps))}


def _placed(whole, part, piece):
    """``whole`` with ``piece`` in its ``part`` (a slice; all of it: piece itself)."""
    if part == slice(None):
        return piece
    return tf.concat([whole[:part.start], piece, whole[part.stop:]], 0)
