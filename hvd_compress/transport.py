"""How payloads travel, what each way costs, and the automatic choice: shared by the plug-ins, the
simulation and the benchmarks.

Transports of one gradient tensor of d elements on n ranks (P: worker payload bytes, S: server payload):

    allgather  every rank receives all n payloads P and decodes them; a server pass runs on the root, which
               broadcasts its payload S.                     bytes per rank ~ (n - 1) P  (grows with n)
    allreduce  summable payloads (shared RandK, Identity) are averaged by Horovod.        ~ 2 P
    sharded    rank j owns slice j of the tensor (n nearly equal contiguous slices). Each rank compresses
               every slice on its own, an alltoall hands slice j's n payloads to rank j, which averages
               them, runs the server pass on its slice with its own server error buffer (or, without a
               server compressor, keeps the exact average, sent as its nonzeros where that is smaller),
               and the n results are allgathered.        ~ P + S : flat in n (no server: P + min(4d, n P))
    dense      no compression for this tensor: Horovod's fp32 allreduce of the exact gradient (no error
               buffers, no server pass); for tensors too small to be worth compressing.   ~ 2 * 4d
    hierarchical  for several nodes of L ranks each: an exact (dense) average inside each node, then local
               rank j of every node compresses slice j of its node's average (L slices; error buffer: that
               slice's), the nodes exchange these payloads among the ranks of the same local rank as
               allgather / allreduce would (the server pass on node 0's rank of each slice), and each node
               allgathers its L slices of the update (PyTorch's CPU tensors: both node phases through shared
               memory instead, ``torch/node_memory.py``). What leaves a node ~ one node's payload P (+ S),
               against L P for a flat transport; inside the node ~ 2 * 4d.

allgather and allreduce give the same update; sharded compresses slice by slice (TopK keeps the top
k/n of each slice, a scale such as ScaledSign's is per slice), so its update is that of the same compressors
applied blockwise, which the simulation reproduces exactly; hierarchical likewise, with one worker per node
(its ranks' exact average) and L slices.

The cost model (``step_seconds``) prices a tensor's transport as latency * messages + bytes / bandwidth +
kernel time, with ring collectives; ``choose`` picks the cheapest one for a tensor, and is what
``transport="auto"`` does per tensor. It is a per-tensor model: the benchmarks (scripts/bench.py) measure
how well it predicts whole steps.
"""
import math
from dataclasses import dataclass

from . import compressors as C

TRANSPORTS = ("allgather", "allreduce", "sharded", "dense", "hierarchical")
AUTO = "auto"


def check(transport, config):
    """The transport (or "auto" / None = allreduce for summable compressors, allgather otherwise) for a
    configuration; raises ValueError naming a bad value."""
    if transport is None:
        return None
    if transport != AUTO and transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}; known: {', '.join(TRANSPORTS + (AUTO,))}")
    if transport == "hierarchical" and config.momentum and config.momentum_masking:
        raise ValueError("momentum correction with factor masking is not available with transport "
                         "'hierarchical' (the masking needs the coordinates a node sent on every rank of the "
                         "node); momentum_masking=False is")
    if transport == "allreduce" and not config.worker.summable:
        raise ValueError(f"transport 'allreduce' needs summable payloads (shared RandK, none); "
                         f"{config.worker!r} travels by allgather or sharded")
    return transport


def default(config):
    return "allreduce" if config.worker.summable else "allgather"


