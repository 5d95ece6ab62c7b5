"""Run under horovodrun with 2 ranks: bad set-ups of the TensorFlow plug-in end in a clear error on every
rank. Each rank prints "<scenario> CAUGHT <type>: <message>" (and for nan "nan BUFFER_UNCHANGED <bool>" and,
after two more steps, "nan TRAINED_ON <steps>").
Scenarios skip and skip-sharded (the default nonfinite="skip"): gradients made NaN on one rank at a few steps
are skipped on every rank, no buffer of those steps changes, and training goes on (skip-sharded: the sharded
transport, momentum correction, and the variables under 16 elements dense, one of them poisoned); rank 0 prints
"RESULT {scenario: report}".
usage: tf_bad_input.py SCENARIO... (mismatch, nan, skip, skip-sharded)"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from tf_common import LR, batch, loss_of, make_variables, names_of  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import horovod.tensorflow as hvd  # noqa: E402

import hvd_compress.tensorflow as htc  # noqa: E402


# step: (rank, variable index) whose gradient is NaN; the variable is first, in the middle, last of the step
POISON = {3: (1, 2), 6: (0, 0), 8: (1, 3)}
STEPS = 11


def settled(state):
    return {key: state[key] for key in ("worker_error", "server_error", "velocity", "steps")}


def same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return np.array_equal(a, b)


# skip-sharded with momentum correction: the velocities (of the dense variables too) stay as well
SKIPS = {"skip": {"dense_below": 0}, "skip-sharded": {"transport": "sharded", "dense_below": 16, "momentum": 0.9}}


def skip_nonfinite_steps(transport=None, dense_below=0, momentum=0.0):
    """The poisoned steps: every rank skips them alike, their buffers stay, and the run equals the simulation
    of the other steps (skipped steps do not consume seeds)."""
    from hvd_compress.simulate import Simulation
    spec = dict(compressor="randk:0.3", error_feedback=True, server="topk:0.5", transport=transport,
                momentum=momentum)
    variables = make_variables()
    compression = htc.Compression(variables=variables, dense_below=dense_below, **spec)
    poison_at = tf.Variable(-1, dtype=tf.int64)   # index of the variable to poison on this rank, -1 none

    @tf.function(autograph=False)
    def train_step(x, y, use_extra):
        with tf.GradientTape() as tape:
            loss = loss_of(variables, x, y, use_extra)
            for i, v in enumerate(variables[:None if use_extra else -1]):   # 0 * v (or NaN * v) adds 0 (NaN)
                loss += tf.where(tf.equal(poison_at, i), tf.constant(np.nan, v.dtype), 0) * tf.reshape(v, [-1])[0]
        grads = hvd.DistributedGradientTape(tape, compression=compression).gradient(loss, variables)
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads if g is not None])
        for v, g in zip(variables, grads):   # as a loss-scaling optimizer: apply a step only if all is finite
            if g is not None:
                v.assign_sub(tf.where(finite, LR * g, tf.zeros_like(g)))
        return finite

    report = {"nan_seen": [], "unchanged": []}
    for step in range(STEPS):
        rank, index = POISON.get(step, (None, None))
        poison_at.assign(index if rank == hvd.rank() else -1)
        before = settled(compression.state_dict()) if rank is not None else None
        finite = bool(train_step(*batch(step, hvd.rank()), step % 2 == 0))
        if rank is not None:
            report["nan_seen"].append(not finite)
            report["unchanged"].append(same(before, settled(compression.state_dict())))
    stats = compression.stats()
    report["skipped_steps"] = stats["skipped_steps"]
    everyone = hvd.allgather_object([v.numpy() for v in variables])
    report["identical"] = all(same(everyone[0], other) for other in everyone[1:])

    sim = Simulation(n=hvd.size(), dense_below=dense_below, **spec)
    reference, names = make_variables(), names_of(variables)
    for step in (s for s in range(STEPS) if s not in POISON):
        grads = []
        for r in range(hvd.size()):
            with tf.GradientTape() as tape:
                loss = loss_of(reference, *batch(step, r), step % 2 == 0)
            grads.append({n: g for n, g in zip(names, tape.gradient(loss, reference)) if g is not None})
        for name, update in sim.step(grads).items():
            reference[names.index(name)].assign_sub(LR * update)
    report["equals_simulation"] = bool(max(np.abs(v.numpy() - r.numpy()).max()
                                           for v, r in zip(variables, reference)) <= 1e-9)
    return report


def refused(scenario):
    variables = make_variables()
    try:
        spec = "topk:0.3" if scenario != "mismatch" or hvd.rank() == 0 else "natural"
        compression = htc.Compression(spec, error_feedback=True, server="topk:0.5", variables=variables,
                                      nonfinite="raise", dense_below=0)

        @tf.function
        def train_step(x, y, poison):
            with tf.GradientTape() as tape:
                loss = loss_of(variables, x, y, True) + poison * variables[2][0, 0]
            tape = hvd.DistributedGradientTape(tape, compression=compression)
            for v, g in zip(variables, tape.gradient(loss, variables)):
                v.assign_sub(LR * g)

        for step in range(5):
            if step == 3:
                before = settled(compression.state_dict())
            poison = float("nan") if (step == 3 and hvd.rank() == 1) else 0.0
            train_step(*batch(step, hvd.rank()), tf.constant(poison, tf.float64))
    except Exception as err:   # noqa: BLE001 - the test reads what each rank caught
        message = str(err)   # TF puts the graph's traceback first; our words start at "hvd_compress"
        message = message[max(0, message.find("hvd_compress")):][:1000].replace("\n", " | ")
        print(f"{scenario} CAUGHT {type(err).__name__}: {message}", flush=True)
        if scenario == "nan":   # the whole step was dropped, and training goes on
            print(f"{scenario} BUFFER_UNCHANGED {same(before, settled(compression.state_dict()))}", flush=True)
            for step in range(4, 6):
                train_step(*batch(step, hvd.rank()), tf.constant(0.0, tf.float64))
            print(f"{scenario} TRAINED_ON {compression.stats()['steps']}", flush=True)
        return
    print(f"{scenario} NO ERROR", flush=True)


def main(scenarios):
    hvd.init()
    reports = {}
    for scenario in scenarios:   # one TensorFlow start-up for all
        if scenario in SKIPS:
            reports[scenario] = skip_nonfinite_steps(**SKIPS[scenario])
        else:
            refused(scenario)
    if hvd.rank() == 0:
        print("RESULT " + json.dumps(reports), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
