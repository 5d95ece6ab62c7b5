"""The hierarchical transport's two phases inside a node, for CPU tensors, through shared memory.

Each local rank writes its bucket into its row of a segment in /dev/shm that the node's ranks map, a 4-byte
allreduce inside the node says that every row is written, and each rank then averages only its slices,
reading the other rows where they lie, into one more row; there the exchange between nodes decodes its slices
of the update, and after another 4-byte allreduce every rank copies the whole row. Horovod's collectives
inside a node move every byte through sockets (Gloo) or the MPI library's buffers: 0.3-0.75 s for averaging
100 MB on 2 ranks sharing 2 cores, where this reads and writes memory once. CGX averages inside a node through
shared memory too. ``HVD_COMPRESS_NODE_MEMORY=0`` turns it off (Horovod's collectives then, as for tensors on
a GPU); ``HVD_COMPRESS_NODE_MEMORY_DIR`` names another directory than /dev/shm (a memory file system)."""
import os
import secrets
import warnings

import torch
import horovod.torch as hvd


def enabled():
    value = os.environ.get("HVD_COMPRESS_NODE_MEMORY", "1").strip().lower()
    if value not in ("0", "1", "false", "true"):
        raise ValueError(f"HVD_COMPRESS_NODE_MEMORY={value!r}: use 1 (average a node's CPU tensors in shared "
                         f"memory, the default) or 0 (Horovod's allreduce)")
    return value in ("1", "true")


class Written:
    """This rank's row is written; once ``barrier`` (a collective of the node) is done, every row is. Row L
    (after the L ranks' rows) holds the node's average, then its update: slice j of it is local rank j's."""
    __slots__ = ("rows", "barrier")

    def __init__(self, rows, barrier):
        self.rows, self.barrier = rows, barrier

    def mean_of(self, ranges):
        """The node's average on each (start, stop) of this rank, in row L: the rows summed in local-rank
        order, then divided, as the simulation does."""
        rows, ranks, out = self.rows, self.rows.shape[0] - 1, []
        for a, b in ranges:
            acc = rows[ranks, a:b]
            if ranks == 1:
                acc.copy_(rows[0, a:b])
            else:
                torch.add(rows[0, a:b], rows[1, a:b], out=acc)
                for j in range(2, ranks):
                    acc.add_(rows[j, a:b])
                acc.div_(ranks)
            out.append(acc)
        return out

    def share(self, updates, ranges):
        """This rank's slices of the update into row L (where they are not already: the transports decode
        in place), before the barrier after which every rank reads the whole row."""
        for update, (a, b) in zip(updates, ranges):
            target = self.rows[-1, a:b]
            if update.data_ptr() != target.data_ptr():
                target.copy_(update)
        return self.rows[-1]


def rows_for(bucket, tensors, nodes, name, agree):
    """The bucket's shared rows (local size + 1 rows of its elements), made at its first step or when its size
    changes; None where the node's ranks cannot share them (then Horovod's allreduce averages; the bucket
    remembers it as ``node_rows = False``). ``agree(failed, name)``: whether any rank of the node failed (a
    collective of the node)."""
    size, dtype = sum(t.numel() for t in tensors), tensors[0].dtype
    rows = bucket.node_rows
    if rows is False or not enabled():
        return None
    if rows is not None and rows.shape[1] == size and rows.dtype == dtype:
        return rows
    directory = os.environ.get("HVD_COMPRESS_NODE_MEMORY_DIR", "/dev/shm")
    if nodes.local_rank == 0:
        remove_stale(directory)
    path = os.path.join(directory, f"hvdc-{_token(nodes, name)}")
    rows = _map(path, (nodes.local_size + 1, size), dtype, nodes, name, agree)
    bucket.node_rows = False if rows is None else rows
    return rows


def remove_stale(directory):
    """Remove the segments whose maker (local rank 0, whose process id the name carries) is gone: a job killed
    between making a segment and unlinking it (a moment at a bucket's first step) leaves its file behind. Another
    user's files, and names that are not ours, are left alone."""
    try:
        names = [n for n in os.listdir(directory) if n.startswith("hvdc-")]
    except OSError:
        return
    for n in names:
        pid = n.split("-")[1]
        if len(pid) != 10 or not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            os.unlink(os.path.join(directory, n))
        except OSError:
            pass


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:   # alive, another user's
        pass
    return True


def _token(nodes, name):
    """A new segment's name: local rank 0's process id and a random token, told to the node's ranks (nothing
    kept between segments, so ranks that joined later, as elastic Horovod adds them, name it alike)."""
    mine = torch.frombuffer(bytearray(f"{os.getpid():010d}-{secrets.token_hex(8)}".encode()), dtype=torch.uint8)
    every = hvd.allgather(mine, name=f"{name}.token", process_set=nodes.local).view(nodes.local_size, -1)
    return bytes(every[0].tolist()).decode()


def _map(path, shape, dtype, nodes, name, agree):
    """Every local rank maps the same file, reserved in full (a /dev/shm too small for it fails here, not as
    SIGBUS at a later write), then checks that it sees the others' marks; the file is unlinked once all
    of them mapped it (the memory lives until the last mapping goes)."""
    nbytes = shape[0] * shape[1] * torch.empty(0, dtype=dtype).element_size()
    rows, reason = None, None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, nbytes)
        finally:
            os.close(fd)
        rows = torch.from_file(path, shared=True, size=shape[0] * shape[1], dtype=dtype).view(shape)
        rows[nodes.local_rank, 0] = nodes.local_rank + 1
    except (OSError, RuntimeError) as error:   # RuntimeError: torch's mmap
        reason = f"cannot map {nbytes} bytes of {path} ({error})"
    try:
        if agree(reason is not None, f"{name}.mapped"):
            reason = reason or "another rank of this node could not map its segment"
        elif agree(any(rows[j, 0] != j + 1 for j in range(nodes.local_size)), f"{name}.shared"):
            reason = "the ranks Horovod places on this node do not share /dev/shm"
    finally:
        try:
            os.unlink(path)
        except OSError:   # another local rank unlinked it first, or it was never made
            pass
    if reason is not None:
        warnings.warn(f"hvd_compress, transport 'hierarchical': {reason}; the node's average goes through "
                      f"Horovod's allreduce (slower on CPU)", stacklevel=3)
        return None
    return rows
