"""What the shared transports (``hvd_compress/bucket.py``) need from TensorFlow: the kernels and Horovod's
collectives, as graph ops (a collective's "handle" is its result). Everything is functional: ``out=``
only gives the dtype, and ``e_out`` is True where the new error is wanted (it is returned)."""
import numpy as np
import tensorflow as tf
import horovod.tensorflow as hvd

from .. import compressors as C
from .. import nodes
from .. import transport as T
from . import fused
from . import kernels as K


def compressors_at(config, step):
    """The worker and server compressors at ``step``, a value in the graph: during a warm-up of the ratio,
    their k is looked up there, so that payloads shrink step by step as in PyTorch (their length is not
    static); with a dense warm-up, ``Either`` of the warm-up's compressors and the configured ones."""
    steps, first = config.warmup
    if first == "dense":
        return tuple(c and Either(step < steps, at(0), c) for c, at in
                     ((config.worker, config.worker_at), (config.server, config.server_at)))
    at = tf.minimum(step, steps)
    return config.in_force_by(lambda ks: tf.gather(tf.constant(ks, tf.int32), at))


class Either:
    """The compressor in force during a dense warm-up (``warmup=(steps, "dense")``): ``warm`` (uncompressed)
    while ``flag``, a boolean in the graph, holds, else ``c``. The kernels below choose between the two with a
    ``tf.cond``; the transports' collectives stay outside the conds, the same on every rank whichever is in
    force (a run with whole exchanges, Horovod's ops included, in the branches of one cond hung)."""

    def __init__(self, flag, warm, c):
        self.flag, self.warm, self.c = flag, warm, c

    def wire_bytes(self, d, value_itemsize=4):
        return tf.where(self.flag, self.warm.wire_bytes(d, value_itemsize), self.c.wire_bytes(d, value_itemsize))

    def layout(self, d):   # (checks d for both)
        self.warm.layout(d)
        return self.c.layout(d)


def _either(c, run):
    """run(c): a tuple of tensors or None; for an Either, each tensor chosen in the graph (None where both
    give None)."""
    if not isinstance(c, Either):
        return run(c)
    absent = []

    def branch(chosen):
        def run_chosen():
            out = run(chosen)
            absent[:] = [t is None for t in out]
            return [tf.zeros([0]) if t is None else t for t in out]
        return run_chosen
    out = tf.cond(c.flag, branch(c.warm), branch(c.c))
    return tuple(None if none else t for t, none in zip(out, absent))


def step(c, x, e_in, e_out, seed):
    """(parts, stats, new error) with x = g + e_in: the PyTorch kernels' contract (stats = float64
    [||x - C(x)||^2, ||x||^2, 1.0 if x is finite else 0.0]), the new error only where e_out is given. For an
    Either, parts is the first part alone (the values, all a transport reads of parts)."""
    if not isinstance(c, Either):
        return _step(c, x, e_in, e_out, seed)

    def first_part(c):
        parts, stats, left = _step(c, x, e_in, e_out, seed)
        return parts[0], stats, left
    first, stats, left = _either(c, first_part)
    return [first], stats, left


def _step(c, x, e_in, e_out, seed):
    if fused.usable(c, x.dtype, x, e_in):
        return fused.step(c, x, e_in, e_out is not None, seed, lambda: _step_ops(c, x, e_in, e_out, seed))
    return _step_ops(c, x, e_in, e_out, seed)


def _step_ops(c, x, e_in, e_out, seed):
    if e_in is not None:
        x = x + e_in
    d = numel(x)
    parts = K.encode_ops(c, x, seed)
    left = x - K.decode_ops(c, parts, d, seed, x.dtype)
    stats = tf.stack([tf.reduce_sum(tf.square(tf.cast(left, tf.float64))),
                      tf.reduce_sum(tf.square(tf.cast(x, tf.float64))),
                      tf.cast(tf.reduce_all(tf.math.is_finite(x)), tf.float64)])
    return parts, stats, (left if e_out is not None else None)


def packed_step(comp, c, key, x, e_in, e_out, seed):
    def packed(c):
        parts, stats, left = _step(c, x, e_in, e_out, seed)
        return K.pack(c, parts, numel(x)), stats, left
    return _either(c, packed)


def decode_mean(c, rows, d, seed, out):
    """(sum_j decode(row_j)) / n, summed in rank order on every rank (bit-identical replicas)."""
    def mean(c):
        if fused.usable(c, out.dtype, *rows, decoding=True):
            return (fused.decode_mean(c, [K.unpack(c, row, d, out.dtype) for row in rows], d, out.dtype),)
        total = None
        for row in rows:
            decoded = K.decode(c, K.unpack(c, row, d, out.dtype), d, seed, out.dtype)
            total = decoded if total is None else total + decoded
        # a true division: in a graph, Grappler turns "/ n" into "* (1/n)", one ulp off the simulation's
        return (tf.math.divide_no_nan(total, tf.constant(len(rows), out.dtype)),)
    return _either(c, mean)[0]


def decode_values(c, values, d, seed, out):
    return _either(c, lambda c: (K.decode(c, [values], d, seed, out.dtype),))[0]


def _bytes(t):
    return tf.reshape(tf.bitcast(t, tf.uint8), [-1])


def _from_bytes(data, n, dtype):
    return tf.reshape(tf.bitcast(tf.reshape(data, [n, dtype.size]), dtype), [n])


