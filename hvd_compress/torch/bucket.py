"""Buckets and transports: how the compressed tensors of one step travel.

A bucket is a fixed group of compressed tensors (the same transport and dtype, in the order gradients
become ready, up to ``bucket_mb`` of dense gradient): each tensor is still compressed on its own (so a run
equals the simulation exactly), but the bucket's payloads leave in one collective, started as soon as its
last tensor is compressed. A transport object says how a bucket travels, in five steps:

    encode(p)            the worker step of one tensor (x = g + e, payload, new e), as Horovod hands it over
    start(bucket)        one collective for the bucket's payloads, each tensor's finiteness flag appended
    receive(bucket)      wait for it; which tensors were not finite on some rank (then the step stops here)
    reduce_and_serve     gbar = mean of the n decoded payloads, the server pass, start its collective
    finish               wait, decode the update into each tensor's buffer

The flags ride in the payload collective, so checking that no rank's gradient was NaN/Inf before anything is
committed costs no collective of its own. Every rank forms the same buckets (from names, sizes and
transports) and starts the same collectives.
"""
import statistics
import time
from dataclasses import dataclass
from typing import Optional

import torch
import horovod.torch as hvd

from .. import transport as T
from . import kernels as K


@dataclass
class Pending:
    """A gradient between compress() and decompress()."""
    name: str
    transport: str
    shape: torch.Size
    grad_dtype: torch.dtype
    bytes_sent: int
    work: Optional[torch.Tensor] = None          # flat, compute dtype: g, then gbar, then the update
    payload: object = None                       # packed bytes (sharded: one per slice; allreduce: values)
    stats: Optional[torch.Tensor] = None         # float64 [||x - C(x)||^2, ||x||^2, finite]
    worker_error: Optional[torch.Tensor] = None  # the candidate new e (the spare half of its double buffer)
    server_error: Optional[torch.Tensor] = None  # root (sharded: every rank, its slice): the candidate new d
    server_stats: Optional[torch.Tensor] = None
    velocity: Optional[torch.Tensor] = None      # momentum correction: the candidate new u
    update: Optional[torch.Tensor] = None        # the aggregated (and server-compressed) gradient


def _cat(tensors, dtype=torch.uint8, device=None):
    """One buffer of the tensors back to back (always a copy: payloads may be views of buffers that the
    step overwrites later)."""
    if not tensors:
        return torch.empty(0, dtype=dtype, device=device)
    return torch.cat(tensors)


def _send_buffer(bucket, tensors):
    """The bucket's payloads and flags back to back, in a buffer the bucket keeps from step to step (its
    collective is finished before the next step writes it again): no fresh pages every step."""
    size = sum(t.numel() for t in tensors)
    buffer = bucket.send
    if buffer is None or buffer.numel() != size or buffer.dtype != tensors[0].dtype:
        buffer = bucket.send = torch.empty(size, dtype=tensors[0].dtype, device=tensors[0].device)
    return torch.cat(tensors, out=buffer)


def _take(bucket, which):
    """Wait for one of the bucket's collectives and forget its handle (nothing is left in flight)."""
    handle = getattr(bucket, which)
    setattr(bucket, which, None)
    return hvd.synchronize(handle)


def _packed_step(comp, c, key, x, e_in, e_out, seed):
    """The worker step of one piece, its payload bytes written into a buffer kept for that piece."""
    size = K.packed_nbytes(c, x.numel(), x.dtype)
    out = comp._payload_buffer(key, size, x.device)
    return K.step_packed(c, x, e_in, e_out, seed, out=out)


def _flags(members, dtype=torch.uint8):
    """One element per member: 1 where its x is not finite on this rank."""
    return torch.stack([p.stats[2] == 0 for p in members]).to(dtype)


def _not_finite(members, flags):
    """Names of the members flagged on some rank; ``flags``: one row per rank (or their average)."""
    anywhere = flags.reshape(-1, len(members)).to(torch.float64).sum(0).tolist()
    return [p.name for p, count in zip(members, anywhere) if count]


