"""TensorFlow twin of counterexample.py (3 ranks, Top-1, through hvd.DistributedGradientTape).
usage: tf_counterexample.py PLAIN_STEPS EF_STEPS ETA [ETA ...]"""
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf  # noqa: E402
import horovod.tensorflow as hvd  # noqa: E402

import hvd_compress.tensorflow as htc  # noqa: E402

A = tf.constant([[-3.0, 2, 2], [2, -3, 2], [2, 2, -3]], tf.float64)


def run(eta, steps, error_feedback):
    x = tf.Variable(tf.ones([3], tf.float64))
    compression = htc.Compression(htc.TopK(k=1), error_feedback=error_feedback, variables=[x], dense_below=0)
    a = A[hvd.rank()]

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.tensordot(a, x, 1) ** 2 + tf.tensordot(x, x, 1) / 4
        tape = hvd.DistributedGradientTape(tape, compression=compression)
        x.assign_sub(eta * tape.gradient(loss, [x])[0])

    trajectory = [x.numpy()]
    for _ in range(steps):
        step()
        trajectory.append(x.numpy())
    return trajectory


def main(plain_steps, ef_steps, *etas):
    hvd.init()
    report = {}
    for eta in map(float, etas):
        plain, ef = run(eta, int(plain_steps), False), run(eta, int(ef_steps), True)
        report[str(eta)] = {"growth": [(b / a).tolist() for a, b in zip(plain, plain[1:])],
                            "expected_growth": 1 + 11 * eta / 6,
                            "ef_norms": [float((x ** 2).sum() ** 0.5) for x in ef]}
    if hvd.rank() == 0:
        print("RESULT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
