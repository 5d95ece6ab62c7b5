"""Buckets and transports: how the compressed tensors of one step travel, written once for both frameworks.

A bucket is a fixed group of compressed tensors (the same transport and dtype, in the order gradients
become ready, up to ``bucket_mb`` of dense gradient; in TensorFlow, where Horovod reduces one variable at a
time, one variable): each tensor is still compressed on its own (so a run equals the simulation exactly),
but the bucket's payloads leave in one collective, started as soon as its last tensor is compressed. A
transport object says how a bucket travels, in five steps:

    encode(p)            the worker step of one tensor (x = g + e, payload, new e), as Horovod hands it over
    start(bucket)        one collective for the bucket's payloads, each tensor's finiteness flag appended
    receive(bucket)      wait for it; per tensor, on how many ranks it was not finite (the step stops there
                         if anywhere: nothing is committed)
    reduce_and_serve     gbar = mean of the n decoded payloads, the server pass, start its collective
    finish               wait, decode the update of each tensor

The transports call the framework only through ``comp.ops`` (``hvd_compress/torch/ops.py``,
``hvd_compress/tensorflow/ops.py``): its kernels and Horovod's collectives. Operations that write
in place in PyTorch (``out=``: decoding into the gradient's memory, the new error into a preallocated
buffer) return the result, which in TensorFlow is a new tensor: the code here always uses what they return.

The flags ride in the payload collective, so checking that no rank's gradient was NaN/Inf before anything is
committed costs no collective of its own. Every rank forms the same buckets (from names, sizes and
transports) and starts the same collectives.
"""
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from . import transport as T
from .seeds import server_seed, worker_seed


@dataclass
class Pending:
    """A gradient between compress() and decompress()."""
    name: str
    transport: str
    shape: Any
    grad_dtype: Any
    bytes_sent: Any                  # an int (in TensorFlow a tensor where the size depends on the data)
    work: Any = None                 # flat, compute dtype: x (or g), then gbar, then the update (dense and
                                     # host-staged: the gradient, that Horovod's average is copied back into)
    payload: Any = None              # packed bytes (sharded: one per slice; allreduce: values)
    stats: Any = None                # float64 [||x - C(x)||^2, ||x||^2, finite]
    worker_error: Any = None         # the candidate new e
    server_error: Any = None         # root (sharded: every rank, its slice): the candidate new d
    server_stats: Any = None
    velocity: Any = None             # momentum correction: the candidate new u
    update: Any = None               # the aggregated (and server-compressed) gradient
    mine: Any = None                 # sharded: this rank's slice of the average
    errors: Any = None               # hierarchical: (e_in, e_out) until the node's average is known


def _part(t, a, b):
    """Elements a..b of an error buffer argument (None: none; True: TensorFlow's "a new tensor, please")."""
    return t if t is None or t is True else t[a:b]


class _Transport:
    def error_part(self, comp, work):
        """The part of a tensor this rank keeps an error buffer for."""
        return work


class _RootServer(_Transport):
    """The server pass on the root (allgather and allreduce): y = gbar + d, v = C_s(y), d <- y - decode(v);
    v's bytes are broadcast, and every rank decodes the same v."""

    def serve(self, comp, bucket, members):
        server, ops = comp.server(), comp.ops
        if server is None:
            for p in members:
                p.update = p.work
            return
        datas, is_root = [], comp.rank() == comp.root_rank
        for p in members:
            if is_root:
                data, p.server_stats, p.server_error = ops.packed_step(
                    comp, server, ("server", p.name), p.work, comp.server_error_of(p.name),
                    comp._spare_buffer("server", p.name, p.work), comp.seed_of(p.name, server=True))
                p.bytes_sent += ops.numel(data)   # a broadcast's receivers send nothing
            else:
                data = ops.empty_bytes(server.wire_bytes(ops.numel(p.work), ops.itemsize(p.work)), p.work)
            datas.append(data)
        bucket.sizes2 = [ops.numel(t) for t in datas]
        bucket.handle2 = ops.broadcast(ops.cat(datas), comp.root(), f"hc.s.{bucket.id}", comp._ranks())

    def finish(self, comp, bucket):
        server, members, ops = comp.server(), bucket.launched, comp.ops
        if server is None:
            return
        data, offset = bucket.take(ops, "handle2"), 0
        for p, size in zip(members, bucket.sizes2):
            p.work = ops.decode_mean(server, [data[offset:offset + size]], ops.numel(p.work),
                                     comp.seed_of(p.name, server=True), out=p.work)
            offset += size
            p.update = p.work


