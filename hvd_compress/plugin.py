"""What both plug-ins' ``Compression`` share, framework aside: the ranks (those of the process set), the seed
of each compressor call, the configuration check before the first payload travels, and how a saved state's
buffers are gathered from the ranks and handed back to them, and ``stats()``. Each plug-in sets ``ops`` (its
kernels and collectives: ``torch/ops.py``, ``tensorflow/ops.py``), ``checkpoint`` (its ``state_dict()``),
``noun`` (what its errors call a tensor), ``_in_force()`` (this step's compressors), ``_seed_step()`` and
``_figures()``."""
import math

import numpy as np

from . import agreement
from . import compressors as C
from . import transport as T
from .seeds import server_seed, worker_seed


class CompressionBase:
    ops = None
    checkpoint = None
    noun = "tensor"
    process_set = None
    nodes = None   # transport "hierarchical": where this rank sits among the nodes (``bucket.Nodes``)

    # ---- the ranks: those of the process set ---------------------------------------------------------------

    def _ranks(self):
        """The process set every collective of this object runs on (all ranks until the first step binds one)."""
        return self.process_set if self.process_set is not None else self.ops.global_process_set()

    def size(self):
        """The number of ranks that average the gradients (those of the process set)."""
        return self._ranks().size()

    def rank(self):
        """This rank's place in the process set."""
        return self._ranks().rank()

    def root(self):
        """The server pass's rank as Horovod's broadcast names it (a global rank)."""
        ranks = self._ranks()
        # the global set's rank list is not always filled in (Horovod fills it at init), and needs no mapping
        return self.root_rank if ranks.process_set_id == 0 else ranks.ranks[self.root_rank]

    def _check_root(self, n):
        """The server pass's rank is one of the n ranks of the process set."""
        if not 0 <= self.root_rank < n:
            raise ValueError(f"root_rank={self.root_rank} is not a rank of the process set (ranks 0..{n - 1}, "
                             f"counted within it)")

    def worker(self):
        """The worker compressor of this step (during a warm-up, the sparsifier at this step's ratio)."""
        return self._in_force()[0]

    def server(self):
        """The server compressor of this step (the warm-up holds for it too: ``Config.server_at``)."""
        return self._in_force()[1]

    def seed_of(self, key, server=False):
        """The seed of a compressor call on ``key`` (a parameter or a slice) in this step."""
        if server:
            return server_seed(self.config.server, self.seed, self._seed_step(), key)
        return worker_seed(self.config.worker, self.seed, self._seed_step(), self.rank(), key)

    def _encode(self, bucket, p, e_in, e_out):
        """The transport's first stage for one tensor; a compressor's refusal names the tensor (and the
        transport, where it compresses slices of it)."""
        try:
            bucket.transport.encode(self, p, e_in, e_out)
        except ValueError as err:
            slices = {"sharded": self.size(), "hierarchical": self.nodes and self.nodes.local_size}.get(p.transport)
            where = f" (one of its {slices} slices, transport {p.transport!r})" if slices else ""
            raise ValueError(f"{self.noun} {p.name!r}{where}: {err}") from None

    # ---- agreeing on the configuration -------------------------------------------------------------------------

    def fingerprint(self):
        return agreement.fingerprint(self.config, self.root_rank, self.seed, self._shapes()) + \
            "".join(f" {key}={value}" for key, value in self._options().items())

    def _check_same_config_everywhere(self):
        """Every rank must start the same collectives; a rank configured differently would hang the others,
        so compare before the first payload travels (fixed-size collectives: safe whatever the config)."""
        mine = self.fingerprint()
        if self.size() > 1:
            digests = self.ops.allgather_now(np.array([agreement.digest(mine)], np.int64),
                                             f"hc.config_check.{self.tag}", self._ranks())
            if (digests != agreement.digest(mine)).any():
                raise agreement.mismatch_error(self._allgather_object(mine, f"hc.config_check_text.{self.tag}"))
        self._checked = True

    def _allgather_object(self, obj, name, process_set=None):
        """Every rank's ``obj`` in rank order (see ``agreement.allgather_object``)."""
        ranks = process_set or self._ranks()
        return agreement.allgather_object(
            obj, lambda array, part: self.ops.allgather_now(array, f"{name}.{part}", ranks))

    # ---- saved state: every rank's buffers in one dict, and back ----------------------------------------------

    def state_dict(self):
        """Every rank's worker error buffers and velocities, the server buffers (the root's; sharded: every
        rank's slice), the step, the transports and the link (PyTorch: tensors on CPU; TensorFlow: numpy arrays).
        A collective when there are several ranks: call it on every rank (eagerly), then save it on one."""
        return self.checkpoint.state_dict(self)

    def load_state_dict(self, state):
        """Restores what ``state_dict()`` saved; every rank loads the same dict and takes its own part."""
        self.checkpoint.load_state_dict(self, state)

    def _gather_state(self, mine):
        """``mine`` = (worker buffers, server buffers, ...) of this rank, each {name: array}: every rank's, and
        the whole server buffers (the root's; sharded: every rank's slice, joined; hierarchical: the slices of
        the ranks that run its server passes)."""
        everyone = self._allgather_object(mine, f"hc.state_dict.{self.tag}") if self.size() > 1 else [mine]
        server = dict(everyone[self.root_rank][1])
        for name, how in self._transports.items():
            holders = {"sharded": range(self.size()), "hierarchical": self.nodes and self.nodes.servers}.get(how)
            pieces = [everyone[r][1][name] for r in holders or () if name in everyone[r][1]]
            if pieces:
                server[name] = self.ops.concat_state(pieces)
        return everyone, server

    def _slice_of(self, how, d):
        """The slice of a tensor of d elements that is this rank's under transport ``how``: of the ranks
        ("sharded"), of its node's ranks ("hierarchical"), or all of it."""
        if how == "sharded":
            b, j = T.bounds(d, self.size()), self.rank()
        elif how == "hierarchical":
            b, j = T.bounds(d, self.nodes.local_size), self.nodes.local_rank
        else:
            return slice(None)
        return slice(b[j], b[j + 1])

    def _server_part(self, name, whole):
        """This rank's part of a saved server buffer: the root's whole one, a slice of it (sharded, and
        hierarchical on the ranks that run its server passes), or None."""
        how = self._transports.get(name)
        holds = {"sharded": True, "hierarchical": self.nodes and self.rank() in self.nodes.servers}
        return whole[self._slice_of(how, len(whole))] if holds.get(how, self.rank() == self.root_rank) else None

    def _saved_link(self):
        return self._link and (self._link.bandwidth, self._link.latency)

    def _load_plan(self, state):
        """The transports and link of a saved state ("auto" continues with the saved choices)."""
        self._transports = dict(state.get("transports", {}))
        self._link = T.Link(*state["link"]) if state.get("link") else self._link
        if "hierarchical" in self._transports.values() and self.nodes is None:
            from .bucket import nodes_of   # a collective: load_state_dict() runs on every rank
            self.nodes = nodes_of(self)

    # ---- statistics -----------------------------------------------------------------------------------------

    def stats(self):
        """About the last step (all zero before one; ``steps`` counts completed steps, ``skipped_steps`` those
        dropped for a non-finite gradient, ``last_step_skipped`` whether the last one was): bytes this rank
        handed to collectives, the dense fp32 equivalent, their ratio, the compressor's relative error
        ||C(x)-x||^2/||x||^2 over all compressed gradients, error-buffer norms, ``dense_small_bytes`` (the bytes
        of the tensors left dense for being under ``dense_below`` elements); cumulative byte totals since
        construction; ``transports`` (the transport of each tensor), ``buckets`` (the tensor names of each bucket
        of compressed tensors), ``link_gbps`` (the link "auto" chose by), ``worker_ratio`` and ``server_ratio``
        (the sparsifiers' ratios in the last step, which a warm-up changes; None for other compressors, and for
        no server)."""
        figures = self._figures()   # the plug-in's: counts, the last step's bytes and sums of squares, totals
        residual, norm, worker_sq, server_sq = (figures.pop(key) for key in
                                                ("residual", "norm", "worker_error", "server_error"))
        last = max(figures["steps"] - 1, 0)
        return {**figures, "ratio": figures["bytes_sent"] / figures["dense_bytes"] if figures["dense_bytes"] else 0.0,
                "variance": residual / norm if norm else 0.0,
                "worker_error_norm": math.sqrt(worker_sq), "server_error_norm": math.sqrt(server_sq),
                "transports": dict(self._transports), "link_gbps": self._link and self._link.bandwidth * 8 / 1e9,
                "worker_ratio": C.ratio_of(self.config.worker_at(last)),
                "server_ratio": self.config.server and C.ratio_of(self.config.server_at(last))}

    def __repr__(self):
        return f"Compression({self.config.fingerprint()})"
