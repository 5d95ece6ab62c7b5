"""Data-parallel Fashion-MNIST training (Keras ``compile``/``fit``) with stock Horovod and hvd_compress.

    horovodrun -np 2 python examples/keras_fashion_mnist.py --compressor topk:0.01 --error-feedback

The Keras twin of examples/pytorch_fashion_mnist.py: same flags, same model, same sharding, same output.
Gradients are combined by ``horovod.tensorflow.keras.DistributedOptimizer``. With ``--compressor none``
(no error feedback, no server pass) hvd_compress is not used at all: the run is Horovod's own dense fp32
allreduce, the baseline the compressed runs are compared with.
"""
import os

# tf.keras must be Keras 2 (the tf-keras package): horovod.tensorflow.keras is written for it, and it must
# be chosen before TensorFlow is first imported.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import argparse
import json
import sys
import time

import numpy as np
import tensorflow as tf
import horovod.tensorflow as hvd_tf          # tensor collectives (allreduce, allgather, broadcast_variables)
import horovod.tensorflow.keras as hvd      # init / rank / DistributedOptimizer / callbacks

from hvd_compress.data import load_fashion_mnist


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compressor", default="topk:0.01", help='worker compressor spec, e.g. "topk:0.01", '
                   '"none", "natural", "sign", "topk:0.01+natural"')
    p.add_argument("--error-feedback", action="store_true", help="keep and re-add the compression error")
    p.add_argument("--server", default="", help='compressor spec for the server pass ("" = none)')
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--train-limit", type=int, default=0, help="use only the first N training examples (0 = all)")
    p.add_argument("--test-limit", type=int, default=0, help="use only the first N test examples (0 = all)")
    p.add_argument("--json", default="", help="rank 0 writes per-epoch records here")
    p.add_argument("--no-progress", action="store_true", help="no Keras progress bar")
    p.add_argument("--check-replicas", action="store_true",
                   help="at the end, check that all ranks hold bit-identical parameters")
    return p.parse_args(argv)


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
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)), y   # NCHW -> NHWC (channels_last)


def fmt_bytes(n):
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            break
        n /= 1000
    return f"{n:.{2 if n < 10 else 1 if n < 100 else 0}f} {unit}"


def setup_devices():
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