class _RootServer:
    """The server pass on the root (allgather and allreduce): y = gbar + d, v = C_s(y), d <- y - decode(v);
    v's bytes are broadcast, and every rank decodes the same v."""

    def serve(self, comp, bucket, members):
        server = comp.config.server
        if server is None:
            for p in members:
                p.update = p.work
            return
        datas, is_root = [], comp.rank() == comp.root_rank
        for p in members:
            if is_root:
                d_out = comp._spare_buffer("server", p.name, p.work)
                parts, p.server_stats = K.step(server, p.work, comp._server_error.get(p.name), d_out,
                                               comp.seed_of(p.name, server=True))
                p.server_error = d_out
                data = K.pack(parts)
                p.bytes_sent += data.numel()   # a broadcast's receivers send nothing
            else:
                data = torch.empty(server.wire_bytes(p.work.numel(), p.work.element_size()), dtype=torch.uint8,
                                   device=p.work.device)
            datas.append(data)
        bucket.sizes2 = [t.numel() for t in datas]
        bucket.handle2 = hvd.broadcast_async_(_cat(datas, device=members[0].work.device), comp.root(),
                                              name=f"hc.s.{bucket.id}", process_set=comp._ranks())

    def finish(self, comp, bucket):
        server, members = comp.config.server, bucket.launched
        if server is None:
            return
        data, offset = _take(bucket, "handle2"), 0
        for p, size in zip(members, bucket.sizes2):
            d = p.work.numel()
            K.decode_mean(server, [data[offset:offset + size]], d, comp.seed_of(p.name, server=True),
                          p.work.dtype, out=p.work)
            offset += size
            p.update = p.work


class Allgather(_RootServer):
    """Every rank receives every rank's payloads and decodes them. Bytes per rank ~ (n - 1) P."""

    def encode(self, comp, p, e_in, e_out):
        p.payload, p.stats = _packed_step(comp, comp.worker(), p.name, p.work, e_in, e_out,
                                          comp.seed_of(p.name))
        p.bytes_sent += p.payload.numel()

    def start(self, comp, bucket, members):
        bucket.sizes = [p.payload.numel() for p in members]
        for p in members:
            p.bytes_sent += 1
        bucket.handle = hvd.allgather_async(_send_buffer(bucket, [p.payload for p in members] + [_flags(members)]),
                                            name=f"hc.w.{bucket.id}", process_set=comp._ranks())

    def receive(self, comp, bucket):
        members, n = bucket.launched, comp.size()
        bucket.received = _take(bucket, "handle").view(n, -1)
        return _not_finite(members, bucket.received[:, -len(members):])

    def reduce_and_serve(self, comp, bucket):
        members, n = bucket.launched, comp.size()
        received = bucket.received.reshape(-1)
        total = sum(bucket.sizes) + len(members)
        needs_gbar = comp.config.server is None or comp.rank() == comp.root_rank   # others wait for v
        offset = 0
        for p, size in zip(members, bucket.sizes):
            if needs_gbar:
                rows = [received[j * total + offset:j * total + offset + size] for j in range(n)]
                K.decode_mean(comp.worker(), rows, p.work.numel(), comp.seed_of(p.name), p.work.dtype,
                              out=p.work)
            offset += size
        self.serve(comp, bucket, members)


class Allreduce(_RootServer):
    """Summable payloads (shared RandK, Identity): Horovod averages their values. Bytes per rank ~ 2 P."""

    def encode(self, comp, p, e_in, e_out):
        parts, p.stats = K.step(comp.worker(), p.work, e_in, e_out, comp.seed_of(p.name))
        p.payload = parts[0]
        p.bytes_sent += p.payload.numel() * p.payload.element_size()

    def start(self, comp, bucket, members):
        bucket.sizes = [p.payload.numel() for p in members]
        for p in members:
            p.bytes_sent += p.payload.element_size()
        flags = _flags(members, members[0].payload.dtype)
        bucket.handle = hvd.allreduce_async(_cat([p.payload for p in members] + [flags]),
                                            name=f"hc.w.{bucket.id}", op=hvd.Average,
                                            process_set=comp._ranks())

    def receive(self, comp, bucket):
        members = bucket.launched
        bucket.received = _take(bucket, "handle")
        return _not_finite(members, bucket.received[-len(members):])

    def reduce_and_serve(self, comp, bucket):
        members = bucket.launched
        averaged, offset = bucket.received, 0
        for p, size in zip(members, bucket.sizes):
            d = p.work.numel()
            p.work.copy_(K.decode(comp.worker(), [averaged[offset:offset + size]], d, comp.seed_of(p.name),
                                  p.work.dtype))
            offset += size
        self.serve(comp, bucket, members)


