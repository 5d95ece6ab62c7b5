"""This rank's node, Horovod's process sets of the nodes and a barrier at exit: what the hierarchical transport
(``bucket.nodes_of``) asks of Horovod, the same in both frameworks (Horovod keeps its process sets in
``horovod.common``, set up by whichever framework's ``horovod`` module this process imported)."""
import atexit
import os
import sys

from horovod.common import process_sets as _sets


def place():
    """(this rank's node, its local rank, whether Horovod runs with dynamic process sets), as Horovod knows
    them."""
    return (_sets._basics.cross_rank(), _sets._basics.local_rank(),
            os.environ.get("HOROVOD_DYNAMIC_PROCESS_SETS") == "1")


def process_sets(rank_lists, dynamic):
    """Horovod's process sets of these ranks: the global one, one registered already (``hvd.init(process_sets=
    [...])``), or a new one, added on every rank in this order; ``dynamic``: whether every rank runs with
    dynamic process sets (known alike on every rank, so that all refuse alike)."""
    known = {tuple(sorted(ranks)): id for id, ranks in _sets._basics._get_process_set_ids_and_ranks().items()}
    missing = [ranks for ranks in rank_lists if tuple(sorted(ranks)) not in known]
    if missing and not dynamic:
        raise ValueError(f"transport 'hierarchical' needs process sets of ranks {missing}: start Horovod with "
                         f"hvd.init(process_sets='dynamic') on every rank (or HOROVOD_DYNAMIC_PROCESS_SETS=1), or "
                         f"register them at hvd.init(process_sets=[...])")
    made = {}
    for ranks in rank_lists:
        key = tuple(sorted(ranks))
        if key not in made:
            if key in known:
                made[key] = _sets.global_process_set if known[key] == 0 else _sets.ProcessSet(list(key))
                made[key].process_set_id = known[key]
            else:
                made[key] = _sets.add_process_set(list(key))
    return [made[tuple(sorted(ranks))] for ranks in rank_lists]


def barrier_at_exit(barrier):
    """At the interpreter's exit (before Horovod's own shutdown, registered earlier), wait for every rank with
    ``barrier()``, unless an uncaught exception ends this one. Needed once some collectives run on a node's
    ranks only: the ranks of a node that finishes its last step first would otherwise shut Horovod down under
    the others, still in that step's last node-local collective."""
    if getattr(barrier_at_exit, "registered", False):
        return
    barrier_at_exit.registered = True
    failed, previous = [], sys.excepthook

    def hook(*args):
        failed.append(True)
        previous(*args)

    def at_exit():
        if not failed and _sets._basics.is_initialized():
            barrier()

    sys.excepthook = hook
    atexit.register(at_exit)