class Allgather(_RootServer):
    """Every rank receives every rank's payloads and decodes them. Bytes per rank ~ (n - 1) P."""

    def encode(self, comp, p, e_in, e_out):
        p.payload, p.stats, p.worker_error = comp.ops.packed_step(comp, comp.worker(), p.name, p.work, e_in, e_out,
                                                                  comp.seed_of(p.name))
        p.bytes_sent += comp.ops.numel(p.payload)

    def start(self, comp, bucket, members):
        ops = comp.ops
        bucket.sizes = [ops.numel(p.payload) for p in members]
        for p in members:
            p.bytes_sent += 1
        send = ops.cat([p.payload for p in members] + [ops.flags([p.stats for p in members])], keep=bucket)
        bucket.handle = ops.allgather(send, f"hc.w.{bucket.id}", comp._ranks())

    def receive(self, comp, bucket):
        members, ops = bucket.launched, comp.ops
        bucket.received = ops.rows(bucket.take(ops, "handle"), comp.size())
        return ops.count_flags(bucket.received[:, -len(members):], len(members))

    def reduce_and_serve(self, comp, bucket):
        members, n, ops = bucket.launched, comp.size(), comp.ops
        received = ops.flat(bucket.received)
        total = sum(bucket.sizes) + len(members)
        needs_gbar = comp.server() is None or comp.rank() == comp.root_rank   # others wait for v
        offset = 0
        for p, size in zip(members, bucket.sizes):
            if needs_gbar:
                rows = [received[j * total + offset:j * total + offset + size] for j in range(n)]
                p.work = ops.decode_mean(comp.worker(), rows, ops.numel(p.work), comp.seed_of(p.name), out=p.work)
            offset += size
        self.serve(comp, bucket, members)


class Allreduce(_RootServer):
    """Summable payloads (shared RandK, Identity): Horovod averages their values. Bytes per rank ~ 2 P."""

    def encode(self, comp, p, e_in, e_out):
        ops = comp.ops
        parts, p.stats, p.worker_error = ops.step(comp.worker(), p.work, e_in, e_out, comp.seed_of(p.name))
        p.payload = parts[0]
        p.bytes_sent += ops.numel(p.payload) * ops.itemsize(p.payload)

    def start(self, comp, bucket, members):
        ops = comp.ops
        bucket.sizes = [ops.numel(p.payload) for p in members]
        for p in members:
            p.bytes_sent += ops.itemsize(p.payload)
        flags = ops.flags([p.stats for p in members], like=members[0].payload)
        bucket.handle = ops.allreduce_mean(ops.cat([p.payload for p in members] + [flags]), f"hc.w.{bucket.id}",
                                           comp._ranks())

    def receive(self, comp, bucket):
        members, ops = bucket.launched, comp.ops
        bucket.received = bucket.take(ops, "handle")
        return ops.count_flags(bucket.received[-len(members):], len(members))

    def reduce_and_serve(self, comp, bucket):
        members, ops = bucket.launched, comp.ops
        averaged, offset = bucket.received, 0
        for p, size in zip(members, bucket.sizes):
            p.work = ops.decode_values(comp.worker(), averaged[offset:offset + size], ops.numel(p.work),
                                       comp.seed_of(p.name), out=p.work)
            offset += size
        self.serve(comp, bucket, members)


