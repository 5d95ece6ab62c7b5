"""``Compression``: the object passed as ``compression=`` to stock ``hvd.DistributedOptimizer``.

One step, per gradient g of parameter ``name`` on rank i of n (DESIGN.md section 1):

    compress(g)    x = g + e_i            payload p_i = C_w(x)    e_i <- x - decode(p_i)      (e_i: error feedback)
                   start the transport of p_i: allgather of its bytes, or allreduce when payloads are summable
    decompress()   gbar = 1/n sum_j decode(p_j)
                   root: y = gbar + d, v = C_s(y), d <- y - decode(v), broadcast v's bytes  (DoubleSqueeze)
                   every rank returns decode(v) (or gbar without a server pass) as the gradient

Horovod calls compress() from each parameter's backward hook and decompress() from synchronize(), after
allreducing whatever compress() returned. Here that is a one-element step marker (4 bytes) holding the step
number: its average tells every rank that the others are in the same step and that Horovod averages. The
payloads travel in collectives that compress() starts asynchronously, so they overlap the rest of the
backward pass. The first decompress() of a step finishes the whole step at once: one small allreduce tells
every rank whether any rank's gradient was not finite, and only then are error buffers committed, so a bad
gradient leaves every buffer as it was.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import horovod.torch as hvd

from .. import compressors as C
from .. import agreement
from ..seeds import server_seed, worker_seed
from . import kernels as K


@dataclass
class _Pending:
    """A gradient between compress() and decompress()."""
    shape: torch.Size
    grad_dtype: torch.dtype
    x: torch.Tensor                 # g + e, flat, compute dtype
    local: torch.Tensor             # decode of this rank's own payload
    seed: tuple                     # (key, step) of the worker compressor's draw
    finite: torch.Tensor            # 0-d bool: x has no NaN/Inf (kept on device: no sync in the hook)
    handle: object                  # the payload's collective
    bytes_sent: int
    update: Optional[torch.Tensor] = None       # the aggregated (and server-compressed) gradient
    server_error: Optional[torch.Tensor] = None  # root only: the candidate new d


class Compression:
    """Gradient compression with optional worker error feedback and DoubleSqueeze server pass.

    Args:
        compressor: worker compressor C_w (a compressor object or a spec such as ``"topk:0.01"``).
        error_feedback: keep an error buffer per parameter on every worker.
        server: compressor C_s of the DoubleSqueeze server pass (with its own error buffer on the root);
            None for no server pass.
        named_parameters: the same ``model.named_parameters()`` given to the optimizer; Horovod hands
            compress() a bare gradient, and per-parameter state is found through it.
        root_rank: the rank that runs the server pass.
        seed: base of the seeds of random compressors (each call is keyed by step, rank and parameter).

    Gradients are averaged (use Horovod's default ``op=hvd.Average``). Half-precision gradients are
    compressed in float32, with float32 error buffers, and returned in their own dtype.
    """

    def __init__(self, compressor, error_feedback=False, server=None, named_parameters=None, root_rank=0, seed=0):
        worker = C.parse(compressor) or C.Identity()
        self.config = C.Config(worker, bool(error_feedback), C.parse(server))
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
        try:
            dtype = K.compute_dtype(tensor.dtype)
        except TypeError as err:
            raise TypeError(f"parameter {name!r}: {err}") from None
        worker, rank = self.config.worker, hvd.rank()
        x = tensor.detach().reshape(-1).to(dtype)
        error = self._worker_error.get(name)
        if self.config.error_feedback and error is not None:
            x = x + error.to(x.device, dtype)
        seed = worker_seed(worker, self.seed, self._step, rank, name)
        try:
            parts = K.encode(worker, x, seed)
        except ValueError as err:
            raise ValueError(f"parameter {name!r}: {err}") from None
        local = K.decode(worker, parts, x.numel(), seed, dtype)
        if worker.summable:
            sent = parts[0]
            handle = hvd.allreduce_async(sent, name=f"hc.w.{name}", op=hvd.Average)
        else:
            sent = K.pack(parts)
            handle = hvd.allgather_async(sent, name=f"hc.w.{name}")
        marker = torch.full((1,), float(self._step + 1), dtype=torch.float32, device=x.device)
        self._pending[name] = _Pending(tensor.shape, tensor.dtype, x, local, seed, torch.isfinite(x).all(), handle,
                                       sent.numel() * sent.element_size() + marker.element_size())
        return marker, name

    def decompress(self, marker, name):
        pending = self._pending.get(name)
        if pending is None:
            raise RuntimeError(f"decompress() for parameter {name!r} that was not compressed in this step")
        if pending.update is None:   # the first decompress() of the step
            value = marker.item()
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

    def _finish_step(self):
        """Wait for every payload of the step, aggregate, and run the server pass (all parameters at once,
        in name order, so that every rank starts the broadcasts in the same order); then make sure that
        no rank had a non-finite gradient before anything is committed."""
        worker, server = self.config.worker, self.config.server
        n, is_root = hvd.size(), hvd.rank() == self.root_rank
        names = sorted(self._pending)
        not_finite = torch.stack([~self._pending[name].finite for name in names]).to(torch.float32)
        not_finite_anywhere = hvd.allreduce_async(not_finite, name="hc.not_finite", op=hvd.Sum)
        self._step_stats["bytes_sent"] += not_finite.numel() * not_finite.element_size()
        broadcasts = []
        for name in names:
            p = self._pending[name]
            received, d = hvd.synchronize(p.handle), p.x.numel()
            if worker.summable:
                gbar = K.decode(worker, [received], d, p.seed, p.x.dtype)
            else:
                gbar = None
                for payload in received.view(n, -1):   # allgather stacks the n equal-sized payloads
                    decoded = K.decode(worker, K.unpack(worker, payload, d, p.x.dtype), d, p.seed, p.x.dtype)
                    gbar = decoded if gbar is None else gbar + decoded
                gbar = gbar / n
            if server is None:
                p.update = gbar
                continue
            seed = server_seed(server, self.seed, self._step, name)
            if is_root:
                y = gbar
                if name in self._server_error:
                    y = gbar + self._server_error[name].to(gbar.device, gbar.dtype)
                data = K.pack(K.encode(server, y, seed))
                p.server_error = y   # minus decode(v) below
                p.bytes_sent += data.numel()
            else:
                data = torch.empty(server.wire_bytes(d, gbar.element_size()), dtype=torch.uint8, device=gbar.device)
            broadcasts.append((p, seed, data, hvd.broadcast_async_(data, self.root_rank, name=f"hc.s.{name}")))
        for p, seed, data, handle in broadcasts:
            hvd.synchronize(handle)
            d = p.x.numel()
            p.update = K.decode(server, K.unpack(server, data, d, p.x.dtype), d, seed, p.x.dtype)
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
        if self.config.error_feedback:
            self._worker_error[name] = p.x - p.local
        if p.server_error is not None:
            self._server_error[name] = p.server_error
        s = self._step_stats
        residual = torch.sum((p.x - p.local) ** 2)   # ||C(x) - x||^2, also ||e||^2 with error feedback
        s["bytes_sent"] += p.bytes_sent
        s["dense_bytes"] += 4 * p.x.numel()
        s["residual"] += residual
        s["norm"] += torch.sum(p.x ** 2)
        if self.config.error_feedback:
            s["worker_error"] += residual
        if p.server_error is not None:
            s["server_error"] += torch.sum(p.server_error ** 2)

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
        return {"format": agreement.STATE_FORMAT, "fingerprint": self.fingerprint(), "step": self._step,
                "size": len(everyone), "worker_error": [w for w, _ in everyone],
                "server_error": everyone[self.root_rank][1]}

    def load_state_dict(self, state):
        """Restores what ``state_dict()`` saved; every rank loads the same dict and takes its own part."""
        if self._pending:
            raise RuntimeError("load_state_dict() during a step (between backward() and optimizer.step())")
        agreement.check_state(state, self.fingerprint(), hvd.size())
        unknown = set(state["worker_error"][hvd.rank()]) - set(self._params)
        if unknown:
            raise ValueError(f"the state has error buffers for unknown parameters {sorted(unknown)}")
        self._worker_error = {n: t.clone() for n, t in state["worker_error"][hvd.rank()].items()}
        is_root = hvd.rank() == self.root_rank
        self._server_error = {n: t.clone() for n, t in state["server_error"].items()} if is_root else {}
        self._step = int(state["step"])

    def stats(self):
        """About the last completed step (all zero before one): bytes this rank handed to collectives,
        the dense fp32 equivalent, their ratio, the compressor's relative error ||C(x)-x||^2/||x||^2
        over all gradients, error-buffer norms; ``steps`` and cumulative byte totals since construction."""
        s = self._last_stats or self._new_stats()
        value = lambda v: float(v) if not torch.is_tensor(v) else v.item()
        norm = value(s["norm"])
        return {"steps": self._step, "bytes_sent": s["bytes_sent"], "dense_bytes": s["dense_bytes"],
                "ratio": s["bytes_sent"] / s["dense_bytes"] if s["dense_bytes"] else 0.0,
                "variance": value(s["residual"]) / norm if norm else 0.0,
                "worker_error_norm": math.sqrt(value(s["worker_error"])),
                "server_error_norm": math.sqrt(value(s["server_error"])),
                "total_bytes_sent": self._totals["bytes_sent"], "total_dense_bytes": self._totals["dense_bytes"]}

    def __repr__(self):
        return f"Compression({self.config.fingerprint()})"