def pack_exact(v):
    """The PyTorch plug-in's ``pack_exact`` bytes: int32 header, then the nonzeros (count; the counts of the
    indices' blocks, the values, the indices' low 16 bits) or all of v (-1), whichever is smaller."""
    idx = tf.cast(tf.where(tf.not_equal(v, 0))[:, 0], tf.int32)
    count, size, itemsize = tf.size(idx), numel(v), v.dtype.size

    def sparse():
        low, below = K.index_to_wire(idx, size)
        return tf.concat([_bytes(tf.reshape(count, [1])), _bytes(below), _bytes(tf.gather(v, idx)), _bytes(low)], 0)
    return tf.cond(T.sparse_exact_bytes(size, count, itemsize) < size * itemsize, sparse,
                   lambda: tf.concat([_bytes(tf.constant([-1], tf.int32)), _bytes(v)], 0))


def _count(data, offset):
    return _from_bytes(data[offset:offset + 4], 1, tf.int32)[0]


def exact_length(data, offset, size, itemsize):
    count = _count(data, offset)
    return 4 + tf.where(count < 0, size * itemsize, T.sparse_exact_bytes(size, count, itemsize))


def unpack_exact(data, size, out):
    count, dtype = _count(data, 0), out.dtype

    def sparse():
        nbelow = C.index_counts(size)
        below = _from_bytes(data[4:4 + 4 * nbelow], nbelow, tf.int32)
        start = 4 + 4 * nbelow
        values = _from_bytes(data[start:start + count * dtype.size], count, dtype)
        start = start + count * dtype.size
        idx = K.index_from_wire(_from_bytes(data[start:start + 2 * count], count, tf.int16), below)
        return tf.tensor_scatter_nd_update(tf.zeros([size], dtype), tf.reshape(idx, [-1, 1]), values)
    return tf.cond(count < 0, lambda: _from_bytes(data[4:4 + size * dtype.size], size, dtype), sparse)


def mark_not_finite(stats, count):
    """A piece's stats, marked not finite where ``count`` (of ranks whose piece was not) is nonzero."""
    return tf.stack([stats[0], stats[1], tf.minimum(stats[2], tf.cast(tf.equal(count, 0), stats.dtype))])


def combine_stats(stats):
    stats = tf.stack(stats)
    return tf.stack([tf.reduce_sum(stats[:, 0]), tf.reduce_sum(stats[:, 1]), tf.reduce_min(stats[:, 2])])


def flags(stats, like=None):
    return tf.cast(tf.stack([tf.equal(s[2], 0) for s in stats]), tf.uint8 if like is None else like.dtype)


def count_flags(flags, members):
    return tf.reduce_sum(tf.cast(tf.reshape(flags, [-1, members]), tf.float64), 0)


def cat(tensors, keep=None):
    return tf.concat(tensors, 0)


def join(whole, pieces):
    return tf.concat(pieces, 0)


def rows(t, n):
    return tf.reshape(t, [n, -1])


def flat(t):
    return tf.reshape(t, [-1])


numel = K.numel


def itemsize(t):
    return t.dtype.size


def empty_bytes(n, like):
    """A receive buffer (its value is never read), made from data rather than a constant: Horovod's ops are
    not marked stateful, so Grappler would run a broadcast of a constant at graph optimization, on this rank
    alone, and the ranks' collectives would no longer match (a hang)."""
    return tf.fill([n], tf.cast(tf.size(tf.where(tf.math.is_nan(like))), tf.uint8))


def buffer_like(t):
    return True


def view_values(data, like):
    return _from_bytes(data, numel(data) // like.dtype.size, like.dtype)


def zeros(n, comp):
    return tf.zeros([n], tf.float32)


def randn(n, comp):
    return tf.constant(np.random.RandomState(0).randn(n).astype(np.float32))


def sync(t):
    return t


# ---- Horovod's collectives (ops in the graph: the handle is the result) ---------------------------------

def allgather(t, name, process_set):
    return hvd.allgather(t, name=name, process_set=process_set)


def allreduce_mean(t, name, process_set):
    return hvd.allreduce(t, op=hvd.Average, name=name, process_set=process_set)


def node_mean(tensors, name, nodes, keep):
    """The exact average of a bucket's tensors over this rank's node (Horovod's allreduce; the PyTorch
    plug-in averages CPU tensors in shared memory)."""
    return allreduce_mean(cat(tensors), name, nodes.local)


def node_mean_of(average, ranges):
    return [average[a:b] for a, b in ranges]


def node_share(average, updates, ranges, outs, name, nodes):
    return False   # the transport allgathers the node's slices of the update


def alltoall(t, splits, name, process_set):
    # (splits may be tensors: a warm-up's payload lengths change from step to step)
    return hvd.alltoall(t, splits=tf.convert_to_tensor(splits, tf.int32), name=name, process_set=process_set)[0]


def broadcast(t, root, name, process_set):
    return hvd.broadcast(t, root, name=name, process_set=process_set)


def wait(handle):
    return handle


def allreduce_now(t, name, process_set):
    return hvd.allreduce(t, op=hvd.Sum, name=name, process_set=process_set)


def slowest(values, name, process_set):
    return hvd.allreduce(tf.constant(values, tf.float64), op=hvd.Max, name=name,
                         process_set=process_set).numpy().tolist()


def global_process_set():
    return hvd.global_process_set


def barrier_at_exit():
    nodes.barrier_at_exit(lambda: hvd.allreduce(tf.constant(0.0), name="hc.exit_barrier"))


node_place, process_sets = nodes.place, nodes.process_sets


def allgather_now(array, name, process_set):
    """Every rank's numpy ``array``, concatenated (eagerly)."""
    return hvd.allgather(tf.constant(array), name=name, process_set=process_set).numpy()


def concat_state(pieces):
    return np.concatenate(pieces)
