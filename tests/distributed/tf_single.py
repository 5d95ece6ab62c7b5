"""One process, no launcher: the TensorFlow plug-in's single-process behaviour and refusals.
Prints "RESULT <json>" with one entry per check (True or the text of what went wrong).
usage: tf_single.py SCRATCH_DIR"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from tf_common import LR, batch, loss_of, make_variables, names_of  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import horovod.tensorflow as hvd  # noqa: E402

import hvd_compress.tensorflow as htc  # noqa: E402
from hvd_compress.simulate import Simulation  # noqa: E402


def one_process_skips_compression():
    """hvd.size() == 1: Horovod's tape reduces nothing and never calls compress()."""
    variables, plain = make_variables(), make_variables()
    compression = htc.Compression("topk:0.1", error_feedback=True, variables=variables, dense_below=0)
    for step in range(3):
        x, y = batch(step, 0)
        with tf.GradientTape() as tape:
            loss = loss_of(variables, x, y, True)
        grads = hvd.DistributedGradientTape(tape, compression=compression).gradient(loss, variables)
        with tf.GradientTape() as tape:
            loss = loss_of(plain, x, y, True)
        for v, p, g, h in zip(variables, plain, grads, tape.gradient(loss, plain)):
            v.assign_sub(LR * g)
            p.assign_sub(LR * h)
    same = all(np.array_equal(v.numpy(), p.numpy()) for v, p in zip(variables, plain))
    return same and compression.stats()["steps"] == 0 and compression.stats()["total_bytes_sent"] == 0


def direct_step_equals_simulation(compression, sim, variables, step):
    """One step by direct compress() / decompress() calls: whether every update equals the simulation's."""
    x, y = batch(step, 0)
    with tf.GradientTape() as tape:
        loss = loss_of(variables, x, y, True)
    grads = tape.gradient(loss, variables)
    sent = [compression.compress(g) for g in grads]
    got = [compression.decompress(hvd.allreduce(m, op=hvd.Average), ctx) for m, ctx in sent]
    expected = sim.step([dict(zip(names_of(variables), grads))])
    return all(np.array_equal(g.numpy(), expected[n].numpy()) for g, n in zip(got, names_of(variables)))


def direct_calls_equal_simulation():
    variables = make_variables()
    compression = htc.Compression("randk:0.4", error_feedback=True, server="natural", variables=variables,
                                  dense_below=0)
    sim = Simulation("randk:0.4", error_feedback=True, server="natural", n=1)
    for step in range(3):
        if not direct_step_equals_simulation(compression, sim, variables, step):
            return f"step {step}: differs from the simulation"
    return compression.stats()["steps"] == 3


def warmup_payloads_shrink_step_by_step():
    """warmup=(4, 0.9): each step's update equals the simulation's, its bytes are those of the ratio in force
    (``Config.worker_at``: the payload of every variable, its finiteness flag and the 4-byte marker), and
    ``stats()`` reports that ratio."""
    variables = make_variables()
    compression = htc.Compression("topk:0.3", error_feedback=True, variables=variables, dense_below=0,
                                  warmup=(4, 0.9))
    sim = Simulation("topk:0.3", error_feedback=True, n=1, warmup=(4, 0.9))
    sizes = [int(np.prod(v.shape)) for v in variables]
    for step in range(6):
        if not direct_step_equals_simulation(compression, sim, variables, step):
            return f"step {step}: differs from the simulation"
        worker, stats = compression.config.worker_at(step), compression.stats()
        if stats["bytes_sent"] != sum(worker.wire_bytes(d, 8) + 1 + 4 for d in sizes):
            return f"step {step}: {stats['bytes_sent']} bytes sent, expected those of {worker!r}"
        if stats["worker_ratio"] != worker.ratio:
            return f"step {step}: worker_ratio {stats['worker_ratio']}, in force {worker.ratio}"
    return compression.stats()["worker_ratio"] == 0.3


def tf_checkpoint_round_trip(tmp):
    """Compression is a tf.Module: tf.train.Checkpoint saves and restores this rank's buffers and steps."""
    variables = make_variables()
    compression = htc.Compression("topk:0.3", error_feedback=True, server="topk:0.5", variables=variables,
                                  dense_below=0)
    for e in compression.state.worker_error + compression.state.server_error:
        e.assign(tf.random.stateless_normal(e.shape, [1, 2], dtype=e.dtype))
    compression.state.steps[0].assign(7)
    compression.state.skipped_count.assign(2)
    compression.state.committed_at.assign([3, htc.state.UNDONE, -1, 0])
    saved = [v.numpy() for v in compression.trainable_variables + compression.variables]
    path = tf.train.Checkpoint(compression=compression).save(os.path.join(tmp, "ckpt"))
    for v in compression.variables:
        v.assign(tf.zeros_like(v))
    tf.train.Checkpoint(compression=compression).restore(path).assert_consumed()
    restored = [v.numpy() for v in compression.trainable_variables + compression.variables]
    # worker and server buffers and their previous values, steps, last norms, bytes sent, and the skipping
    # book-keeping
    return len(saved) == 4 * 4 + 4 + 1 + 1 + 6 and all(np.array_equal(a, b) for a, b in zip(saved, restored))


def refuses(make, error, words):
    try:
        make()
    except error as err:
        return True if words in str(err) else f"message lacks {words!r}: {err}"
    except Exception as err:   # noqa: BLE001
        return f"{type(err).__name__} instead of {error.__name__}: {err}"
    return "no error"


def keras3_variables():
    import keras   # Keras 3: what tf.keras is without TF_USE_LEGACY_KERAS
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    return htc.Compression("topk:0.5", variables=model.trainable_variables, dense_below=0)


def main():
    hvd.init()
    checks = {
        "one_process_skips_compression": one_process_skips_compression(),
        "direct_calls_equal_simulation": direct_calls_equal_simulation(),
        "warmup_payloads_shrink_step_by_step": warmup_payloads_shrink_step_by_step(),
        "tf_checkpoint_round_trip": tf_checkpoint_round_trip(sys.argv[1]),
        "keras3_refused": refuses(keras3_variables, ValueError, "TF_USE_LEGACY_KERAS=1"),
        "no_variables": refuses(lambda: htc.Compression("topk:0.1"), ValueError, "needs variables="),
        "int_variable": refuses(lambda: htc.Compression("topk:0.1", variables=[tf.Variable([1, 2])]),
                                TypeError, "gradients must be floating point"),
        "bad_spec": refuses(lambda: htc.Compression("topk:2.5", variables=make_variables()), ValueError,
                            "ratio must be a number in (0, 1], got 2.5"),
        "k_too_big": refuses(lambda: htc.Compression("topk:k=7", variables=make_variables(), dense_below=0).compress(
            tf.zeros([4])), ValueError, "k=7 is larger than the tensor's 4 elements"),
    }
    print("RESULT " + json.dumps(checks), flush=True)


if __name__ == "__main__":
    main()
