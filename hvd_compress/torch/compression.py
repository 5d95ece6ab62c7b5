"""``Compression``: the object passed as ``compression=`` to stock ``hvd.DistributedOptimizer``.

One step, per gradient g of parameter ``name`` on rank i of n (the pipeline of the README's Design section):

    compress(g)    x = g + e_i            payload p_i = C_w(x)    e_i <- x - decode(p_i)      (e_i: error feedback)
    decompress()   gbar = 1/n sum_j decode(p_j)
                   root: y = gbar + d, v = C_s(y), d <- y - decode(v), broadcast v's bytes  (DoubleSqueeze)
                   every rank returns decode(v) (or gbar without a server pass) as the gradient

The worker step and the server pass are the same fused kernel (``kernels.step``: one or two passes over
memory into buffers allocated once). Payloads travel in buckets (``hvd_compress/bucket.py``, shared with the
TensorFlow plug-in): the compressed tensors of a bucket are encoded one by one, as Horovod hands them over,
and the bucket's payloads leave in one collective as soon as its last tensor is in. How a bucket travels
(allgather, allreduce of summable payloads, sharded) is its transport object; ``"dense"`` tensors (and, by
default, tensors under ``dense_below`` elements) go to Horovod's own fused allreduce; ``"auto"`` picks per
tensor by the cost model of ``hvd_compress.transport``, priced with this job's measured link and kernel times.

Horovod calls compress() from each parameter's backward hook and decompress() from synchronize(), after
allreducing whatever compress() returned. Here that is a one-element step marker (4 bytes) holding the step
number: its average tells every rank that the others are in the same step and that Horovod averages. The first
decompress() of a step finishes the whole step at once. Each rank's finiteness flags ride in the payload
collectives, so every rank knows whether any rank's gradient was not finite before anything is committed
(error buffers are double-buffered): such a step is skipped, or raises, and leaves every buffer as it was.
The update is written into the gradient's own memory, which the step no longer needs, and returned in its
place: no fresh tensor per step.
"""
import itertools
import math
import weakref

import torch
import horovod.torch as hvd

from .. import options
from ..bucket import Bucket, Pending, buckets_of, plan
from ..plugin import CompressionBase
from . import checkpoint, horovod
from . import kernels as K
from . import ops
from .optim import check_momentum_of
from .stats import Stats

# Collectives are named after the Compression object (its number in this process: every rank builds the same
# objects in the same order), so that two models trained alternately (a GAN) never share a collective's name.
_instances = itertools.count()


