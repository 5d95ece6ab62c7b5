"""Elastic Horovod: ``hvd.elastic.run`` with ``Compression`` objects in the state.

    state = hc.elastic.TorchState(model=model, optimizer=optimizer, compression=compression, epoch=0)

``TorchState`` is ``hvd.elastic.TorchState`` that also carries every ``Compression`` given as a keyword. What
happens to a Compression:

- ``state.commit()`` copies this rank's part (worker buffers e and u, its server buffer d or slice of d, the
  step, the transports) on its device; after a failed step (``HorovodInternalError``) ``restore()`` puts it
  back, as Horovod does with the model.
- after every reset (a worker added, removed or failed), on the new world, before the model is synced:
  everything bound to the old world is dropped (process set binding, buckets, spare and payload buffers,
  the configuration check, anything in flight) and the buffers follow this rule:

  * worker buffers (e, u): a rank that holds rank 0's committed state (the same world and step) keeps its
    own, unchanged: its unsent gradient is sent later and averaged over the new world like its fresh
    gradients. A new rank (or one whose state is not rank 0's) starts at zero. The buffers of departed ranks
    are dropped: their process is gone, and gathering every rank's buffers at each commit would cost O(n x
    model) per rank.
  * server buffer d: the root's whole d goes to the new root (the rank ``root_rank`` of the new world); under
    transport "sharded" the slices are cut again for the new number of ranks. Pieces held by departed ranks
    are lost (zero; the whole d, if the root left). Pieces are copied, never summed: what survives is
    bit-exact.
  * the step (``stats()["steps"]``), the transports ("auto" keeps its choices) and the measured link are
    rank 0's.

Horovod skips ``sync()`` after a removal (the survivors agree on the model), but a Compression still has to
be rebound and its slices re-cut, so this is done in ``reset()`` (Horovod's hook after every reset, before
sync and the reset callbacks); a rank that joins does it in ``sync()``, in the same order relative to the
model's broadcast. ``hvd.elastic.TorchState`` cannot do this: given a Compression, it raises.
"""
import secrets

import torch
import horovod.torch as hvd
from horovod.common.exceptions import HorovodInternalError
from horovod.torch.elastic import state as _horovod_state

from .. import transport as T
from . import checkpoint, horovod
from .compression import Compression

_constructing = 0   # > 0 while TorchState builds its handlers (a plain hvd.elastic.TorchState is refused)


class TorchState(hvd.elastic.TorchState):
    """``hvd.elastic.TorchState`` with ``Compression`` objects among its keyword arguments (see the module)."""

    def __init__(self, model=None, optimizer=None, **kwargs):
        global _constructing
        _constructing += 1
        try:
            super().__init__(model, optimizer, **kwargs)
        finally:
            _constructing -= 1

    def _compressions(self):
        return [h for h in self._handlers.values() if isinstance(h, CompressionStateHandler)]

    def reset(self):
        super().reset()
        for handler in self._compressions():
            handler.resync_after_reset()

    def sync(self):
        # Compressions first: a joining rank (sync only) and the survivors (reset, then sync) then run the
        # same collectives in the same order
        for handler in self._compressions():
            handler.resync_unless_done()
        super().sync()