class Sharded:
    """Rank j owns slice j of every tensor: each rank compresses its n slices, an alltoall hands rank j the
    n payloads of slice j, rank j averages them and runs the server pass on its slice with its slice of d
    (without a server compressor: the exact average, sent as its nonzeros where that is smaller), and the n
    results are allgathered. Bytes per rank ~ P + S, flat in n."""

    def encode(self, comp, p, e_in, e_out):
        n, d, worker = comp.size(), p.work.numel(), comp.worker()
        b = T.bounds(d, n)
        p.payload, stats = [], []
        for j in range(n):
            piece, key = slice(b[j], b[j + 1]), T.shard_name(p.name, j)
            data, s = _packed_step(comp, worker, key, p.work[piece], None if e_in is None else e_in[piece],
                                   None if e_out is None else e_out[piece], comp.seed_of(key))
            p.payload.append(data)
            stats.append(s)
        stats = torch.stack(stats)
        p.stats = torch.stack([stats[:, 0].sum(), stats[:, 1].sum(), stats[:, 2].min()])
        p.bytes_sent += sum(t.numel() for t in p.payload)

    def start(self, comp, bucket, members):
        n, flags = comp.size(), _flags(members)
        for p in members:
            p.bytes_sent += n
        send = [t for j in range(n) for t in [p.payload[j] for p in members] + [flags]]
        splits = torch.tensor([sum(p.payload[j].numel() for p in members) + len(members) for j in range(n)],
                              dtype=torch.int32)
        bucket.handle = hvd.alltoall_async(_send_buffer(bucket, send), splits=splits, name=f"hc.w.{bucket.id}",
                                          process_set=comp._ranks())

    def receive(self, comp, bucket):
        members, n, rank = bucket.launched, comp.size(), comp.rank()
        bucket.received = _take(bucket, "handle")[0].view(n, -1)   # every rank's slice `rank` payloads
        return _not_finite(members, bucket.received[:, -len(members):])

    def reduce_and_serve(self, comp, bucket):
        members, n, rank = bucket.launched, comp.size(), comp.rank()
        worker, server = comp.worker(), comp.config.server
        received = bucket.received.reshape(-1)
        sizes = [p.payload[rank].numel() for p in members]   # every rank's slice `rank` has the same size
        chunk, offset, datas = sum(sizes) + len(members), 0, []
        for p, size in zip(members, sizes):
            b = T.bounds(p.work.numel(), n)
            mine, key = p.work[b[rank]:b[rank + 1]], T.shard_name(p.name, rank)
            rows = [received[i * chunk + offset:i * chunk + offset + size] for i in range(n)]
            offset += size
            if mine.numel():
                K.decode_mean(worker, rows, mine.numel(), comp.seed_of(key), mine.dtype, out=mine)
            if server is None:   # the exact average of the slice, sparse where that is smaller
                data = K.pack_exact(mine)
            else:
                d_out = comp._spare_buffer("server", p.name, mine)
                parts, p.server_stats = K.step(server, mine, comp._server_error.get(p.name), d_out,
                                               comp.seed_of(key, server=True))
                p.server_error = d_out
                data = K.pack(parts)
            p.bytes_sent += data.numel()
            datas.append(data)
        bucket.handle2 = hvd.allgather_async(_cat(datas, device=members[0].work.device), name=f"hc.s.{bucket.id}",
                                          process_set=comp._ranks())

    def finish(self, comp, bucket):
        members, n, rank = bucket.launched, comp.size(), comp.rank()
        server = comp.config.server
        data, offset = _take(bucket, "handle2"), 0
        for j in range(n):
            for p in members:
                b, itemsize = T.bounds(p.work.numel(), n), p.work.element_size()
                piece, size = p.work[b[j]:b[j + 1]], b[j + 1] - b[j]
                if server is None:
                    length = _exact_length(data, offset, size, itemsize)
                    if j != rank:   # this rank's own slice already holds the exact average
                        piece.copy_(K.unpack_exact(data[offset:offset + length], [size], piece.dtype))
                else:
                    length = server.wire_bytes(size, itemsize) if size else 0
                    if size:
                        K.decode_mean(server, [data[offset:offset + length]], size,
                                      comp.seed_of(T.shard_name(p.name, j), server=True), piece.dtype, out=piece)
                offset += length
        for p in members:
            p.update = p.work


def _exact_length(data, offset, size, itemsize):
    """Bytes of the ``kernels.pack_exact`` slice of ``size`` elements at ``offset``, from its int32 header."""
    count = int(data[offset:offset + 4].clone().view(torch.int32).item())
    return 4 + (size * itemsize if count < 0 else count * (4 + itemsize))


TRANSPORTS = {"allgather": Allgather(), "allreduce": Allreduce(), "sharded": Sharded()}


class Bucket:
    """A fixed group of compressed tensors that travel together; per step, the members handed over so far."""

    def __init__(self, id, names, transport):
        self.id, self.names, self.kind = id, tuple(names), transport
        self.transport = TRANSPORTS[transport]
        self.send = None
        self.reset()

    def reset(self):
        """Forget the step (the send buffer is kept for the next one)."""
        self.arrived, self.launched = 0, None
        self.handle = self.handle2 = self.received = None
        self.sizes = self.sizes2 = None

    def wait_quietly(self):
        """After an error: wait for the collectives this step started (their results are dropped)."""
        for handle in (self.handle, self.handle2):
            if handle is not None:
                try:
                    hvd.synchronize(handle)
                except Exception:   # noqa: BLE001 - the error being raised is the one that matters
                    pass

    def add(self, comp, p):
        """One more member is compressed; the last one sends the bucket."""
        self.arrived += 1
        if self.arrived == len(self.names):
            self._launch(comp, [comp._pending[name] for name in self.names])

    def members_in_step(self, pending):
        return [name for name in self.names if name in pending]

    def launch_if_waiting(self, comp):
        """At the end of the step: send a bucket some of whose tensors had no gradient (every rank skips
        the same ones: the same model code runs everywhere)."""
        if self.launched is None:
            self._launch(comp, [comp._pending[name] for name in self.members_in_step(comp._pending)])

    def _launch(self, comp, members):
        self.launched = members
        self.transport.start(comp, self, members)