def bounds(d, n):
    """The n + 1 boundaries of the n contiguous slices of d elements (sizes differ by at most one)."""
    return [(j * d) // n for j in range(n + 1)]


def shard_name(name, j):
    """The name that keys slice j's compressor calls (seeds) and collectives."""
    return f"{name}#{j}"


# ---- the cost model ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Link:
    """A rank's network link: bandwidth in bytes per second, latency per message in seconds."""
    bandwidth: float
    latency: float = 50e-6

    @classmethod
    def gbit(cls, gbit_per_s, latency_us=50.0):
        if not (isinstance(gbit_per_s, (int, float)) and gbit_per_s > 0 and math.isfinite(gbit_per_s)):
            raise ValueError(f"link bandwidth must be a positive number of Gbit/s, got {gbit_per_s!r}")
        return cls(gbit_per_s * 1e9 / 8, latency_us * 1e-6)


# Kernel seconds per element (encode, decode) on one CPU core, from `python -m scripts.bench kernels` on the
# development machine (2.5e7 float32 elements); a GPU is far faster, which only makes compression cheaper.
KERNEL_SECONDS_PER_ELEMENT = {
    "TopK": (5.2e-9, 1.5e-9), "RandK": (1.3e-9, 2.3e-9), "Natural": (2.2e-8, 8.7e-9),
    "ScaledSign": (4.1e-9, 2.8e-9), "OneBit": (1.7e-8, 2.3e-9), "QSGD": (2.8e-8, 4.2e-9),
    "Identity": (0.0, 0.0),
}
# Fixed cost of compressing one tensor, whatever its size: the Python and kernel-launch overhead of encode,
# pack, unpack and decode (the kernels benchmark's time at 10^4 elements).
KERNEL_CALL_SECONDS = 1.5e-4


def kernel_seconds(compressor, d, table=None):
    """(encode, decode) seconds of ``compressor`` on d elements, from ``table`` (default: the one above),
    whose keys are class names or compressor objects (figures measured for that very compressor)."""
    table = KERNEL_SECONDS_PER_ELEMENT if table is None else table
    if compressor is None:
        return 0.0, 0.0
    if compressor in table:
        enc, dec = table[compressor]
        return enc * d, dec * d
    stages = compressor.stages(d)
    if stages != [(compressor, d)]:   # Scaled, Compose: the sum of their parts
        costs = [kernel_seconds(c, n, table) for c, n in stages]
        return sum(e for e, _ in costs), sum(x for _, x in costs)
    enc, dec = table.get(type(compressor).__name__, (1e-8, 5e-9))
    return enc * d, dec * d


def traffic(transport, config, d, n, value_itemsize=4):
    """(bytes, messages) one rank sends for one tensor, ring algorithms; the root's share for a server
    pass on the root (binomial-tree broadcast)."""
    worker, server = config.worker, config.server
    if n == 1:
        return 0, 0
    if transport == "dense":
        # no messages of its own: Horovod fuses it into the step's allreduce, which runs anyway (it carries
        # the compressed tensors' step markers)
        return 2 * (n - 1) / n * value_itemsize * d, 0
    if transport == "allreduce":
        return 2 * (n - 1) / n * worker.wire_bytes(d, value_itemsize), 2 * (n - 1)
    if transport == "allgather":
        sent, messages = (n - 1) * worker.wire_bytes(d, value_itemsize), n - 1
        if server is not None:
            rounds = math.ceil(math.log2(n))
            sent += rounds * server.wire_bytes(d, value_itemsize)
            messages += rounds
        return sent, messages
    if transport == "sharded":
        b = bounds(d, n)
        slices = [b[j + 1] - b[j] for j in range(n)]
        up = sum(worker.wire_bytes(s, value_itemsize) for s in slices if s) * (n - 1) / n
        if server is not None:
            down = (n - 1) * max(server.wire_bytes(s, value_itemsize) if s else 0 for s in slices)
        else:   # the exact average: at most n payloads' nonzeros
            down = (n - 1) * max(exact_bytes(s, min(s, n * worker.max_nonzeros(s)), value_itemsize) for s in slices)
        return up + down, 2 * (n - 1)
    raise ValueError(f"unknown transport {transport!r}")


def exact_bytes(d, nnz, value_itemsize=4):
    """Bytes of an exact slice of d elements with nnz nonzeros as the sharded transport sends it without a
    server compressor: an int32 header, then the nonzeros (their indices as a sparsifier's travel, see
    ``Compressor.wire_layout``, and values) or all d values, whichever is smaller."""
    return 4 + min(d * value_itemsize, sparse_exact_bytes(d, nnz, value_itemsize))


def sparse_exact_bytes(d, nnz, value_itemsize):
    """Bytes of nnz nonzeros of an exact slice of d elements, after its header: the index blocks' counts, the
    values, the indices' low 16 bits."""
    return 4 * C.index_counts(d) + nnz * (2 + value_itemsize)


def step_seconds(transport, config, d, n, link, value_itemsize=4, table=None, call_seconds=None):
    """Modelled seconds for one tensor of d elements: network (latency + bytes / bandwidth) + kernels
    (``table`` and ``call_seconds`` default to KERNEL_SECONDS_PER_ELEMENT and KERNEL_CALL_SECONDS)."""
    sent, messages = traffic(transport, config, d, n, value_itemsize)
    network = messages * link.latency + sent / link.bandwidth
    if transport == "dense":
        return network
    enc, dec = kernel_seconds(config.worker, d, table)
    senc, sdec = kernel_seconds(config.server, d, table)
    if transport == "allreduce":
        kernels = enc + dec
    elif transport == "allgather":
        kernels = enc + n * dec + senc + sdec   # n whole payloads decoded; the root's server pass
    else:
        kernels = enc + dec + senc / n + sdec   # n payloads of one slice; the server pass on one slice
    return network + kernels + (KERNEL_CALL_SECONDS if call_seconds is None else call_seconds)


def candidates(config):
    return ["dense", default(config), "sharded"]


def choose(config, d, n, link, value_itemsize=4, table=None):
    """The cheapest transport for one tensor by the cost model (ties go to the earlier candidate); ``table``:
    measured kernel seconds per element (see ``kernel_seconds``), else the built-in one."""
    if n == 1:
        return default(config)
    costs = {t: step_seconds(t, config, d, n, link, value_itemsize, table) for t in candidates(config)}
    return min(costs, key=costs.get)


def resolve(transport, config, d, n, link=None, value_itemsize=4, table=None):
    """The transport a tensor of d elements actually uses."""
    if transport is None:
        return default(config)
    if transport == AUTO:
        if n == 1:
            return default(config)
        if link is None:
            raise ValueError("transport='auto' needs a link (measured or given)")
        return choose(config, d, n, link, value_itemsize, table)
    return transport
