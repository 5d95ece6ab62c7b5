"""``Compression``: the object passed as ``compression=`` to stock ``hvd.DistributedOptimizer``.

One step, per gradient g of parameter ``name`` on rank i of n (DESIGN.md section 1):

    compress(g)    x = g + e_i            payload p_i = C_w(x)    e_i <- x - decode(p_i)      (e_i: error feedback)
                   start the transport of p_i: allgather of its bytes, or allreduce when payloads are summable
    decompress()   gbar = 1/n sum_j decode(p_j)
                   root: y = gbar + d, v = C_s(y), d <- y - decode(v), broadcast v's bytes  (DoubleSqueeze)
                   every rank returns decode(v) (or gbar without a server pass) as the gradient

With ``transport="sharded"`` the same runs per slice: x's n slices are compressed one by one, an alltoall
hands rank j the n payloads of slice j, rank j aggregates them and runs the server pass on its slice with
its own slice of d (without a server compressor: the exact average, sent sparse where that is smaller), and
the n results are allgathered. ``"dense"`` leaves a tensor to Horovod's own allreduce; ``"auto"`` picks per
tensor by the cost model of ``hvd_compress.transport``.

Horovod calls compress() from each parameter's backward hook and decompress() from synchronize(), after
allreducing whatever compress() returned. Here that is a one-element step marker (4 bytes) holding the step
number: its average tells every rank that the others are in the same step and that Horovod averages. The
payloads travel in collectives that compress() starts asynchronously, so they overlap the rest of the
backward pass. The first decompress() of a step finishes the whole step at once: one small allreduce tells
every rank whether any rank's gradient was not finite, and only then are error buffers committed, so a bad
gradient leaves every buffer as it was.
"""
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
import horovod.torch as hvd

from .. import compressors as C
from .. import agreement
from .. import transport as T
from ..seeds import server_seed, worker_seed
from . import kernels as K


@dataclass
class _Pending:
    """A gradient between compress() and decompress()."""
    transport: str
    shape: torch.Size
    grad_dtype: torch.dtype
    bytes_sent: int
    x: Optional[torch.Tensor] = None         # g + e, flat, compute dtype (None: dense)
    local: Optional[torch.Tensor] = None     # decode of this rank's own payload(s)
    finite: Optional[torch.Tensor] = None    # 0-d bool: x has no NaN/Inf (kept on device: no sync in the hook)
    handle: object = None                    # the payload's collective
    update: Optional[torch.Tensor] = None       # the aggregated (and server-compressed) gradient
    server_error: Optional[torch.Tensor] = None  # root (sharded: every rank, its slice): the candidate new d


def _all_finite(x):
    """0-d bool: no NaN or Inf in x. min and max propagate NaN, and read x once without a temporary
    (torch.isfinite(x).all() writes a mask as large as x: 20 times slower on CPU)."""
    if x.numel() == 0:
        return torch.tensor(True, device=x.device)
    low, high = torch.aminmax(x)
    return torch.isfinite(low) & torch.isfinite(high)