def buckets_of(params, transports, bucket_bytes, tag=0):
    """The buckets of the compressed tensors: in reverse parameter order (the order in which backward
    produces gradients), grouped by transport, compute dtype and device, each up to ``bucket_bytes`` of
    dense fp32 gradient (a larger tensor gets a bucket of its own)."""
    buckets, open_ = [], {}
    for name in reversed(list(params)):
        how, param = transports.get(name), params[name]
        if how in (None, "dense") or not param.requires_grad:
            continue
        key = (how, K.compute_dtype(param.dtype), param.device)
        size = 4 * param.numel()
        names, used = open_.get(key, ([], 0))
        if names and used + size > bucket_bytes:
            buckets.append((key, names))
            names, used = [], 0
        names.append(name)
        open_[key] = (names, used + size)
    buckets += [(key, names) for key, (names, _) in open_.items() if names]
    return [Bucket(f"{tag}.{i}", names, key[0]) for i, (key, names) in enumerate(buckets)]


# ---- what "auto" measures at the first step ----------------------------------------------------------------

def _slowest(comp, values, name):
    """Every rank takes the largest of each value over ranks, so that all ranks choose alike."""
    return hvd.allreduce(torch.tensor(values, dtype=torch.float64), op=hvd.Max, name=name,
                         process_set=comp._ranks()).tolist()


def measure_link(comp, repeats=3):
    """The link as collectives of real bucket size see it: latency from a 4-byte allreduce, bandwidth from
    allreduces as large as a bucket (or the whole compressible model, if smaller), medians of ``repeats``."""
    n, device = comp.size(), next(iter(comp._params.values())).device
    model_bytes = sum(4 * p.numel() for p in comp._params.values() if p.numel() >= comp.dense_below)
    elements = max(1 << 14, min(comp.bucket_bytes, model_bytes) // 4)
    small, big = torch.zeros(1, device=device), torch.zeros(elements, device=device)
    hvd.allreduce(small, name=f"hc.link.warmup.{comp.tag}", process_set=comp._ranks())
    times = {"latency": [], "bandwidth": []}
    for r in range(repeats):
        for tensor, what in ((small, "latency"), (big, "bandwidth")):
            start = time.perf_counter()
            hvd.allreduce(tensor, name=f"hc.link.{what}.{r}.{comp.tag}", process_set=comp._ranks())
            times[what].append(time.perf_counter() - start)
    t_small, t_big = _slowest(comp, [statistics.median(times["latency"]), statistics.median(times["bandwidth"])],
                              f"hc.link.agree.{comp.tag}")
    ring = 2 * (n - 1)
    return T.Link(bandwidth=ring / n * elements * 4 / max(t_big - t_small, 1e-9), latency=t_small / ring)


def measure_kernels(comp, repeats=3):
    """Seconds per element of this job's kernels, measured on this rank while every rank measures (ranks
    that share cores or a GPU are priced as they are): {compressor: (step, decode of one payload)}, the
    slowest rank's, for the cost model (``transport.kernel_seconds``)."""
    device = next(iter(comp._params.values())).device
    largest = max((p.numel() for p in comp._params.values()), default=0)
    d = max(1 << 14, min(largest, comp.bucket_bytes // 4, 1 << 22))
    g = torch.randn(d, generator=torch.Generator().manual_seed(0)).to(device)
    e_in, e_out = torch.zeros_like(g), torch.empty_like(g)
    n = comp.size()
    compressors = [c for c in (comp.config.worker, comp.config.server) if c is not None]
    figures = []
    for c in compressors:
        step, decode = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            parts, _ = K.step(c, g, e_in, e_out, (1, 0))
            data = K.pack(parts)
            step.append(time.perf_counter() - start)
            start = time.perf_counter()
            if c.summable:
                K.decode(c, [data.view(g.dtype)], d, (1, 0), g.dtype)
            else:
                K.decode_mean(c, [data] * n, d, (1, 0), g.dtype, out=e_in)
            decode.append(time.perf_counter() - start)
        figures += [statistics.median(step) / d, statistics.median(decode) / d / (1 if c.summable else n)]
    figures = _slowest(comp, figures, f"hc.kernels.agree.{comp.tag}")
    return {c: (figures[2 * i], figures[2 * i + 1]) for i, c in enumerate(compressors)}