class Compression(CompressionBase):
    """Gradient compression with optional worker error feedback and DoubleSqueeze server pass.

    Args:
        compressor: worker compressor C_w (a compressor object or a spec such as ``"topk:0.01"``).
        error_feedback: keep an error buffer per parameter on every worker.
        server: compressor C_s of the DoubleSqueeze server pass (with its own error buffer on the root);
            None for no server pass.
        named_parameters: the same ``model.named_parameters()`` given to the optimizer; Horovod hands
            compress() a bare gradient, and per-parameter state is found through it.
        root_rank: the rank that runs the server pass (transports allgather / allreduce), counted within
            the process set (0: its first rank; without process sets, the global rank).
        seed: base of the seeds of random compressors (each call is keyed by step, rank and parameter).
        transport: how payloads travel (``hvd_compress.transport``): None (allreduce for summable
            payloads, allgather otherwise), "allgather", "allreduce", "sharded" (with a server compressor,
            bytes per rank flat in the number of ranks), "dense" (no compression), "hierarchical" (several
            nodes: exact inside a node, compressed between nodes; needs Horovod's dynamic process sets, see
            ``bucket.Hierarchical``), or "auto" (per tensor, by the cost model; it never picks "hierarchical").
        link_gbps: for "auto", the link bandwidth in Gbit/s; None measures it (and the latency) at the
            first step with bucket-sized allreduces, and every rank takes the slowest rank's figures.
        dense_below: tensors with fewer elements (biases, norms) travel uncompressed in Horovod's fused
            dense allreduce (0: compress every tensor). ``stats()["dense_small_bytes"]`` says what it costs.
        bucket_mb: the most dense gradient megabytes (MiB of fp32) per bucket: the compressed tensors of
            a bucket travel in one collective (Horovod's fusion buffer is 64 MiB by default).
        process_set: the Horovod process set whose ranks average the gradients: the one given to
            ``hvd.DistributedOptimizer(process_set=...)``. None takes the optimizer's at the first step
            (every collective of this object runs on it); give it here too if ``state_dict()`` or
            ``load_state_dict()`` are called before the first step.
        momentum: momentum correction with factor masking (Deep Gradient Compression): each worker keeps a
            velocity u <- momentum * u + g and compresses u + e (error feedback) in g's place; the coordinates
            sent leave u. Give the optimizer no momentum of its own (refused at the first step). Needs
            error_feedback=True and a sparsifier (TopK, RandK, compositions starting with one). Tensors that
            travel dense send u.
        momentum_masking: False keeps u where coordinates were sent (no factor masking): each gradient then
            moves its weight by lr / (1 - momentum) in all, as dense SGD with momentum does.
        nesterov: Nesterov's momentum (as ``torch.optim.SGD(nesterov=True)``): g + momentum * u is compressed
            (or averaged) in g's place instead of u.
        warmup: the warm-up of the worker sparsifier's ratio (Deep Gradient Compression): a number of steps
            over which it falls geometrically from 25% to its own ratio, or (steps, first ratio); 0: none.
            ``stats()["worker_ratio"]`` is the ratio in force. Needs a sparsifier given by ratio=. A server
            sparsifier given by ratio= warms up alike (``stats()["server_ratio"]``).
        clip: local gradient clipping (Deep Gradient Compression): before momentum and error feedback, each
            worker scales each gradient tensor down to norm clip / sqrt(n) if it is longer (n ranks); 0: none.
        nonfinite: what a step does when some rank's gradient holds NaN or Inf. "skip" (as stock Horovod,
            whose averaged gradient is then non-finite too): every rank returns NaN gradients (for a tensor
            that travels dense: Horovod's non-finite average of it), so that ``torch.amp.GradScaler`` and
            users see the overflow, no error buffer changes, and the step is counted in
            ``stats()["skipped_steps"]``; the next step is normal. "raise": every rank raises
            FloatingPointError naming the parameters (the buffers are kept likewise).

    Gradients are averaged (use Horovod's default ``op=hvd.Average``). Half-precision gradients are
    compressed in float32, with float32 error buffers, and returned in their own dtype.

    An error raised inside a step (a misconfiguration found at the first step, ``nonfinite="raise"``) leaves
    this object and Horovod's optimizer ready for the next step: what is in flight is waited for, the step
    is dropped (no buffer changes), and the optimizer is reset as its ``load_state_dict()`` does.
    """

    ops, checkpoint, noun = ops, checkpoint, "parameter"   # the shared transports' kernels and collectives, in PyTorch

    def __init__(self, compressor, error_feedback=False, server=None, named_parameters=None, root_rank=0, seed=0,
                 transport=None, link_gbps=None, dense_below=1024, bucket_mb=64, nonfinite="skip", process_set=None,
                 momentum=0.0, warmup=0, clip=0.0, momentum_masking=True, nesterov=False):
        self.config, self._link = options.config_of(compressor, error_feedback, server, transport, link_gbps,
                                                    momentum, warmup, clip, momentum_masking, nesterov)
        self.dense_below, self.nonfinite = options.check(dense_below, nonfinite)
        if isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float)) or not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be a number > 0, got {bucket_mb!r}")
        self.bucket_bytes = int(bucket_mb * 2 ** 20)
        self._params = horovod.parameters_of(named_parameters)   # name -> parameter
        self._name_of = horovod.GradientNames(self._params)
        self.root_rank, self.seed = int(root_rank), int(seed)
        self.process_set = process_set          # None until the first step finds the optimizer's
        self._optimizer = None                  # Horovod's optimizer, found at the first compress()
        self.tag = next(_instances)
        self._transports = {}                             # name -> the transport its tensor uses
        self._bucket_of = None                            # name -> its Bucket (compressed tensors)
        self._buckets = []
        self._kernel_table = None                         # "auto": measured kernel seconds per element
        self._worker_error, self._server_error = {}, {}   # name -> flat tensor (the committed buffers)
        self._velocity = {}                               # name -> u (momentum correction), committed
        self._spare = {}                                  # (kind, name) -> the other half of a double buffer
        self._payloads = {}                               # name or slice name -> its payload bytes' buffer
        self._pending = {}                                # name -> Pending, for the step in flight
        self._step = 0
        self._in_force_at = (None, None, None)            # (step, the worker and server compressors in force)
        self._checked = False
        self._stats = Stats()
        self._skipping = False                            # this step had a non-finite gradient somewhere
        self._to_commit = []                              # this step's tensors whose buffers commit at its end
        self._dense_not_finite = []                       # dense tensors whose average is not finite

    # ---- Horovod's Compressor interface -----------------------------------------------------------------

    def compress(self, tensor):
        optimizer = self._optimizer() if self._optimizer else horovod.optimizer_calling()
        try:
            if self._optimizer is None:
                self._bind(optimizer)
            return self._compress(tensor)
        except Exception:
            self._recover(optimizer)
            raise

    def decompress(self, output, name):
        try:
            return self._decompress(output, name)
        except Exception:
            self._recover(self._optimizer and self._optimizer())
            raise

    def _compress(self, tensor):
        name = self._name_of(tensor)
        if not self._checked:
            self._check_same_config_everywhere()
        if name in self._pending:
            raise RuntimeError(f"compress() was called twice for parameter {name!r} in one step")
        how = self._transport_of(name)
        if how == "dense":   # Horovod averages the gradient (with momentum correction: u) itself
            p = self._pending[name] = Pending(name, how, tensor.shape, tensor.dtype,
                                              tensor.numel() * tensor.element_size())
            if self.config.clip or self.config.momentum:   # in the compute dtype, as compressed tensors
                flat = tensor.detach().reshape(-1)
                u = flat.to(K.compute_dtype(flat.dtype))
                p.velocity = self._precondition(name, u)
                if u is not flat:
                    flat.copy_(u)
            handed = ops.for_horovod(tensor)
            if handed is not tensor:   # staged: Horovod's average comes back into the gradient's memory
                p.work = tensor.detach()
            return handed, name
        try:
            dtype = K.compute_dtype(tensor.dtype)
        except TypeError as err:
            raise TypeError(f"parameter {name!r}: {err}") from None
        flat = tensor.detach().reshape(-1)
        # the update is written into the gradient's memory once the step no longer needs it (Horovod sets
        # .grad to what decompress() returns); a gradient of another dtype gets a buffer of the compute dtype
        work = flat if flat.dtype == dtype and flat.is_contiguous() else flat.to(dtype)
        p = Pending(name, how, tensor.shape, tensor.dtype, 0, work=work)
        p.velocity = self._precondition(name, work)   # with momentum, work now holds u (Nesterov: g + m u)
        bucket = self._bucket_of.get(name) or self._new_bucket(name, how)
        e_in = self._worker_error.get(name) if self.config.error_feedback else None
        e_out = (self._spare_buffer("worker", name, bucket.transport.error_part(self, work))
                 if self.config.error_feedback else None)
        self._encode(bucket, p, e_in, e_out)
        if self.config.momentum and self.config.momentum_masking:   # factor masking: the sent coordinates leave u
            x = work if e_in is None else work + K.settle(e_in)
            p.velocity.masked_fill_(K.settle(e_out) != x, 0)
        marker = torch.full((1,), float(self._step + 1), dtype=torch.float32,
                            device="cpu" if ops.staged(work) else work.device)
        p.bytes_sent += marker.element_size()
        self._pending[name] = p
        bucket.add(self, p)
        return marker, name

    def _decompress(self, output, name):
        if name is None:   # a sparse gradient: Horovod allgathered it itself, without compress()
            return output
        pending = self._pending.get(name)
        if pending is None:
            raise RuntimeError(f"decompress() for parameter {name!r} that was not compressed in this step")
        if pending.transport == "dense":
            pending.update = output if pending.work is None else pending.work.copy_(output.view_as(pending.work))
        elif pending.update is None:   # the first decompress() of a compressed tensor in this step
            value = output.item()
            if not math.isclose(value, self._step + 1, rel_tol=1e-3):
                raise RuntimeError(f"parameter {name!r}: Horovod's reduction of the step marker gave {value}, "
                                   f"expected {self._step + 1}: use op=hvd.Average, and make every rank run the "
                                   f"same steps")
            self._finish_step()
        self._commit(self._pending.pop(name))
        result = pending.update.view(pending.shape)
        if result.dtype != pending.grad_dtype:
            result = result.to(pending.grad_dtype)
        if not self._pending:
            self._end_step()
        return result

    # ---- the ranks: the optimizer's process set ---------------------------------------------------------------

    def _bind(self, optimizer):
        """At the first step: take the process set of Horovod's optimizer (found among compress()'s callers:
        Horovod passes compress() no reference to it), and keep the optimizer to reset it after an error.
        Bound only once every check passed, so that a refused set-up is refused again at the next step."""
        theirs = getattr(optimizer, "process_set", None)
        ranks = self.process_set if self.process_set is not None else theirs or hvd.global_process_set
        if theirs is not None and sorted(theirs.ranks) != sorted(ranks.ranks):
            raise ValueError(f"Compression(process_set=) has ranks {sorted(ranks.ranks)} but the optimizer's "
                             f"process set has ranks {sorted(theirs.ranks)}: give both the same")
        if optimizer is not None:
            check_momentum_of(self.config, optimizer.param_groups)
        self._check_root(ranks.size())
        self.process_set = ranks
        self._optimizer = weakref.ref(optimizer) if optimizer is not None else (lambda: None)

    # ---- the step -------------------------------------------------------------------------------------------

    def _in_force(self):
        if self._in_force_at[0] != self._step:
            self._in_force_at = (self._step, self.config.worker_at(self._step), self.config.server_at(self._step))
        return self._in_force_at[1:]

    def _seed_step(self):
        return self._step

    def _precondition(self, name, work):
        """Deep Gradient Compression's local clipping, then its momentum correction, in ``work`` (g's memory):
        the new velocity, or None without momentum."""
        if self.config.clip:
            K.clip_norm_(work, self.config.clip_threshold(self.size()))
        if not self.config.momentum:
            return None
        velocity = self._spare_buffer("velocity", name, work)   # the new velocity goes into its spare half
        return K.momentum_step(self.config, work, self._velocity.get(name), velocity)

    def _payload_buffer(self, key, size, device):
        """The buffer a piece's payload bytes are written into, kept from step to step (they are copied into
        the bucket's send buffer before the next step writes them again)."""
        return ops.reused(self._payloads, key, (size,), torch.uint8, device)

    def _spare_buffer(self, kind, name, like):
        """The free half of a parameter's double buffer: written by this step, committed only if the step
        completes everywhere (else the committed half stays as it was)."""
        return ops.reused(self._spare, (kind, name), like.shape, like.dtype, like.device)

    def _finish_step(self):
        """Send the buckets still waiting (a tensor without gradient in this step) and receive all of them;
        stop there if some rank's gradient was not finite (every rank sees every rank's flags, so all stop
        alike and nothing is committed); else aggregate and run the server pass bucket by bucket in a fixed
        order (every rank starts the second-stage collectives in the same order), and finish."""
        active = [b for b in self._buckets if b.members_in_step(self._pending)]
        for bucket in active:
            bucket.launch_if_waiting(self)
        bad = sorted(name for bucket in active
                     for name, count in zip([p.name for p in bucket.launched],
                                            bucket.transport.receive(self, bucket).tolist()) if count)
        if bad and self.nonfinite == "skip":   # as a dense allreduce would: every rank gets non-finite gradients
            self._skipping = True
            for p in self._pending.values():
                if p.transport != "dense":
                    p.update = p.work.fill_(math.nan)
                    p.worker_error = p.server_error = None   # nothing is committed
            return
        if bad:
            here = sorted(name for name, p in self._pending.items() if p.stats is not None and p.stats[2] == 0)
            raise FloatingPointError(
                f"gradient not finite (NaN or Inf) for parameter(s) {bad} on some rank (on this rank: "
                f"{here or 'none'}); hvd_compress dropped this step and left every error buffer unchanged")
        for bucket in active:
            bucket.transport.reduce_and_serve(self, bucket)
        for bucket in active:
            bucket.transport.finish(self, bucket)

    def _commit(self, p):
        """This tensor's statistics now; its buffers at the end of the step (``_end_step``), once every gradient
        of the step is known to be finite, the dense ones (averaged by Horovod itself) too."""
        dense = p.transport == "dense"
        self._stats.add(p, dense and p.shape.numel() < self.dense_below, self.config.error_feedback,
                        not (dense or self._skipping))
        if dense:
            if not bool(p.update.isfinite().all()):   # the average: alike on every rank
                self._dense_not_finite.append(p.name)
            if p.velocity is not None:
                self._to_commit.append(p)
            return
        if not self._skipping:
            self._to_commit.append(p)

    def _swap(self, kind, committed, name, new):
        """Commit the new half of a double buffer; the old half becomes the spare."""
        old = committed.get(name)
        committed[name] = new
        if old is None:
            del self._spare[(kind, name)]
        else:
            self._spare[(kind, name)] = old

    def _end_step(self):
        if self._dense_not_finite and not self._skipping:
            bad, self._dense_not_finite, self._to_commit = sorted(self._dense_not_finite), [], []
            if self.nonfinite == "raise":
                raise FloatingPointError(
                    f"gradient not finite (NaN or Inf) for parameter(s) {bad} (dense, averaged by Horovod) on some "
                    f"rank; hvd_compress dropped this step and left every error buffer unchanged")
            self._skipping = True
        if not self._skipping:
            for p in self._to_commit:
                for kind, committed, new in (("worker", self._worker_error, p.worker_error),
                                             ("server", self._server_error, p.server_error),
                                             ("velocity", self._velocity, p.velocity)):
                    if new is not None:
                        self._swap(kind, committed, p.name, new)
        self._to_commit, self._dense_not_finite = [], []
        for bucket in self._buckets:
            bucket.reset()
        self._stats.end(self._skipping)
        self._step += not self._skipping   # a skipped step comes again (the same seeds), on every rank alike
        self._skipping = False

    def _recover(self, optimizer):
        """After an error inside a step, on every rank alike: wait for this step's collectives still in
        flight (Horovod refuses a new one under a name in flight), drop the step (no buffer was committed),
        and reset Horovod's optimizer."""
        for bucket in self._buckets:
            bucket.wait_quietly(self.ops)
            bucket.reset()
        self._drop_step()
        if optimizer is not None:
            horovod.reset(optimizer)

    def _drop_step(self):
        """Forget the step in progress: nothing of it is committed."""
        self._pending.clear()
        self._skipping = False
        self._stats.drop()
        self._to_commit, self._dense_not_finite = [], []

    # ---- which transport, which bucket ------------------------------------------------------------------------

    def _transport_of(self, name):
        """The transport of every parameter is chosen at the first compress(), all at once (every rank
        alike: from sizes, the configuration and the slowest rank's measurements), and the buckets formed."""
        if self._bucket_of is None:
            self._plan()
        return self._transports[name]

    def _plan(self):
        sizes = {name: p.numel() for name, p in self._params.items()}
        todo = {name: d for name, d in sizes.items() if name not in self._transports}   # all, but after a resume
        self._transports.update(plan(self, sizes, todo))
        groups = {name: (p.numel(), (K.compute_dtype(p.dtype), p.device))
                  for name, p in self._params.items() if p.requires_grad}
        self._buckets = buckets_of(groups, self._transports, self.bucket_bytes, self.tag)
        self._bucket_of = {name: b for b in self._buckets for name in b.names}

    def _device(self):
        return next(iter(self._params.values())).device

    def server_error_of(self, name):
        """The committed server buffer d of a tensor (sharded: this rank's slice of it), None before any."""
        return self._server_error.get(name)

    def _new_bucket(self, name, how):
        """A bucket of its own for a parameter that had requires_grad=False when the buckets were formed."""
        bucket = Bucket(f"{self.tag}.{len(self._buckets)}", [name], how)
        self._buckets.append(bucket)
        self._bucket_of[name] = bucket
        return bucket

    # ---- what the configuration check compares ---------------------------------------------------------

    def _shapes(self):
        return sorted((n, p.shape) for n, p in self._params.items())

    def _options(self):
        return {"dense_below": self.dense_below, "bucket_bytes": self.bucket_bytes, "nonfinite": self.nonfinite}

    # ---- checkpointing and statistics --------------------------------------------------------------------

    def _refuse_during_a_step(self, what):
        if self._pending:
            raise RuntimeError(f"{what} during a step (between backward() and optimizer.step())")

    def save_per_rank(self, directory):
        """This rank's part of the state, written to ``directory/rank{r}.pt`` by every rank (no collective,
        no other rank's buffers in memory). See ``checkpoint.py`` for what is in it."""
        checkpoint.save(self, directory)

    def load_per_rank(self, directory):
        """Loads what ``save_per_rank`` wrote, also into another number of ranks (the rule: ``checkpoint.py``,
        README). Every rank calls it; each reads only the files it needs."""
        checkpoint.load(self, directory)

    def _figures(self):
        return self._stats.figures(self._step, [list(b.names) for b in self._buckets])
