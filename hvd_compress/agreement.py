"""What every rank must agree on, and what a saved state must match: shared by both plug-ins."""
import hashlib
import pickle

import numpy as np

STATE_FORMAT = 1


def fingerprint(config, root_rank, seed, shapes):
    """One line naming the configuration and (by hash) the parameters' names and shapes."""
    layout = ",".join(f"{name}:{tuple(shape)}" for name, shape in shapes)
    return (f"{config.fingerprint()} root_rank={root_rank} seed={seed} "
            f"parameters={hashlib.sha256(layout.encode()).hexdigest()[:12]}")


def digest(text):
    """A 56-bit integer of ``text``: small enough for any integer collective."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")


def mismatch_error(everyone):
    """The error every rank raises when the ranks' fingerprints differ."""
    lines = "\n".join(f"  rank {r}: {fp}" for r, fp in enumerate(everyone))
    return ValueError(f"hvd_compress is configured differently on different ranks:\n{lines}")


def check_state(state, mine, size):
    """Refuses a state dict saved by another configuration or another number of ranks."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"not an hvd_compress state dict (format {STATE_FORMAT} expected)")
    if state["fingerprint"] != mine:
        raise ValueError(f"the state was saved with a different configuration:\n  saved: {state['fingerprint']}"
                         f"\n  now:   {mine}")
    if state["size"] != size:
        raise ValueError(f"the state was saved with {state['size']} ranks and this job has {size}: "
                         f"worker error buffers belong to ranks")


def allgather_object(obj, allgather):
    """Every rank's ``obj`` (pickled) in rank order. ``allgather(array, part)`` is the framework's allgather
    of a numpy array on the right process set (``part``, "sizes" or "data", names the collective); Horovod
    0.28's allgather_object takes no process set."""
    data = np.frombuffer(bytearray(pickle.dumps(obj)), np.uint8)
    sizes = allgather(np.array([len(data)], np.int64), "sizes")
    gathered = allgather(data, "data")
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [pickle.loads(gathered[a:b].tobytes()) for a, b in zip(bounds[:-1], bounds[1:])]