def steps_per_epoch(n, args):
    # Every rank must run the same number of steps or Horovod's collectives hang: size the epoch from the
    # smallest shard and drop the remainder.
    steps = (n // hvd.size()) // args.batch_size
    if steps == 0:
        raise SystemExit(f"too few training examples ({n}) for {hvd.size()} ranks x batch {args.batch_size}")
    return steps


def train_dataset(x, y, args):
    """This rank's batches for all epochs, in order: per epoch the same permutation on every rank (seeded
    by seed + epoch), a strided shard of it, cut to ``steps * batch_size``. Exactly what the PyTorch and
    custom-loop examples feed, so ``fit(steps_per_epoch=steps)`` walks one epoch's shard per epoch."""
    n, steps = len(x), steps_per_epoch(len(x), args)
    idx = np.concatenate([np.random.default_rng(args.seed + e).permutation(n)[hvd.rank()::hvd.size()]
                          [:steps * args.batch_size] for e in range(args.epochs)])
    with tf.device("/cpu:0"):                 # tf.data runs on the host
        xt, yt = tf.constant(x), tf.constant(y)
    return (tf.data.Dataset.from_tensor_slices(idx).batch(args.batch_size, drop_remainder=True)
            .map(lambda i: (tf.gather(xt, i), tf.gather(yt, i))).prefetch(2))


def evaluate(model, x, y, batch_size=1000):
    """Test accuracy over all ranks: each rank scores its strided shard, then correct/count are summed."""
    xs, ys = x[hvd.rank()::hvd.size()], y[hvd.rank()::hvd.size()]
    logits = model.predict(xs, batch_size=batch_size, verbose=0) if len(xs) else np.zeros((0, 10))
    correct = int((logits.argmax(1) == ys).sum())
    counts = hvd_tf.allreduce(tf.constant([correct, len(xs)], dtype=tf.float64), op=hvd_tf.Sum, name="eval")
    return float(counts[0] / counts[1])


def replicas_identical(model):
    """True iff every rank's parameters are bit-identical to every other rank's."""
    flat = tf.concat([tf.reshape(tf.cast(v, tf.float32), [-1]) for v in model.variables], axis=0)
    bits = hvd_tf.allgather(tf.bitcast(flat, tf.int32)[None, :], name="replica_check").numpy()  # size x P
    return all(np.array_equal(bits[0], bits[r]) for r in range(1, hvd.size()))


class EpochReport(tf.keras.callbacks.Callback):
    """Per epoch (on every rank, since it runs collectives): the rank-averaged loss, the test accuracy over
    all ranks and this epoch's bytes; rank 0 prints the line and keeps the records."""

    def __init__(self, args, x_test, y_test, compression, dense_step, steps):
        super().__init__()
        self.args, self.x_test, self.y_test = args, x_test, y_test
        self.compression, self.dense_step, self.steps = compression, dense_step, steps
        self.records, self.sent_before, self.dense_before = [], 0, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.time()

    def on_epoch_end(self, epoch, logs=None):
        loss = float(hvd_tf.allreduce(tf.constant(float(logs["loss"])), op=hvd_tf.Average, name="train_loss"))
        acc = evaluate(self.model, self.x_test, self.y_test)
        elapsed = time.time() - self.start
        if self.compression is not None:  # cumulative counters, so the epoch's share is a difference
            st = self.compression.stats()
            sent, dense = st["total_bytes_sent"] - self.sent_before, st["total_dense_bytes"] - self.dense_before
            self.sent_before, self.dense_before = st["total_bytes_sent"], st["total_dense_bytes"]
        else:
            sent = dense = self.dense_step * self.steps
            st = {"steps": (epoch + 1) * self.steps}
        ratio = sent / dense if dense else float("nan")
        if hvd.rank() == 0:
            print(f"epoch {epoch + 1}/{self.args.epochs}  loss {loss:.4f}  test_acc {acc:.4f}  "
                  f"bytes_sent {fmt_bytes(sent)}  dense {fmt_bytes(dense)}  ratio {ratio:.4f}  "
                  f"time {elapsed:.1f}s", flush=True)
        self.records.append(dict(epoch=epoch + 1, loss=loss, test_acc=acc, bytes_sent=sent, dense_bytes=dense,
                                 ratio=ratio, time_s=elapsed, last_step_stats=st))


def main():
    args = parse_args()
    hvd.init()
    device = setup_devices()
    tf.keras.utils.set_random_seed(args.seed)     # same initial weights everywhere (broadcast anyway)
    rank0 = hvd.rank() == 0

    x_train, y_train = load_split("train", args.train_limit)
    x_test, y_test = load_split("test", args.test_limit)
    steps = steps_per_epoch(len(x_train), args)
    model = build_model()                         # built: trainable_variables exist from here on
    n_params = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    dense_step = 4 * n_params                     # bytes of one dense fp32 allreduce of all gradients

    optimizer = tf.keras.optimizers.SGD(learning_rate=args.lr, momentum=args.momentum)
    use_hc = not (args.compressor in ("none", "") and not args.error_feedback and not args.server)
    compression = None
    if use_hc:
        import hvd_compress.tensorflow as htc
        compression = htc.Compression(args.compressor or None, error_feedback=args.error_feedback,
                                      server=args.server or None, variables=model.trainable_variables)
        optimizer = hvd.DistributedOptimizer(optimizer, compression=compression)
    else:
        optimizer = hvd.DistributedOptimizer(optimizer)
    model.compile(optimizer=optimizer, loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    hvd_tf.broadcast_variables(model.variables, root_rank=0)

    if rank0:
        print(f"size {hvd.size()}  device {device}  compressor {args.compressor or 'none'}  "
              f"error_feedback {args.error_feedback}  server {args.server or 'none'}  "
              f"params {n_params:,}  hvd_compress {'on' if use_hc else 'off (Horovod default)'}", flush=True)

    report = EpochReport(args, x_test, y_test, compression, dense_step, steps)
    progress = rank0 and not args.no_progress
    callbacks = [
        # Makes the optimizer's slots (created by the first step) rank 0's, and the model again.
        hvd.callbacks.BroadcastGlobalVariablesCallback(0),
        # Listed explicitly so that it closes its bar before the report prints (Keras appends its own
        # progress bar after the user's callbacks otherwise). It shows rank 0's own running loss.
        *([tf.keras.callbacks.ProgbarLogger(count_mode="steps")] if progress else []),
        report,
    ]
    model.fit(train_dataset(x_train, y_train, args), epochs=args.epochs, steps_per_epoch=steps,
              callbacks=callbacks, verbose=1 if progress else 0)

    records = report.records
    if rank0 and records:
        total_ratio = sum(r["bytes_sent"] for r in records) / max(1, sum(r["dense_bytes"] for r in records))
        print(f"final test_acc {records[-1]['test_acc']:.4f} ratio {total_ratio:.4f}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(config=vars(args), size=hvd.size(), params=n_params, hvd_compress=use_hc,
                               epochs=records), f, indent=2, default=float)
    if args.check_replicas:
        same = replicas_identical(model)   # every rank gets the same answer, so all exit alike
        if rank0:
            print(f"replicas identical: {same}", flush=True)
        if not same:
            sys.exit(1)


if __name__ == "__main__":
    main()