class Compression:
    """Gradient compression with optional worker error feedback and DoubleSqueeze server pass.

    Args:
        compressor: worker compressor C_w (a compressor object or a spec such as ``"topk:0.01"``).
        error_feedback: keep an error buffer per parameter on every worker.
        server: compressor C_s of the DoubleSqueeze server pass (with its own error buffer on the root);
            None for no server pass.
        named_parameters: the same ``model.named_parameters()`` given to the optimizer; Horovod hands
            compress() a bare gradient, and per-parameter state is found through it.
        root_rank: the rank that runs the server pass (transports allgather / allreduce).
        seed: base of the seeds of random compressors (each call is keyed by step, rank and parameter).
        transport: how payloads travel (``hvd_compress.transport``): None (allreduce for summable
            payloads, allgather otherwise), "allgather", "allreduce", "sharded" (with a server compressor,
            bytes per rank flat in the number of ranks), "dense" (no compression), or "auto" (per tensor, by
            the cost model).
        link_gbps: for "auto", the link bandwidth in Gbit/s; None measures it (and the latency) at the
            first step with two allreduces, and every rank takes the slowest rank's figures.

    Gradients are averaged (use Horovod's default ``op=hvd.Average``). Half-precision gradients are
    compressed in float32, with float32 error buffers, and returned in their own dtype.
    """

    def __init__(self, compressor, error_feedback=False, server=None, named_parameters=None, root_rank=0, seed=0,
                 transport=None, link_gbps=None):
        worker = C.parse(compressor) or C.Identity()
        config = C.Config(worker, bool(error_feedback), C.parse(server))
        self.config = dataclasses.replace(config, transport=T.check(transport, config))
        self._link = None if link_gbps is None else T.Link.gbit(link_gbps)
        if link_gbps is not None and transport != T.AUTO:
            raise ValueError(f"link_gbps={link_gbps!r} is only used by transport='auto' (got {transport!r})")
        if named_parameters is None:
            raise ValueError("Compression needs named_parameters=model.named_parameters() (the same as the "
                             "optimizer's): Horovod passes compress() no parameter name")
        self._params = {}
        for item in named_parameters:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor)):
                raise ValueError(f"named_parameters must yield (name, tensor) pairs, got {item!r:.80}")
            if item[0] in self._params:
                raise ValueError(f"parameter name {item[0]!r} appears twice in named_parameters")
            self._params[item[0]] = item[1]
        self.root_rank, self.seed = int(root_rank), int(seed)
        self._name_by_grad_id = {}
        self._transports = {}                             # name -> the transport its tensor uses
        self._worker_error, self._server_error = {}, {}   # name -> flat tensor
        self._pending = {}                                # name -> _Pending, for the step in flight
        self._step = 0
        self._checked = False
        self._step_stats, self._last_stats = self._new_stats(), None
        self._totals = {"bytes_sent": 0, "dense_bytes": 0}

    # ---- Horovod's Compressor interface -----------------------------------------------------------------

    def compress(self, tensor):
        name = self._name_of(tensor)
        if not self._checked:
            self._check_same_config_everywhere()
        if name in self._pending:
            raise RuntimeError(f"compress() was called twice for parameter {name!r} in one step")
        how = self._transport_of(name, tensor.numel())
        if how == "dense":   # Horovod averages the gradient itself
            self._pending[name] = _Pending(how, tensor.shape, tensor.dtype, tensor.numel() * tensor.element_size())
            return tensor, name
        try:
            dtype = K.compute_dtype(tensor.dtype)
        except TypeError as err:
            raise TypeError(f"parameter {name!r}: {err}") from None
        x = tensor.detach().reshape(-1).to(dtype)
        error = self._worker_error.get(name)
        if self.config.error_feedback and error is not None:
            x = x + error.to(x.device, dtype)
        try:
            if how == "sharded":
                b, n = T.bounds(x.numel(), hvd.size()), hvd.size()
                pieces = [self._encode(x[b[j]:b[j + 1]], T.shard_name(name, j)) for j in range(n)]
                local = torch.cat([decoded for _, decoded in pieces])
                sent = torch.cat([data for data, _ in pieces])
                splits = torch.tensor([data.numel() for data, _ in pieces], dtype=torch.int32)
                handle = hvd.alltoall_async(sent, splits=splits, name=f"hc.w.{name}")
            else:
                parts, local = self._encode(x, name, packed=False)
                sent = parts[0] if how == "allreduce" else K.pack(parts)
                handle = (hvd.allreduce_async(sent, name=f"hc.w.{name}", op=hvd.Average) if how == "allreduce"
                          else hvd.allgather_async(sent, name=f"hc.w.{name}"))
        except ValueError as err:
            where = f" (one of its {hvd.size()} slices, transport 'sharded')" if how == "sharded" else ""
            raise ValueError(f"parameter {name!r}{where}: {err}") from None
        marker = torch.full((1,), float(self._step + 1), dtype=torch.float32, device=x.device)
        self._pending[name] = _Pending(how, tensor.shape, tensor.dtype,
                                       sent.numel() * sent.element_size() + marker.element_size(),
                                       x, local, _all_finite(x), handle)
        return marker, name

    def decompress(self, output, name):
        pending = self._pending.get(name)
        if pending is None:
            raise RuntimeError(f"decompress() for parameter {name!r} that was not compressed in this step")
        if pending.transport == "dense":
            pending.update = output
        elif pending.update is None:   # the first decompress() of a compressed tensor in this step
            value = output.item()
            if not math.isclose(value, self._step + 1, rel_tol=1e-3):
                self._abandon_step()
                raise RuntimeError(f"parameter {name!r}: Horovod's reduction of the step marker gave {value}, "
                                   f"expected {self._step + 1}: use op=hvd.Average, and make every rank run the "
                                   f"same steps")
            self._finish_step()
        self._commit(name, self._pending.pop(name))
        result = pending.update.to(pending.grad_dtype).view(pending.shape)
        if not self._pending:
            self._end_step()
        return result

    # ---- the step -------------------------------------------------------------------------------------------

    def _encode(self, x, key, packed=True):
        """C_w of one piece (keyed by ``key``: a parameter or a slice): (payload bytes or parts, decoded)."""
        worker = self.config.worker
        if x.numel() == 0:
            return torch.empty(0, dtype=torch.uint8, device=x.device), x
        seed = worker_seed(worker, self.seed, self._step, hvd.rank(), key)
        parts = K.encode(worker, x, seed)
        decoded = K.decode(worker, parts, x.numel(), seed, x.dtype)
        return (K.pack(parts) if packed else parts), decoded

    def _average(self, received, d, key, dtype):
        """gbar of one piece from the n payloads' bytes (rows of ``received``), or from Horovod's average
        of summable payloads."""
        worker, n = self.config.worker, hvd.size()
        seed = worker_seed(worker, self.seed, self._step, hvd.rank(), key)   # only shared draws decode by seed
        if received.dtype != torch.uint8:
            return K.decode(worker, [received], d, seed, dtype)
        return K.decode_sum(worker, received.view(n, -1), d, seed, dtype) / n

    def _server_pass(self, gbar, key, error):
        """The server's payload bytes for gbar (+ its error buffer) and the candidate new error buffer
        (less decode of the payload, subtracted once that is decoded)."""
        server = self.config.server
        if gbar.numel() == 0:
            return torch.empty(0, dtype=torch.uint8, device=gbar.device), gbar
        y = gbar + error.to(gbar.device, gbar.dtype) if error is not None else gbar
        return K.pack(K.encode(server, y, server_seed(server, self.seed, self._step, key))), y

    def _decode_server(self, data, d, key, dtype):
        server = self.config.server
        if d == 0:
            return torch.empty(0, dtype=dtype, device=data.device)
        seed = server_seed(server, self.seed, self._step, key)
        return K.decode(server, K.unpack(server, data, d, dtype), d, seed, dtype)

    def _finish_step(self):
        """Wait for every payload of the step, aggregate, and run the server pass (all parameters at once,
        in name order, so that every rank starts the second-stage collectives in the same order); then make
        sure that no rank had a non-finite gradient before anything is committed."""
        server, n, rank = self.config.server, hvd.size(), hvd.rank()
        names = sorted(name for name, p in self._pending.items() if p.transport != "dense")
        not_finite = torch.stack([~self._pending[name].finite for name in names]).to(torch.float32)
        not_finite_anywhere = hvd.allreduce_async(not_finite, name="hc.not_finite", op=hvd.Sum)
        self._step_stats["bytes_sent"] += not_finite.numel() * not_finite.element_size()
        second = []
        for name in names:
            p = self._pending[name]
            received, d = hvd.synchronize(p.handle), p.x.numel()
            if p.transport == "sharded":   # this rank's slice of every rank's payload
                b = T.bounds(d, n)
                key, size = T.shard_name(name, rank), b[rank + 1] - b[rank]
                gbar = self._average(received[0], size, key, p.x.dtype) if size else p.x[:0]
                if server is None:   # the exact average of the slice, sparse where that is smaller
                    data = K.pack_exact(gbar)
                else:
                    data, p.server_error = self._server_pass(gbar, key, self._server_error.get(name))
                handle = hvd.allgather_async(data, name=f"hc.s.{name}")
            else:
                gbar = self._average(received, d, name, p.x.dtype)
                if server is None:
                    p.update = gbar
                    continue
                if rank == self.root_rank:
                    data, p.server_error = self._server_pass(gbar, name, self._server_error.get(name))
                else:
                    data = torch.empty(server.wire_bytes(d, gbar.element_size()), dtype=torch.uint8,
                                       device=gbar.device)
                handle = hvd.broadcast_async_(data, self.root_rank, name=f"hc.s.{name}")
            if p.transport == "sharded" or rank == self.root_rank:   # a broadcast's receivers send nothing
                p.bytes_sent += data.numel()
            second.append((name, p, handle))
        for name, p, handle in second:
            data, d, dtype = hvd.synchronize(handle), p.x.numel(), p.x.dtype
            if p.transport == "sharded" and server is None:
                b = T.bounds(d, n)
                p.update = K.unpack_exact(data, [b[j + 1] - b[j] for j in range(n)], dtype)
            elif p.transport == "sharded":
                b, downlink = T.bounds(d, n), server
                sizes = [downlink.wire_bytes(b[j + 1] - b[j], p.x.element_size()) if b[j + 1] > b[j] else 0
                         for j in range(n)]
                chunks = torch.split(data, sizes)
                p.update = torch.cat([self._decode_server(chunks[j], b[j + 1] - b[j], T.shard_name(name, j), dtype)
                                      for j in range(n)])
                if p.server_error is not None:
                    p.server_error = p.server_error - p.update[b[rank]:b[rank + 1]]
            else:
                p.update = self._decode_server(data, d, name, dtype)
                if p.server_error is not None:
                    p.server_error = p.server_error - p.update
        bad = [name for name, count in zip(names, hvd.synchronize(not_finite_anywhere).tolist()) if count]
        if bad:
            here = [name for name, flag in zip(names, not_finite.tolist()) if flag]
            self._abandon_step()
            raise FloatingPointError(
                f"gradient not finite (NaN or Inf) for parameter(s) {bad} on some rank (on this rank: "
                f"{here or 'none'}); hvd_compress dropped this step and left every error buffer unchanged")

    def _commit(self, name, p):
        s = self._step_stats
        s["bytes_sent"] += p.bytes_sent
        s["dense_bytes"] += 4 * p.shape.numel()
        if p.transport == "dense":
            return
        error = p.x - p.local
        if self.config.error_feedback:
            self._worker_error[name] = error
        if p.server_error is not None:
            self._server_error[name] = p.server_error
        residual = torch.dot(error, error)   # ||C(x) - x||^2, also ||e||^2 with error feedback
        s["residual"] += residual
        s["norm"] += torch.dot(p.x, p.x)
        if self.config.error_feedback:
            s["worker_error"] += residual
        if p.server_error is not None:
            s["server_error"] += torch.dot(p.server_error, p.server_error)

    def _end_step(self):
        self._last_stats, self._step_stats = self._step_stats, self._new_stats()
        self._totals["bytes_sent"] += self._last_stats["bytes_sent"]
        self._totals["dense_bytes"] += self._last_stats["dense_bytes"]
        self._step += 1

    def _abandon_step(self):
        self._pending.clear()
        self._step_stats = self._new_stats()

    @staticmethod
    def _new_stats():
        return {"bytes_sent": 0, "dense_bytes": 0, "residual": 0.0, "norm": 0.0, "worker_error": 0.0,
                "server_error": 0.0}

    # ---- which transport ------------------------------------------------------------------------------------

    def _transport_of(self, name, d):
        how = self._transports.get(name)
        if how is None:
            if self.config.transport == T.AUTO and self._link is None and hvd.size() > 1:
                self._link = self._measure_link()
            how = self._transports[name] = T.resolve(self.config.transport, self.config, d, hvd.size(), self._link)
        return how

    def _measure_link(self):
        """The link as collectives see it: latency from a 4-byte allreduce, bandwidth from an 8 MiB one;
        every rank takes the slowest rank's times, so that all ranks choose alike."""
        n, device = hvd.size(), next(iter(self._params.values())).device
        small, big = torch.zeros(1, device=device), torch.zeros(1 << 21, device=device)
        hvd.allreduce(small, name="hc.link.warmup")
        times = []
        for tensor, what in ((small, "latency"), (big, "bandwidth")):
            start = time.perf_counter()
            hvd.allreduce(tensor, name=f"hc.link.{what}")
            times.append(time.perf_counter() - start)
        t_small, t_big = hvd.allreduce(torch.tensor(times, dtype=torch.float64), op=hvd.Max,
                                       name="hc.link.agree").tolist()
        ring = 2 * (n - 1)
        return T.Link(bandwidth=ring / n * big.numel() * 4 / max(t_big - t_small, 1e-9), latency=t_small / ring)

    # ---- finding a gradient's parameter, and agreeing on the configuration ---------------------------------

    def _name_of(self, grad):
        name = self._name_by_grad_id.get(id(grad))
        if name is None or self._params[name].grad is not grad:
            # grads are new tensors after zero_grad(set_to_none=True): rebuild the map
            self._name_by_grad_id = {id(p.grad): n for n, p in self._params.items() if p.grad is not None}
            name = self._name_by_grad_id.get(id(grad))
            if name is None or self._params[name].grad is not grad:
                raise ValueError(
                    f"compress() got a tensor (shape {tuple(grad.shape)}) that is not the .grad of any parameter "
                    f"in named_parameters: give Compression the same named_parameters as the optimizer "
                    f"(sparse_as_dense=True is not supported)")
        return name

    def fingerprint(self):
        shapes = sorted((n, p.shape) for n, p in self._params.items())
        return agreement.fingerprint(self.config, self.root_rank, self.seed, shapes)

    def _check_same_config_everywhere(self):
        """Every rank must start the same collectives; a rank configured differently would hang the others,
        so compare before the first payload travels (fixed-size collectives: safe whatever the config)."""
        mine = self.fingerprint()
        digests = hvd.allgather(torch.tensor([agreement.digest(mine)], dtype=torch.int64), name="hc.config_check")
        if bool((digests != agreement.digest(mine)).any()):
            everyone = hvd.allgather_object(mine, name="hc.config_check_text")
            raise agreement.mismatch_error(everyone)
        self._checked = True

    # ---- checkpointing and statistics --------------------------------------------------------------------

    def state_dict(self):
        """Every error buffer of every rank (worker) and of the root (server), and the step, on CPU.

        A collective when there are several ranks: call it on every rank (then save it on one)."""
        if self._pending:
            raise RuntimeError("state_dict() during a step (between backward() and optimizer.step())")
        mine = ({n: t.detach().cpu().clone() for n, t in self._worker_error.items()},
                {n: t.detach().cpu().clone() for n, t in self._server_error.items()})
        everyone = hvd.allgather_object(mine, name="hc.state_dict") if hvd.size() > 1 else [mine]
        server_error = dict(everyone[self.root_rank][1])
        for name, how in self._transports.items():   # sharded: every rank holds its slice of d
            if how == "sharded" and name in server_error:
                server_error[name] = torch.cat([s[name] for _, s in everyone])
        link = self._link and (self._link.bandwidth, self._link.latency)
        return {"format": agreement.STATE_FORMAT, "fingerprint": self.fingerprint(), "step": self._step,
                "size": len(everyone), "worker_error": [w for w, _ in everyone], "server_error": server_error,
                "transports": dict(self._transports), "link": link}

    def load_state_dict(self, state):
        """Restores what ``state_dict()`` saved; every rank loads the same dict and takes its own part."""
        if self._pending:
            raise RuntimeError("load_state_dict() during a step (between backward() and optimizer.step())")
        agreement.check_state(state, self.fingerprint(), hvd.size())
        unknown = set(state["worker_error"][hvd.rank()]) - set(self._params)
        if unknown:
            raise ValueError(f"the state has error buffers for unknown parameters {sorted(unknown)}")
        self._worker_error = {n: t.clone() for n, t in state["worker_error"][hvd.rank()].items()}
        self._transports = dict(state.get("transports", {}))   # "auto" continues with the saved choices
        self._link = T.Link(*state["link"]) if state.get("link") else self._link
        rank, is_root = hvd.rank(), hvd.rank() == self.root_rank
        self._server_error = {}
        for name, t in state["server_error"].items():
            if self._transports.get(name) == "sharded":
                b = T.bounds(t.numel(), hvd.size())
                self._server_error[name] = t[b[rank]:b[rank + 1]].clone()
            elif is_root:
                self._server_error[name] = t.clone()
        self._step = int(state["step"])

    def stats(self):
        """About the last completed step (all zero before one): bytes this rank handed to collectives,
        the dense fp32 equivalent, their ratio, the compressor's relative error ||C(x)-x||^2/||x||^2
        over all gradients, error-buffer norms; ``steps`` and cumulative byte totals since construction;
        ``transports`` (the transport of each parameter) and ``link_gbps`` (the link "auto" chose by)."""
        s = self._last_stats or self._new_stats()
        value = lambda v: float(v) if not torch.is_tensor(v) else v.item()
        norm = value(s["norm"])
        return {"steps": self._step, "bytes_sent": s["bytes_sent"], "dense_bytes": s["dense_bytes"],
                "ratio": s["bytes_sent"] / s["dense_bytes"] if s["dense_bytes"] else 0.0,
                "variance": value(s["residual"]) / norm if norm else 0.0,
                "worker_error_norm": math.sqrt(value(s["worker_error"])),
                "server_error_norm": math.sqrt(value(s["server_error"])),
                "total_bytes_sent": self._totals["bytes_sent"], "total_dense_bytes": self._totals["dense_bytes"],
                "transports": dict(self._transports),
                "link_gbps": self._link and self._link.bandwidth * 8 / 1e9}

    def __repr__(self):
        return f"Compression({self.config.fingerprint()})"
