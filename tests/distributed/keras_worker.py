"""Run under horovodrun with tf-keras: model.fit with Horovod's Keras DistributedOptimizer and
hvd_compress, for each configuration (one TensorFlow start-up for all); rank 0 prints "RESULT <json>":
{configuration: whether weights are identical across ranks, how many steps were compressed and
how many bytes went out}.
usage: keras_worker.py SPEC,SERVER_SPEC|"",keras|tensorflow ...   (whose DistributedOptimizer wraps SGD)"""
import json
import os
import sys

os.environ["TF_USE_LEGACY_KERAS"] = "1"   # before TensorFlow is imported: tf.keras is tf-keras
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import horovod.tensorflow.keras as hvd  # noqa: E402

import hvd_compress.tensorflow as htc  # noqa: E402


def fit(spec, server, wrapper):
    tf.keras.utils.set_random_seed(1)
    model = tf.keras.Sequential([tf.keras.layers.Dense(8, activation="relu", input_shape=(6,)),
                                 tf.keras.layers.Dense(3)])
    compression = htc.Compression(spec, error_feedback=True, server=server or None,
                                  variables=model.trainable_variables, dense_below=0)
    if wrapper == "keras":
        opt = hvd.DistributedOptimizer(tf.keras.optimizers.SGD(0.05), compression=compression)
    else:   # horovod.tensorflow's own DistributedOptimizer, given a Keras optimizer
        import horovod.tensorflow as hvd_tf
        opt = hvd_tf.DistributedOptimizer(tf.keras.optimizers.SGD(0.05), compression=compression)
    model.compile(optimizer=opt, loss="mse")
    rng = np.random.RandomState(100 + hvd.rank())      # different data on every rank
    x, y = rng.randn(256, 6).astype("float32"), rng.randn(256, 3).astype("float32")
    model.fit(x, y, batch_size=32, epochs=2, verbose=0, shuffle=False,
              callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0)])
    flat = tf.concat([tf.reshape(w, [-1]) for w in model.get_weights()], 0)
    everyone = hvd.allgather(tf.bitcast(flat, tf.int32)[None], name="weights").numpy()
    stats = compression.stats()
    return {"identical": bool((everyone == everyone[0]).all()), "steps": stats["steps"], "ratio": stats["ratio"]}


def main(configurations):
    hvd.init()
    report = {c: fit(*c.rsplit(",", 2)) for c in configurations}   # SPEC may hold commas
    if hvd.rank() == 0:
        print("RESULT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
