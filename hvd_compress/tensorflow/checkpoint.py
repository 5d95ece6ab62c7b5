"""``state_dict()`` of a TensorFlow ``Compression``: every rank's buffers gathered into one dict (a collective),
and back: every rank loads the same dict and takes its own part (the same number of ranks only)."""
import numpy as np
import tensorflow as tf

from .. import agreement


def state_dict(comp):
    comp.state.settle()
    server = {n: comp._server_part(n, d.numpy()) for n, d in zip(comp.names, comp.state.server_error)}
    mine = ({n: e.numpy()[comp._worker_slice(n)] for n, e in zip(comp.names, comp.state.worker_error)},
            {n: d for n, d in server.items() if d is not None},
            {n: u.numpy() for n, u in zip(comp.names, comp.state.velocity)})
    everyone, server_error = comp._gather_state(mine)
    return {"format": agreement.STATE_FORMAT, "fingerprint": comp.fingerprint(), "size": len(everyone),
            "steps": {n: int(s.numpy()) for n, s in zip(comp.names, comp.state.steps)},
            "worker_error": [w for w, _, _ in everyone], "server_error": server_error,
            "velocity": [u for _, _, u in everyone],
            "transports": dict(comp._transports), "link": comp._saved_link()}


def load_state_dict(comp, state):
    agreement.check_state(state, comp.fingerprint(), comp.size())
    comp._load_plan(state)
    comp._bound = False   # buckets formed again at the next step
    for name, e in zip(comp.names, comp.state.worker_error):   # hierarchical: this rank's slice, the rest zero
        value = np.zeros(e.shape, e.dtype.as_numpy_dtype)
        value[comp._worker_slice(name)] = state["worker_error"][comp.rank()][name]
        e.assign(value)
    for name, u in zip(comp.names, comp.state.velocity):
        u.assign(state["velocity"][comp.rank()][name])
    for name, d in zip(comp.names, comp.state.server_error):   # this rank's part, the rest zero
        whole = np.asarray(state["server_error"][name])
        value, part = np.zeros_like(whole), comp._server_part(name, whole)
        if part is not None:
            value[comp._server_slice(name)] = part
        d.assign(value)
    for name, s in zip(comp.names, comp.state.steps):
        s.assign(state["steps"][name])
    comp.state.committed_at.assign(tf.fill([len(comp.names)], tf.constant(-1, tf.int64)))