class CompressionStateHandler(_horovod_state.StateHandler):
    """Save, restore and re-sync one Compression (registered with Horovod's handler registry)."""

    def __init__(self, compression):
        if not _constructing:
            raise TypeError("hvd.elastic.TorchState cannot carry a Compression across a resize (Horovod skips "
                            "sync() after a removal, and the Compression must still be re-sharded): use "
                            "hvd_compress.torch.elastic.TorchState(model=..., optimizer=..., compression=...)")
        super().__init__(compression)
        self._start(compression)

    def _start(self, comp):
        ps = comp.process_set
        if ps is not None and ps.process_set_id != 0:
            raise ValueError("elastic Horovod: the Compression must run on the global process set")
        # the world the live buffers are laid out for: (rank 0's token of that world, size, rank)
        self._world = (None, comp.size(), comp.rank()) if hvd.is_initialized() else (None, None, None)
        self._done = False   # already re-synced since the last reset
        self.save()

    def set_value(self, value):
        self.value = value
        self._start(value)

    def save(self):
        comp = self.value
        checkpoint.settle(comp)
        self._saved = (_clone(comp._worker_error), _clone(comp._velocity), _clone(comp._server_error), comp._step,
                       dict(comp._transports), comp._link, comp._kernel_table, self._world)
        self._done = False

    def restore(self):
        comp = self.value
        _forget_world(comp)
        worker, velocity, server, step, transports, link, table, world = self._saved
        comp._worker_error, comp._velocity, comp._server_error = _clone(worker), _clone(velocity), _clone(server)
        comp._step, comp._transports, comp._link, comp._kernel_table = step, dict(transports), link, table
        self._world, self._done = world, False

    def sync(self):
        pass   # TorchState.sync() calls resync_unless_done() before the other handlers

    def resync_after_reset(self):
        try:
            self._resync()
        except HorovodInternalError:
            # the new world broke already: its next collective fails too, and Horovod resets again
            self._done = False

    def resync_unless_done(self):
        if not self._done:
            self._resync()
        self._done = False

    def _resync(self):
        """On the new world (a collective of every rank): apply the rule of the module's docstring."""
        comp = self.value
        _forget_world(comp)
        checkpoint.settle(comp)
        token, old_size, old_rank = self._world
        mine = {"world": (token, old_size), "step": comp._step, "rank": old_rank,
                "server": {n: (t.numel(), t.dtype) for n, t in comp._server_error.items()}}
        name = f"hc.elastic.{comp.tag}"
        everyone = comp._allgather_object(mine, name, hvd.global_process_set)
        token, transports, link, table = hvd.broadcast_object(
            (secrets.token_hex(8), comp._transports, comp._link, comp._kernel_table), root_rank=0,
            name=f"{name}.rank0")
        ref = everyone[0]
        holders = {i: e for i, e in enumerate(everyone) if (e["world"], e["step"]) == (ref["world"], ref["step"])}
        n, rank = hvd.size(), hvd.rank()
        old_n = ref["world"][1] or n
        if len({e["rank"] for e in holders.values()}) != len(holders):
            raise RuntimeError(f"elastic: two ranks hold the same rank's state: {everyone}")

        server = {}
        for key in sorted({k for e in holders.values() for k in e["server"]}):
            size, dtype = next(e["server"][key] for e in holders.values() if key in e["server"])
            d, sharded = comp._params[key].numel(), transports.get(key) == "sharded"
            piece = comp._server_error.get(key) if rank in holders else None
            if not sharded and self._world[2] != comp.root_rank:
                piece = None   # only the old root's d counts
            if piece is None:
                piece = torch.empty(0, dtype=dtype, device=comp._params[key].device)
            gathered = hvd.allgather(piece, name=f"{name}.d.{key}")
            full, offset = torch.zeros(d, dtype=dtype, device=piece.device), 0
            for i, e in enumerate(everyone):
                k = 0
                if i in holders and key in e["server"] and (sharded or e["rank"] == comp.root_rank):
                    k = e["server"][key][0]
                    start = T.bounds(d, old_n)[e["rank"]] if sharded else 0
                    full[start:start + k] = gathered[offset:offset + k]
                offset += k
            if sharded:
                b = T.bounds(d, n)
                server[key] = full[b[rank]:b[rank + 1]].clone()
            elif rank == comp.root_rank:
                server[key] = full

        if rank not in holders:   # a new rank, or one whose committed state is not rank 0's
            comp._worker_error, comp._velocity = {}, {}
        comp._server_error = server
        comp._step, comp._transports, comp._link, comp._kernel_table = ref["step"], dict(transports), link, table
        self._world, self._done = (token, n, rank), True


def _forget_world(comp):
    """Drop what is bound to the ranks of the job (the buffers aside): the next step binds to the optimizer's
    process set again, forms buckets for the new size, checks the configuration on every rank and allocates
    its buffers."""
    comp._drop_step()
    comp._buckets, comp._bucket_of, comp.nodes = [], None, None
    comp._spare.clear()
    comp._payloads.clear()
    comp._optimizer = None
    comp._checked = False
    comp._name_of = horovod.GradientNames(comp._params)


def _clone(buffers):
    return {name: t.detach().clone() for name, t in buffers.items()}


if not any(cls is Compression for cls, _ in _horovod_state.get_handler_registry()):
    _horovod_state.set_handler_registry(_horovod_state.get_handler_registry()
                                        + [(Compression, CompressionStateHandler)])
