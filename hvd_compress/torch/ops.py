"""What the shared transports (``hvd_compress/bucket.py``) need from PyTorch: the kernels and Horovod's
asynchronous collectives. ``out=`` arguments are written in place and returned; new errors go into the
preallocated buffer given as ``e_out`` (the spare half of a double buffer); a ScaledSign or OneBit error may
owe its last correction to the next step (``kernels.settle`` applies it: the plug-in's readers call it)."""
import functools
import os
import time

import torch
import horovod.torch as hvd

from .. import nodes
from .. import transport as T
from . import kernels as K
from . import node_memory

POLL_S = 5e-5   # between polls of a collective's handle (see wait)


def reused(cache, key, shape, dtype, device):
    """cache[key], or a new tensor kept there if it is not of this shape, dtype and device: a buffer allocated
    once and written again at every step."""
    t = cache.get(key)
    if t is None or t.shape != shape or t.dtype != dtype or t.device != device:
        t = cache[key] = torch.empty(shape, dtype=dtype, device=device)
    return t


def packed_step(comp, c, key, x, e_in, e_out, seed):
    """The worker (or server) step of one piece: (payload bytes, stats, new error), the payload written into
    a buffer kept for that piece (it is copied into the send buffer before the next step writes it again)."""
    data, stats = K.step_packed(c, x, e_in, e_out, seed, defer=True,
                                out=comp._payload_buffer(key, K.packed_nbytes(c, x.numel(), x.dtype), x.device))
    return data, stats, e_out


def step(c, x, e_in, e_out, seed):
    parts, stats = K.step(c, x, e_in, e_out, seed, defer=True)
    return parts, stats, e_out


def decode_mean(c, rows, d, seed, out):
    return K.decode_mean(c, rows, d, seed, out.dtype, out=out)


def decode_values(c, values, d, seed, out):
    # decoded straight into out: the mean of one payload, its values as the bytes that travel
    return K.decode_mean(c, [values.view(torch.uint8)], d, seed, out.dtype, out=out)


def pack_exact(v):
    return K.pack_exact(v)


def unpack_exact(data, size, out):
    return out.copy_(K.unpack_exact(data, [size], out.dtype))


def exact_length(data, offset, size, itemsize):
    """Bytes of the ``kernels.pack_exact`` slice of ``size`` elements at ``offset``, from its int32 header."""
    count = int(data[offset:offset + 4].clone().view(torch.int32).item())
    return 4 + (size * itemsize if count < 0 else T.sparse_exact_bytes(size, count, itemsize))


def mark_not_finite(stats, count):
    """A piece's stats, marked not finite where ``count`` (of ranks whose piece was not) is nonzero."""
    return torch.stack([stats[0], stats[1], torch.minimum(stats[2], (count == 0).to(stats.dtype))])


def combine_stats(stats):
    """The stats of a tensor from those of its slices."""
    stats = torch.stack(stats)
    return torch.stack([stats[:, 0].sum(), stats[:, 1].sum(), stats[:, 2].min()])


def flags(stats, like=None):
    """One element per tensor: 1 where its x is not finite on this rank (uint8, or like's dtype)."""
    return torch.stack([s[2] == 0 for s in stats]).to(torch.uint8 if like is None else like.dtype)


def count_flags(flags, members):
    """Per tensor, the sum of its flags over ranks (rows) or their average: nonzero where not finite somewhere."""
    return flags.reshape(-1, members).to(torch.float64).sum(0)


def cat(tensors, keep=None):
    """The tensors back to back: always a copy (payloads may be views of buffers that the step overwrites
    later); with ``keep`` (a bucket), in a buffer it keeps from step to step (its collective is finished
    before the next step writes it again): no fresh pages every step."""
    if keep is None:
        return torch.cat(tensors)
    size = sum(t.numel() for t in tensors)
    buffer = keep.send
    if buffer is None or buffer.numel() != size or buffer.dtype != tensors[0].dtype:
        buffer = keep.send = torch.empty(size, dtype=tensors[0].dtype, device=tensors[0].device)
    return torch.cat(tensors, out=buffer)


def join(whole, pieces):
    """``whole`` after its pieces (views into it) were written in place."""
    return whole


def rows(t, n):
    return t.view(n, -1)


def flat(t):
    return t.reshape(-1)


def numel(t):
    return t.numel()


def itemsize(t):
    return t.element_size()


def empty_bytes(n, like):
    return torch.empty(n, dtype=torch.uint8, device=like.device)


def buffer_like(t):
    return torch.empty_like(t)


def view_values(data, like):
    return data.view(like.dtype)


def zeros(n, comp):
    return torch.zeros(n, device=comp._device())


def randn(n, comp):
    return torch.randn(n, generator=torch.Generator().manual_seed(0)).to(comp._device())


def sync(t):
    if t.is_cuda:
        torch.cuda.synchronize(t.device)
    return t


# ---- host staging: collectives on host copies of device tensors ------------------------------------------

