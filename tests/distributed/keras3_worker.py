"""Run under horovodrun: model.fit with Top-k 30% + error feedback (without and with a Top-k 50% server pass),
on Keras 3 with hvd_compress.keras or on tf-keras with Horovod's own Keras wrapper: the same model, initial
weights, data (different on every rank) and SGD with momentum (in the optimizer, or as the Compression's momentum
correction). Rank 0 prints "RESULT <json>": per case whether
the weights are bit-identical across ranks, the Compression's stats and rank 0's final weights; on Keras 3
also whether the bad set-ups are refused.
usage: keras3_worker.py keras3|tf-keras"""
import json
import os
import sys

MODE = sys.argv[1]
# before TensorFlow is imported: tf.keras is tf-keras, or Keras 3
os.environ["TF_USE_LEGACY_KERAS"] = "1" if MODE == "tf-keras" else "0"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import horovod.tensorflow as hvd  # noqa: E402

# (worker, server, the Compression's momentum correction: the optimizer's momentum moves into the Compression)
CASES = {"topk_ef": ("topk:0.3", None, 0.0), "topk_ef_server": ("topk:0.3", "topk:0.5", 0.0),
         "topk_ef_momentum": ("topk:0.3", None, 0.9)}


def initial_weights(rank):
    """The same on every rank, except on Keras 3 where ranks other than 0 start elsewhere: the broadcast
    callback must make them rank 0's before the first step (Horovod's tf-keras callback broadcasts only after
    the first step, so the tf-keras run starts from rank 0's weights everywhere)."""
    rng = np.random.RandomState(7 if rank == 0 or MODE == "tf-keras" else 70 + rank)
    shapes = [(6, 8), (8,), (8, 3), (3,)]
    return [(0.5 * rng.randn(*s)).astype("float32") for s in shapes]


def data(rank):
    rng = np.random.RandomState(100 + rank)
    return rng.randn(256, 6).astype("float32"), rng.randn(256, 3).astype("float32")


def build(keras):
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)])
    model.set_weights(initial_weights(hvd.rank()))
    return model


def train(spec, server, momentum, sgd_momentum=None):
    options = dict(error_feedback=True, server=server, dense_below=0, momentum=momentum)
    sgd = dict(learning_rate=0.05, momentum=0.9 - momentum if sgd_momentum is None else sgd_momentum)
    if MODE == "keras3":
        import keras
        import hvd_compress.keras as hck
        model = build(keras)
        compression = hck.Compression(spec, variables=model.trainable_variables, **options)
        optimizer = hck.DistributedOptimizer(keras.optimizers.SGD(**sgd), compression=compression)
        broadcast = hck.BroadcastGlobalVariablesCallback(0)
        model.compile(optimizer=optimizer, loss="mse", jit_compile=False)
    else:
        import horovod.tensorflow.keras as hvd_keras
        import hvd_compress.tensorflow as htc
        keras = tf.keras
        assert not keras.__name__.startswith("keras"), keras.__name__   # tf_keras
        model = build(keras)
        compression = htc.Compression(spec, variables=model.trainable_variables, **options)
        optimizer = hvd_keras.DistributedOptimizer(keras.optimizers.SGD(**sgd), compression=compression)
        broadcast = hvd_keras.callbacks.BroadcastGlobalVariablesCallback(0)
        model.compile(optimizer=optimizer, loss="mse")
    x, y = data(hvd.rank())
    model.fit(x, y, batch_size=32, epochs=2, verbose=0, shuffle=False, callbacks=[broadcast])
    flat = np.concatenate([np.ravel(w) for w in model.get_weights()]).astype(np.float32)
    everyone = hvd.allgather(tf.bitcast(tf.constant(flat), tf.int32)[None],
                             name=f"weights_{spec}_{server}_{momentum}").numpy()
    stats = compression.stats()
    return {"identical": bool((everyone == everyone[0]).all()), "steps": stats["steps"], "ratio": stats["ratio"],
            "total_bytes_sent": stats["total_bytes_sent"], "weights": [float(w) for w in flat]}


def refusals():
    """What must be refused on Keras 3, with the message saying what to do."""
    import keras
    import hvd_compress.keras as hck
    import hvd_compress.tensorflow as htc
    found = {}
    model = build(keras)
    try:   # the Compression meant for Horovod's own Keras wrapper, which never averages on Keras 3
        htc.Compression("topk:0.3", variables=model.trainable_variables)
        found["keras3_variables"] = "no error"
    except ValueError as err:
        found["keras3_variables"] = "hvd_compress.keras" in str(err) or str(err)
    model.compile(optimizer=hck.DistributedOptimizer(keras.optimizers.SGD(0.05)), loss="mse", jit_compile=True)
    try:   # Horovod's collectives have no XLA kernels: refused while tracing, before any collective runs
        model.fit(*data(hvd.rank()), batch_size=32, epochs=1, verbose=0)
        found["xla"] = "no error"
    except ValueError as err:
        found["xla"] = "jit_compile=False" in str(err) or str(err)
    return found


def momentum_twice():
    """Momentum in the Compression and in the optimizer: refused at the first step, on either path."""
    try:
        train("topk:0.3", None, 0.9, sgd_momentum=0.9)
        return "no error"
    except ValueError as err:
        return "give the optimizer momentum=0" in str(err) or str(err)


def main():
    hvd.init()
    result = {name: train(*case) for name, case in CASES.items()}
    result["refused"] = refusals() if MODE == "keras3" else {}
    result["refused"]["momentum_twice"] = momentum_twice()
    if hvd.rank() == 0:
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
