"""Run under horovodrun with 2 ranks: bad set-ups of the TensorFlow plug-in end in a clear error on every
rank. Each rank prints "CAUGHT <type>: <message>" (and for nan "BUFFER_UNCHANGED <bool>").
usage: tf_bad_input.py mismatch|nan"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from tf_common import LR, batch, loss_of, make_variables  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import horovod.tensorflow as hvd  # noqa: E402

import hvd_compress.tensorflow as htc  # noqa: E402


def main(scenario):
    hvd.init()
    variables = make_variables()
    try:
        spec = "topk:0.3" if scenario != "mismatch" or hvd.rank() == 0 else "natural"
        compression = htc.Compression(spec, error_feedback=True, server="topk:0.5", variables=variables)

        @tf.function
        def train_step(x, y, poison):
            with tf.GradientTape() as tape:
                loss = loss_of(variables, x, y, True) + poison * variables[2][0, 0]
            tape = hvd.DistributedGradientTape(tape, compression=compression)
            for v, g in zip(variables, tape.gradient(loss, variables)):
                v.assign_sub(LR * g)

        for step in range(5):
            if step == 3:
                before = compression.worker_error[2].numpy()
            poison = float("nan") if (step == 3 and hvd.rank() == 1) else 0.0
            train_step(*batch(step, hvd.rank()), tf.constant(poison, tf.float64))
    except Exception as err:   # noqa: BLE001 - the test reads what each rank caught
        message = str(err)   # TF puts the graph's traceback first; our words start at "hvd_compress"
        message = message[max(0, message.find("hvd_compress")):][:1000].replace("\n", " | ")
        print(f"CAUGHT {type(err).__name__}: {message}", flush=True)
        if scenario == "nan":
            print(f"BUFFER_UNCHANGED {np.array_equal(before, compression.worker_error[2].numpy())}", flush=True)
        return
    print("NO ERROR", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