class Sharded(_Transport):
    """Rank j owns slice j of every tensor: each rank compresses its n slices, an alltoall hands rank j the
    n payloads of slice j, rank j averages them and runs the server pass on its slice with its slice of d
    (without a server compressor: the exact average, sent as its nonzeros where that is smaller), and the n
    results are allgathered. Bytes per rank ~ P + S, flat in n."""

    def encode(self, comp, p, e_in, e_out):
        n, ops, worker = comp.size(), comp.ops, comp.worker()
        b = T.bounds(ops.numel(p.work), n)
        p.payload, stats, errors = [], [], []
        for j in range(n):
            key = T.shard_name(p.name, j)
            data, s, e = ops.packed_step(comp, worker, key, p.work[b[j]:b[j + 1]], _part(e_in, b[j], b[j + 1]),
                                         _part(e_out, b[j], b[j + 1]), comp.seed_of(key))
            p.payload.append(data)
            stats.append(s)
            errors.append(e)
        p.stats = ops.combine_stats(stats)
        p.worker_error = None if e_out is None else ops.join(e_out, errors)
        p.bytes_sent += sum(ops.numel(t) for t in p.payload)

    def start(self, comp, bucket, members):
        n, ops = comp.size(), comp.ops
        flags = ops.flags([p.stats for p in members])
        for p in members:
            p.bytes_sent += n
        send = [t for j in range(n) for t in [p.payload[j] for p in members] + [flags]]
        splits = [sum(ops.numel(p.payload[j]) for p in members) + len(members) for j in range(n)]
        bucket.handle = ops.alltoall(ops.cat(send, keep=bucket), splits, f"hc.w.{bucket.id}", comp._ranks())

    def receive(self, comp, bucket):
        members, ops = bucket.launched, comp.ops
        bucket.received = ops.rows(bucket.take(ops, "handle"), comp.size())   # every rank's slice `rank`
        return ops.count_flags(bucket.received[:, -len(members):], len(members))

    def reduce_and_serve(self, comp, bucket):
        members, n, rank, ops = bucket.launched, comp.size(), comp.rank(), comp.ops
        worker, server = comp.worker(), comp.server()
        received = ops.flat(bucket.received)
        sizes = [ops.numel(p.payload[rank]) for p in members]   # every rank's slice `rank` has the same size
        chunk, offset, datas = sum(sizes) + len(members), 0, []
        for p, size in zip(members, sizes):
            b = T.bounds(ops.numel(p.work), n)
            mine, key = p.work[b[rank]:b[rank + 1]], T.shard_name(p.name, rank)
            rows = [received[i * chunk + offset:i * chunk + offset + size] for i in range(n)]
            offset += size
            if b[rank + 1] > b[rank]:
                mine = ops.decode_mean(worker, rows, b[rank + 1] - b[rank], comp.seed_of(key), out=mine)
            p.mine = mine
            if server is None:   # the exact average of the slice, sparse where that is smaller
                data = ops.pack_exact(mine)
            else:
                data, p.server_stats, p.server_error = ops.packed_step(
                    comp, server, ("server", key), mine, comp.server_error_of(p.name),
                    comp._spare_buffer("server", p.name, mine), comp.seed_of(key, server=True))
            p.bytes_sent += ops.numel(data)
            datas.append(data)
        bucket.handle2 = ops.allgather(ops.cat(datas), f"hc.s.{bucket.id}", comp._ranks())

    def finish(self, comp, bucket):
        members, n, rank, ops = bucket.launched, comp.size(), comp.rank(), comp.ops
        server = comp.server()
        data, offset = bucket.take(ops, "handle2"), 0
        pieces = {p.name: [] for p in members}
        for j in range(n):
            for p in members:
                b = T.bounds(ops.numel(p.work), n)
                piece, size = p.work[b[j]:b[j + 1]], b[j + 1] - b[j]
                if server is None:
                    length = ops.exact_length(data, offset, size, ops.itemsize(p.work))
                    # this rank's own slice already holds the exact average
                    piece = p.mine if j == rank else ops.unpack_exact(data[offset:offset + length], size, out=piece)
                else:
                    length = server.wire_bytes(size, ops.itemsize(p.work)) if size else 0
                    if size:
                        piece = ops.decode_mean(server, [data[offset:offset + length]], size,
                                                comp.seed_of(T.shard_name(p.name, j), server=True), out=piece)
                pieces[p.name].append(piece)
                offset += length
        for p in members:
            p.update = p.work = ops.join(p.work, pieces[p.name])


@dataclass
class Nodes:
    """Where this rank sits among the job's nodes ("hierarchical")."""
    local: Any          # the process set of this node's ranks
    across: Any         # the process set of the ranks of this rank's local rank, one per node
    local_rank: int
    local_size: int
    servers: list       # by local rank j: the rank that runs slice j's server pass (the first of its set)


def nodes_of(comp):
    """The nodes from Horovod's local and cross ranks (the same table on every rank), and their process sets,
    looked up or registered on every rank in the same order (as Horovod needs)."""
    if comp._ranks().process_set_id != 0:
        raise ValueError("transport 'hierarchical' forms its process sets from all ranks of the job: use it "
                         "without a process set")
    # (node, local rank, dynamic process sets) by rank
    where = comp._allgather_object(comp.ops.node_place(), f"hc.nodes.{comp.tag}")
    dynamic = all(d for _, _, d in where)
    where = [(node, local) for node, local, _ in where]
    per_node = Counter(node for node, _ in where)
    if len(set(per_node.values())) != 1:
        raise ValueError(f"transport 'hierarchical' needs as many ranks on every node; ranks per node (by "
                         f"Horovod's cross rank): {dict(sorted(per_node.items()))}")
    size = next(iter(per_node.values()))
    node, local_rank = where[comp.rank()]
    sets = comp.ops.process_sets([[r for r, (k, _) in enumerate(where) if k == other] for other in sorted(per_node)] +
                                 [[r for r, (_, j) in enumerate(where) if j == other] for other in range(size)],
                                 dynamic)
    comp.ops.barrier_at_exit()
    across = sets[len(per_node):]
    return Nodes(sets[sorted(per_node).index(node)], across[local_rank], local_rank, size,
                 [min(r for r, (_, j) in enumerate(where) if j == other) for other in range(size)])


