"""Checkpoints of a ``Compression``, in two forms.

``state_dict(comp)`` gathers every rank's buffers into one dict (a collective), which every rank then loads
with ``load_state_dict(comp, state)``, taking its own part: the same number of ranks only.

Per-rank checkpoints: each rank writes and reads only its own part (memory O(model) per rank, whatever the
number of ranks), loadable into another number of ranks.

``save(comp, directory)`` writes ``directory/rank{r}.pt`` on rank r: its worker buffers, its server
buffers (the root's whole d; under transport "sharded", every rank's slice), the step, the transports and the
configuration's fingerprint. ``load(comp, directory)`` reads what this rank needs. With the same number of
ranks that is its own file, and the run continues exactly. Saved by n ranks and loaded by m, the rule is:

- worker buffers (error feedback's e, momentum correction's u): new rank j takes
  ``m / n * sum(e_i for old ranks i with i % m == j)`` (zero when there is none). This keeps
  ``1/n * sum(e_i)``, the gradient every worker still owes to the average, unchanged: nothing compressed away
  before the resize is lost, nothing is counted twice. Rank j reads the files of those ranks only, one at a
  time.
- server buffers: the whole d stays on the root (which reads the old root's file); sharded slices are cut
  again for m ranks (rank j reads the old files whose slices overlap its new one).
- the step and the transports continue from the files ("auto" keeps its choices).
"""
from pathlib import Path

import torch

from .. import agreement
from .. import transport as T
from . import kernels as K

FORMAT = "hvd_compress per-rank 1"


def settle(comp):
    """Every committed error buffer holds its error (a sign or 1-bit step may leave its last correction to the
    next step: ``kernels.settle``)."""
    for buffers in (comp._worker_error, comp._server_error):
        for e in buffers.values():
            K.settle(e)


def state_dict(comp):
    comp._refuse_during_a_step("state_dict()")
    settle(comp)
    mine = ({n: t.detach().cpu().clone() for n, t in comp._worker_error.items()},
            {n: t.detach().cpu().clone() for n, t in comp._server_error.items()},
            {n: t.detach().cpu().clone() for n, t in comp._velocity.items()})
    everyone, server_error = comp._gather_state(mine)
    return {"format": agreement.STATE_FORMAT, "fingerprint": comp.fingerprint(), "step": comp._step,
            "size": len(everyone), "worker_error": [w for w, _, _ in everyone], "server_error": server_error,
            "velocity": [v for _, _, v in everyone],
            "transports": dict(comp._transports), "link": comp._saved_link()}


def load_state_dict(comp, state):
    comp._refuse_during_a_step("load_state_dict()")
    agreement.check_state(state, comp.fingerprint(), comp.size())
    rank = comp.rank()
    unknown = set(state["worker_error"][rank]) - set(comp._params)
    if unknown:
        raise ValueError(f"the state has error buffers for unknown parameters {sorted(unknown)}")
    comp._worker_error = {n: t.clone() for n, t in state["worker_error"][rank].items()}
    comp._velocity = {n: t.clone() for n, t in state.get("velocity", [{}] * comp.size())[rank].items()}
    comp._load_plan(state)
    comp._buckets, comp._bucket_of = [], None               # formed again at the next compress()
    parts = {name: comp._server_part(name, t) for name, t in state["server_error"].items()}
    comp._server_error = {name: t.clone() for name, t in parts.items() if t is not None}
    comp._step = int(state["step"])


def _file(directory, rank):
    return Path(directory) / f"rank{rank}.pt"


def save(comp, directory):
    comp._refuse_during_a_step("save_per_rank()")
    settle(comp)
    Path(directory).mkdir(parents=True, exist_ok=True)
    link = comp._saved_link()
    part = {"format": FORMAT, "fingerprint": comp.fingerprint(), "size": comp.size(), "rank": comp.rank(),
            "step": comp._step, "transports": dict(comp._transports), "link": link,
            "worker_error": {n: t.detach().cpu() for n, t in comp._worker_error.items()},
            "velocity": {n: t.detach().cpu() for n, t in comp._velocity.items()},
            "server_error": {n: t.detach().cpu() for n, t in comp._server_error.items()}}
    path = _file(directory, comp.rank())
    torch.save(part, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)   # a crash while writing never leaves a half file under the name


def _read(directory, rank, fingerprint):
    path = _file(directory, rank)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: a per-rank checkpoint needs every rank's file")
    part = torch.load(path)
    if not isinstance(part, dict) or part.get("format") != FORMAT:
        raise ValueError(f"{path} is not an hvd_compress per-rank checkpoint")
    if part["fingerprint"] != fingerprint:
        raise ValueError(f"{path} was saved with a different configuration:\n  saved: {part['fingerprint']}"
                         f"\n  now:   {fingerprint}")
    return part


def load(comp, directory):
    comp._refuse_during_a_step("load_per_rank()")
    mine, m, j = comp.fingerprint(), comp.size(), comp.rank()
    first = _read(directory, 0, mine)
    read = lambda i: first if i == 0 else _read(directory, i, mine)   # noqa: E731 - one file at a time
    n = first["size"]
    if not 0 <= comp.root_rank < n:
        raise ValueError(f"root_rank={comp.root_rank} had no file: the checkpoint was saved by {n} ranks")
    transports = first["transports"]
    unknown = set(transports) - set(comp._params)
    if unknown:
        raise ValueError(f"the checkpoint has parameters this model lacks: {sorted(unknown)}")

    worker = {"worker_error": {}, "velocity": {}}
    for i in range(j, n, m):   # the old ranks folded into new rank j
        part = read(i)
        for kind, folded in worker.items():
            for name, e in part.get(kind, {}).items():
                folded[name] = folded[name] + e if name in folded else e.clone()
    if m != n:
        worker = {kind: {name: e.mul_(m / n) for name, e in folded.items()} for kind, folded in worker.items()}

    server = {}
    sharded = [name for name, how in transports.items() if how == "sharded"]
    if sharded:
        for i in range(n):
            part = None
            for name in sharded:
                d = comp._params[name].numel()
                old, new = T.bounds(d, n), T.bounds(d, m)
                lo, hi = max(old[i], new[j]), min(old[i + 1], new[j + 1])
                if lo >= hi:
                    continue
                part = part or read(i)
                if name in part["server_error"]:
                    piece = part["server_error"][name][lo - old[i]:hi - old[i]]
                    server.setdefault(name, torch.zeros(new[j + 1] - new[j], dtype=piece.dtype))
                    server[name][lo - new[j]:hi - new[j]] = piece
    if j == comp.root_rank:
        root = read(comp.root_rank)
        server.update({name: t for name, t in root["server_error"].items() if transports.get(name) != "sharded"})

    device = {name: p.device for name, p in comp._params.items()}
    comp._worker_error = {name: e.to(device[name]) for name, e in worker["worker_error"].items()}
    comp._velocity = {name: u.to(device[name]) for name, u in worker["velocity"].items()}
    comp._server_error = {name: d.to(device[name]) for name, d in server.items()}
    comp._transports = dict(transports)
    comp._buckets, comp._bucket_of = [], None   # formed again at the next compress()
    comp._link = T.Link(*first["link"]) if first.get("link") else comp._link
    comp._step = int(first["step"])