@functools.cache
def host_staging():
    """Whether collectives run on host copies: ``HVD_COMPRESS_HOST_STAGING=1`` stages every collective (a
    CPU tensor too: one copy, so the path is the same everywhere), ``0`` none; unset, device tensors are
    staged when this Horovod has no GPU operations (built without them it refuses CUDA tensors). Set it
    where NCCL cannot run, e.g. several ranks on one GPU (NCCL: "Duplicate GPU detected"): the kernels and
    buffers stay on the GPU, only the payloads (and the 4-byte step markers) cross to the host."""
    value = os.environ.get("HVD_COMPRESS_HOST_STAGING", "").strip().lower()
    if value not in ("", "0", "1", "false", "true"):
        raise ValueError(f"HVD_COMPRESS_HOST_STAGING={value!r}: use 1 (stage every collective on the host) or 0")
    if value:
        return "all" if value in ("1", "true") else None
    return None if hvd.cuda_built() or hvd.rocm_built() else "device"


def staged(t):
    """Whether a collective of ``t`` runs on a host copy of it."""
    how = host_staging()
    return how == "all" or (how == "device" and t.device.type != "cpu")


def for_horovod(t):
    """What to hand to Horovod's own collectives (the step marker, dense tensors): t, or its host copy."""
    return t.to("cpu", copy=True) if staged(t) else t


class _Staged:
    """A collective started on a host copy; its result goes back to ``device`` (into ``into``: in place)."""
    __slots__ = ("handle", "device", "into")

    def __init__(self, handle, device, into):
        self.handle, self.device, self.into = handle, device, into


def _start(collective, t, *args, in_place=False, **kwargs):
    if not staged(t):
        return collective(t, *args, **kwargs)
    return _Staged(collective(t.to("cpu", copy=True), *args, **kwargs), t.device, t if in_place else None)


# ---- Horovod's collectives (asynchronous: a handle, then wait) --------------------------------------------

def allgather(t, name, process_set):
    return _start(hvd.allgather_async, t, name=name, process_set=process_set)


def allreduce_mean(t, name, process_set):
    return _start(hvd.allreduce_async, t, name=name, op=hvd.Average, process_set=process_set)


def alltoall(t, splits, name, process_set):
    return _start(hvd.alltoall_async, t, splits=torch.tensor(splits, dtype=torch.int32), name=name,
                  process_set=process_set)


def broadcast(t, root, name, process_set):
    return _start(hvd.broadcast_async_, t, root, name=name, process_set=process_set, in_place=True)


def node_mean(tensors, name, nodes, keep):
    """Start the exact average of a bucket's tensors over this rank's node: in shared memory for CPU tensors
    (``node_memory``), else Horovod's allreduce of their concatenation."""
    rows = None
    if tensors[0].device.type == "cpu":
        rows = node_memory.rows_for(keep, tensors, nodes, name,
                                    lambda failed, key: slowest([float(failed)], key, nodes.local)[0] > 0)
    if rows is None:
        return allreduce_mean(cat(tensors, keep=keep), name, nodes.local)
    torch.cat(tensors, out=rows[nodes.local_rank])
    return node_memory.Written(rows, allreduce_mean(torch.zeros(1), name, nodes.local))


def node_mean_of(average, ranges):
    """This rank's (start, stop) ranges of the node's average (``wait`` of ``node_mean``'s handle)."""
    if isinstance(average, node_memory.Written):
        return average.mean_of(ranges)
    return [average[a:b] for a, b in ranges]


def node_share(average, updates, ranges, outs, name, nodes):
    """After a shared-memory average: the bucket's whole update, once every local rank's slices of it
    (``updates`` on ``ranges``) are in, copied into ``outs`` (its tensors, back to back); False after Horovod's
    average (the transport then allgathers)."""
    if not isinstance(average, node_memory.Written):
        return False
    whole = average.share(updates, ranges)
    wait(allreduce_mean(torch.zeros(1), name, nodes.local))
    offset = 0
    for out in outs:
        out.copy_(whole[offset:offset + out.numel()])
        offset += out.numel()
    return True


def wait(handle):
    """The collective's result. Polled with short sleeps: ``hvd.synchronize`` alone spins on sched_yield, and
    where ranks share cores (4 Gloo ranks on 2 cores: a tiny allreduce took 21-50 ms, 5.7 ms polled) the
    spinning ranks starve the background threads that move the data."""
    if isinstance(handle, node_memory.Written):
        wait(handle.barrier)
        return handle
    staging = handle if isinstance(handle, _Staged) else None
    if staging is not None:
        handle = staging.handle
    while not hvd.poll(handle):
        time.sleep(POLL_S)
    result = hvd.synchronize(handle)
    result = result[0] if isinstance(result, tuple) else result   # alltoall: (tensor, received splits)
    if staging is None:
        return result
    return result.to(staging.device) if staging.into is None else staging.into.copy_(result)


def allreduce_now(t, name, process_set):
    return wait(_start(hvd.allreduce_async, t, name=name, process_set=process_set))


def slowest(values, name, process_set):
    """Every rank takes the largest of each value over ranks, so that all ranks choose alike."""
    return wait(_start(hvd.allreduce_async, torch.tensor(values, dtype=torch.float64), op=hvd.Max, name=name,
                       process_set=process_set)).tolist()


def global_process_set():
    return hvd.global_process_set


def barrier_at_exit():
    nodes.barrier_at_exit(hvd.barrier)


node_place, process_sets = nodes.place, nodes.process_sets


def allgather_now(array, name, process_set):
    """Every rank's numpy ``array``, concatenated (eagerly)."""
    return wait(_start(hvd.allgather_async, torch.from_numpy(array), name=name, process_set=process_set)).numpy()


def concat_state(pieces):
    return torch.cat(pieces)