class _Across:
    """The Compression as the exchange between nodes sees it: one worker per node (the ranks of one local
    rank, in their process set's order), root the first; buffers keyed by slice name are the tensor's own."""

    root_rank = 0

    def __init__(self, comp, owners):
        self._comp, self._owners = comp, owners   # owners: slice name -> tensor name

    def __getattr__(self, attr):
        return getattr(self._comp, attr)

    def _ranks(self):
        return self._comp.nodes.across

    def size(self):
        return self._ranks().size()

    def rank(self):
        return self._ranks().rank()

    def root(self):
        return self._ranks().ranks[0]

    def seed_of(self, key, server=False):
        comp = self._comp
        if server:
            return server_seed(comp.config.server, comp.seed, comp._seed_step(), key)
        return worker_seed(comp.config.worker, comp.seed, comp._seed_step(), self.rank(), key)

    def server_error_of(self, key):
        return self._comp.server_error_of(self._owners[key])

    def _spare_buffer(self, kind, key, like):
        return self._comp._spare_buffer(kind, self._owners[key], like)


class Hierarchical(_Transport):
    """Several nodes of L ranks: each node averages its gradients exactly, local rank j compresses slice j
    of the node's average (its error buffer is that slice's), the ranks of one local rank exchange these
    payloads as allgather or allreduce does between ranks (the server pass on the first node's rank), and
    each node allgathers its L slices of the update (exact, sparse where that is smaller). Only one node's
    payloads (+ the server's) leave it. Where the framework's ops can (``ops.node_mean``, ``node_share``:
    PyTorch's CPU tensors), both node phases go through shared memory instead of Horovod's collectives."""

    def error_part(self, comp, work):
        """The part of a tensor this rank keeps an error buffer for: its slice."""
        return work[comp._slice_of("hierarchical", comp.ops.numel(work))]

    def encode(self, comp, p, e_in, e_out):
        """Only check the slices (every rank alike, so a refusal is every rank's); x is known after the
        node's average."""
        b = T.bounds(comp.ops.numel(p.work), comp.nodes.local_size)
        for c in filter(None, (comp.worker(), comp.server())):
            for j in range(comp.nodes.local_size):
                c.layout(b[j + 1] - b[j])
        p.errors = (e_in, e_out)

    def start(self, comp, bucket, members):
        bucket.sizes = [comp.ops.numel(p.work) for p in members]
        bucket.handle = comp.ops.node_mean([p.work for p in members], f"hc.n.{bucket.id}", comp.nodes, bucket)

    def receive(self, comp, bucket):
        """The node's average; this rank's slice of it compressed and exchanged between nodes; per tensor,
        on how many nodes the average was not finite (in any slice: the node's ranks tell each other first,
        so that all of them know alike)."""
        members, ops, nodes = bucket.launched, comp.ops, comp.nodes
        inner, names = T.default(comp.config), [T.shard_name(p.name, nodes.local_rank) for p in members]
        if bucket.inner is None or bucket.inner.names != tuple(names):
            bucket.across = _Across(comp, {key: p.name for key, p in zip(names, members)})
            bucket.inner = Bucket(f"{bucket.id}.x", names, inner)
        ranges, offset = [], 0
        for size in bucket.sizes:
            mine = comp._slice_of("hierarchical", size)
            ranges.append((offset + mine.start, offset + mine.stop))
            offset += size
        across, slices, bucket.ranges = bucket.across, [], ranges
        bucket.average = bucket.take(ops, "handle")
        for p, key, work in zip(members, names, ops.node_mean_of(bucket.average, ranges)):
            e_in, e_out = p.errors
            q = Pending(key, inner, None, p.grad_dtype, 0, work=work)
            bucket.inner.transport.encode(across, q, e_in, e_out)
            slices.append(q)
        flags = ops.wait(ops.allgather(ops.flags([q.stats for q in slices]), f"hc.f.{bucket.id}", nodes.local))
        bad = ops.count_flags(ops.rows(flags, nodes.local_size), len(slices))
        for j, (p, q) in enumerate(zip(members, slices)):
            q.stats = ops.mark_not_finite(q.stats, bad[j])
            p.stats, p.worker_error = q.stats, q.worker_error
        bucket.inner.reset()
        bucket.inner.launched = slices
        bucket.inner.transport.start(across, bucket.inner, slices)
        counts = bucket.inner.transport.receive(across, bucket.inner)
        for p, q in zip(members, slices):
            p.bytes_sent, q.bytes_sent = p.bytes_sent + q.bytes_sent, 0
        return counts

    def reduce_and_serve(self, comp, bucket):
        bucket.inner.transport.reduce_and_serve(bucket.across, bucket.inner)

    def finish(self, comp, bucket):
        members, ops, nodes = bucket.launched, comp.ops, comp.nodes
        slices = bucket.inner.launched
        bucket.inner.transport.finish(bucket.across, bucket.inner)
        for p, q in zip(members, slices):
            p.bytes_sent += q.bytes_sent
            p.server_stats, p.server_error = q.server_stats, q.server_error
        shared = ops.node_share(bucket.average, [q.update for q in slices], bucket.ranges, [p.work for p in members],
                                f"hc.u.{bucket.id}", nodes)
        bucket.average = None
        if shared:   # averaged in shared memory: there the node's slices of the update met, and p.work holds them
            for p in members:
                p.update = p.work
            return
        # the update of a slice is the average of a few sparse payloads (or one server payload): sent exact,
        # as its nonzeros where that is smaller, as the sharded transport does
        gathered = ops.wait(ops.allgather(ops.cat([ops.pack_exact(q.update) for q in slices]), f"hc.u.{bucket.id}",
                                          nodes.local))
        pieces, offset = {p.name: [] for p in members}, 0
        bounds = {p.name: T.bounds(ops.numel(p.work), nodes.local_size) for p in members}
        for j in range(nodes.local_size):   # local rank j's slices, back to back
            for p in members:
                b = bounds[p.name]
                size = b[j + 1] - b[j]
                length = ops.exact_length(gathered, offset, size, ops.itemsize(p.work))
                pieces[p.name].append(ops.unpack_exact(gathered[offset:offset + length], size,
                                                       out=p.work[b[j]:b[j + 1]]))
                offset += length
        for p in members:
            p.update = p.work = ops.join(p.work, pieces[p.name])


