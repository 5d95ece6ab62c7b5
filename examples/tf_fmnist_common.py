"""What the TensorFlow and Keras Fashion-MNIST examples share: the model, the data, device setup, evaluation
and the replica check. ``hvd`` is ``horovod.tensorflow`` (its collectives are the ones used here).
"""
import os

# tf.keras must be Keras 2 (the tf-keras package): Horovod's Keras integration is written for it, and it
# must be chosen before TensorFlow is first imported (the scripts set it too, before importing this).
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np
import tensorflow as tf

# Next to this module (the examples that import it put examples/ first on sys.path).
from fmnist_data import load_fashion_mnist


def build_model():
    # 28x28 -> conv5 24x24 -> pool 12x12 -> conv5 8x8 -> pool 4x4; 64 channels * 4 * 4 = 1024 features
    L = tf.keras.layers
    return tf.keras.Sequential([
        tf.keras.Input(shape=(28, 28, 1)),
        L.Conv2D(32, 5, activation="relu"), L.MaxPooling2D(2),
        L.Conv2D(64, 5, activation="relu"), L.MaxPooling2D(2),
        L.Flatten(), L.Dense(128, activation="relu"), L.Dense(10)])


def load_split(split, limit):
    x, y = load_fashion_mnist(split)
    if limit > 0:
        x, y = x[:limit], y[:limit]
    # NCHW from the loader -> NHWC (channels_last, TensorFlow's native layout). The whole set fits easily
    # in (GPU) memory; keeping it there as constants avoids an input pipeline per rank.
    x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    return tf.constant(x), tf.constant(y)


def setup_devices(hvd):
    """One GPU per rank (memory growth on); on CPU, one thread per op since several ranks share the cores."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        gpu = gpus[hvd.local_rank() % len(gpus)]
        tf.config.set_visible_devices(gpu, "GPU")
        tf.config.experimental.set_memory_growth(gpu, True)
        return "gpu"
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    return "cpu"


def evaluate(hvd, model, x, y, batch_size=1000):
    """Test accuracy over all ranks: each rank scores its strided shard, then correct/count are summed."""
    xs, ys = x[hvd.rank()::hvd.size()], y[hvd.rank()::hvd.size()]
    n = int(xs.shape[0])
    correct = 0
    for i in range(0, n, batch_size):
        pred = tf.argmax(model(xs[i:i + batch_size], training=False), axis=1)
        correct += int(tf.reduce_sum(tf.cast(pred == ys[i:i + batch_size], tf.int64)))
    counts = hvd.allreduce(tf.constant([correct, n], dtype=tf.float64), op=hvd.Sum, name="eval")
    return float(counts[0] / counts[1])


def replicas_identical(hvd, model):
    """True iff every rank's parameters are bit-identical to every other rank's."""
    flat = tf.concat([tf.reshape(tf.cast(v, tf.float32), [-1]) for v in model.variables], axis=0)
    bits = hvd.allgather(tf.bitcast(flat, tf.int32)[None, :], name="replica_check").numpy()  # size x P
    return all(np.array_equal(bits[0], bits[r]) for r in range(1, hvd.size()))