TRANSPORTS = {"allgather": Allgather(), "allreduce": Allreduce(), "sharded": Sharded(),
              "hierarchical": Hierarchical()}


class Bucket:
    """A fixed group of compressed tensors that travel together; per step, the members handed over so far."""

    def __init__(self, id, names, transport):
        self.id, self.names, self.kind = id, tuple(names), transport
        self.transport = TRANSPORTS[transport]
        # kept from step to step (node_rows: hierarchical, in shared memory; False where its node cannot)
        self.send = self.node_rows = None
        self.across = self.inner = None   # hierarchical: the exchange between nodes
        self.reset()

    def reset(self):
        """Forget the step (the send buffer is kept for the next one)."""
        self.arrived, self.launched = 0, None
        self.handle = self.handle2 = self.received = self.average = None
        self.sizes = self.sizes2 = self.ranges = None

    def take(self, ops, which):
        """Wait for one of the bucket's collectives and forget its handle (nothing is left in flight)."""
        handle = getattr(self, which)
        setattr(self, which, None)
        return ops.wait(handle)

    def wait_quietly(self, ops):
        """After an error: wait for the collectives this step started (their results are dropped)."""
        for handle in (self.handle, self.handle2):
            if handle is not None:
                try:
                    ops.wait(handle)
                except Exception:   # noqa: BLE001 - the error being raised is the one that matters
                    pass
        if self.inner is not None:
            self.inner.wait_quietly(ops)

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


def buckets_of(sizes, transports, bucket_bytes, tag=0):
    """The buckets of the compressed tensors. ``sizes``: {name: (elements, group)} in parameter order, group
    being what must be alike inside a bucket (compute dtype, device). In reverse parameter order (the order in
    which backward produces gradients), grouped by transport and group, each up to ``bucket_bytes`` of dense
    fp32 gradient (a larger tensor gets a bucket of its own)."""
    buckets, open_ = [], {}
    for name in reversed(list(sizes)):
        how, (elements, group) = transports.get(name), sizes[name]
        if how in (None, "dense"):
            continue
        key = (how, group)
        size = 4 * elements
        names, used = open_.get(key, ([], 0))
        if names and used + size > bucket_bytes:
            buckets.append((key, names))
            names, used = [], 0
        names.append(name)
        open_[key] = (names, used + size)
    buckets += [(key, names) for key, (names, _) in open_.items() if names]
    return [Bucket(f"{tag}.{i}", names, key[0]) for i, (key, names) in enumerate(buckets)]


# ---- the plan: which transport for each tensor (at the first step, every rank alike) ----------------------

def plan(comp, sizes, todo):
    """The transport of each tensor of ``todo`` ({name: elements}): dense under ``comp.dense_below``
    elements, else ``comp.config.transport`` resolved per tensor; for "auto", priced with the link and the
    kernel times this job measures (every rank takes the slowest rank's figures, so all choose alike)."""
    n, config = comp.size(), comp.config
    if todo and config.transport == T.AUTO and n > 1:
        if comp._link is None:
            comp._link = measure_link(comp, sizes)
        if comp._kernel_table is None:
            comp._kernel_table = measure_kernels(comp, sizes)
    chosen = {name: "dense" if d < comp.dense_below else
              T.resolve(config.transport, config, d, n, comp._link, table=comp._kernel_table)
              for name, d in todo.items()}
    if "hierarchical" in chosen.values() and comp.nodes is None:
        comp.nodes = nodes_of(comp)
    return chosen


def measure_link(comp, sizes, repeats=3):
    """The link as collectives of real bucket size see it: latency from a 4-byte allreduce, bandwidth from
    allreduces as large as a bucket (or the whole compressible model, if smaller), medians of ``repeats``."""
    n, ops = comp.size(), comp.ops
    model_bytes = sum(4 * d for d in sizes.values() if d >= comp.dense_below)
    elements = max(1 << 14, min(comp.bucket_bytes, model_bytes) // 4)
    small, big = ops.zeros(1, comp), ops.zeros(elements, comp)
    ops.allreduce_now(small, f"hc.link.warmup.{comp.tag}", comp._ranks())
    times = {"latency": [], "bandwidth": []}
    for r in range(repeats):
        for tensor, what in ((small, "latency"), (big, "bandwidth")):
            start = time.perf_counter()
            ops.allreduce_now(tensor, f"hc.link.{what}.{r}.{comp.tag}", comp._ranks())
            times[what].append(time.perf_counter() - start)
    t_small, t_big = ops.slowest([statistics.median(times["latency"]), statistics.median(times["bandwidth"])],
                                 f"hc.link.agree.{comp.tag}", comp._ranks())
    ring = 2 * (n - 1)
    return T.Link(bandwidth=ring / n * elements * 4 / max(t_big - t_small, 1e-9), latency=t_small / ring)


def measure_kernels(comp, sizes, repeats=3):
    """Seconds per element of this job's kernels, measured on this rank while every rank measures (ranks
    that share cores or a GPU are priced as they are): {compressor: (step, decode of one payload)}, the
    slowest rank's, for the cost model (``transport.kernel_seconds``)."""
    ops = comp.ops
    d = max(1 << 14, min(max(sizes.values(), default=0), comp.bucket_bytes // 4, 1 << 22))
    g = ops.randn(d, comp)
    e_in = ops.zeros(d, comp)
    e_out = ops.buffer_like(g)
    n = comp.size()
    compressors = [c for c in (comp.config.worker, comp.config.server) if c is not None]
    figures = []
    for c in compressors:
        step, decode = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            data, _, _ = ops.packed_step(comp, c, ("measure", "kernels"), g, e_in, e_out, (1, 0))
            ops.sync(data)
            step.append(time.perf_counter() - start)
            start = time.perf_counter()
            if c.summable:
                ops.sync(ops.decode_values(c, ops.view_values(data, g), d, (1, 0), out=e_in))
            else:
                ops.sync(ops.decode_mean(c, [data] * n, d, (1, 0), out=e_in))
            decode.append(time.perf_counter() - start)
        figures += [statistics.median(step) / d, statistics.median(decode) / d / (1 if c.summable else n)]
    figures = ops.slowest(figures, f"hc.kernels.agree.{comp.tag}", comp._ranks())
    return {c: (figures[2 * i], figures[2 * i + 1]) for i, c in enumerate(compressors)}
