"""Data-parallel Fashion-MNIST training (TensorFlow 2 custom loop) with stock Horovod and hvd_compress.

    horovodrun -np 2 python examples/tensorflow_fashion_mnist.py --compressor topk:0.01 --error-feedback

The TensorFlow twin of examples/pytorch_fashion_mnist.py: same flags, same model, same sharding, same
output. Gradients are combined by ``hvd.DistributedGradientTape`` inside a ``tf.function`` training step.
With ``--compressor none`` (no error feedback, no server pass) hvd_compress is not used at all: the run is
Horovod's own dense fp32 allreduce, the baseline the compressed runs are compared with.
"""
import os

# tf.keras must be Keras 2 (the tf-keras package): Horovod's Keras integration is written for it, and it
# must be chosen before TensorFlow is first imported.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import argparse
import json
import sys
import time

import numpy as np
import tensorflow as tf
import horovod.tensorflow as hvd
from tqdm import tqdm

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
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
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
    # NCHW from the loader -> NHWC (channels_last, TensorFlow's native layout). The whole set fits easily
    # in (GPU) memory; keeping it there as constants avoids an input pipeline per rank.
    x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    return tf.constant(x), tf.constant(y)


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


def epoch_shard(n, epoch, args):
    """This rank's example indices for an epoch: the same permutation on every rank (seeded by seed +
    epoch), strided shards of it, cut to ``steps * batch_size`` so every rank runs the same number of steps."""
    steps = (n // hvd.size()) // args.batch_size
    if steps == 0:
        raise SystemExit(f"too few training examples ({n}) for {hvd.size()} ranks x batch {args.batch_size}")
    perm = np.random.default_rng(args.seed + epoch).permutation(n)
    return perm[hvd.rank()::hvd.size()][:steps * args.batch_size].reshape(steps, args.batch_size), steps


def make_train_step(model, optimizer, loss_fn, x, y, compression):
    tape_kwargs = {} if compression is None else {"compression": compression}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64)])
    def train_step(idx):
        xb, yb = tf.gather(x, idx), tf.gather(y, idx)
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        tape = hvd.DistributedGradientTape(tape, **tape_kwargs)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return train_step


def train_epoch(train_step, optimizer, n, epoch, args, progress):
    """One epoch on this rank's shard; returns the mean training loss averaged over ranks."""
    shard, steps = epoch_shard(n, epoch, args)
    total = tf.constant(0.0)
    bar = tqdm(range(steps), desc=f"epoch {epoch + 1}", disable=not progress, leave=False)
    for i in bar:
        loss = train_step(tf.constant(shard[i]))
        total += loss
        if epoch == 0 and i == 0:
            # Horovod's pattern: the optimizer's slots exist only after the first step; make them (and
            # the iteration count) rank 0's. The model itself was broadcast before training.
            hvd.broadcast_variables(optimizer.variables, root_rank=0)
        if progress and i % 10 == 0:
            bar.set_postfix(loss=f"{float(loss):.4f}")
    bar.close()
    return float(hvd.allreduce(total / steps, op=hvd.Average, name="train_loss"))


def evaluate(model, x, y, batch_size=1000):
    """Test accuracy over all ranks: each rank scores its strided shard, then correct/count are summed."""
    xs, ys = x[hvd.rank()::hvd.size()], y[hvd.rank()::hvd.size()]
    n = int(xs.shape[0])
    correct = 0
    for i in range(0, n, batch_size):
        pred = tf.argmax(model(xs[i:i + batch_size], training=False), axis=1)
        correct += int(tf.reduce_sum(tf.cast(pred == ys[i:i + batch_size], tf.int64)))
    counts = hvd.allreduce(tf.constant([correct, n], dtype=tf.float64), op=hvd.Sum, name="eval")
    return float(counts[0] / counts[1])


def replicas_identical(model):
    """True iff every rank's parameters are bit-identical to every other rank's."""
    flat = tf.concat([tf.reshape(tf.cast(v, tf.float32), [-1]) for v in model.variables], axis=0)
    bits = hvd.allgather(tf.bitcast(flat, tf.int32)[None, :], name="replica_check").numpy()  # size x P
    return all(np.array_equal(bits[0], bits[r]) for r in range(1, hvd.size()))


def main():
    args = parse_args()
    hvd.init()
    device = setup_devices()
    tf.keras.utils.set_random_seed(args.seed)     # same initial weights everywhere (broadcast anyway)
    rank0 = hvd.rank() == 0

    x_train, y_train = load_split("train", args.train_limit)
    x_test, y_test = load_split("test", args.test_limit)
    model = build_model()                         # built: trainable_variables exist from here on
    n_params = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    dense_step = 4 * n_params                     # bytes of one dense fp32 allreduce of all gradients
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = tf.keras.optimizers.SGD(learning_rate=args.lr, momentum=args.momentum)

    use_hc = not (args.compressor in ("none", "") and not args.error_feedback and not args.server)
    compression = None
    if use_hc:
        import hvd_compress.tensorflow as htc
        compression = htc.Compression(args.compressor or None, error_feedback=args.error_feedback,
                                      server=args.server or None, variables=model.trainable_variables)
    hvd.broadcast_variables(model.variables, root_rank=0)
    train_step = make_train_step(model, optimizer, loss_fn, x_train, y_train, compression)

    if rank0:
        print(f"size {hvd.size()}  device {device}  compressor {args.compressor or 'none'}  "
              f"error_feedback {args.error_feedback}  server {args.server or 'none'}  "
              f"params {n_params:,}  hvd_compress {'on' if use_hc else 'off (Horovod default)'}", flush=True)

    n_train = int(x_train.shape[0])
    records, sent_before, dense_before, steps_before = [], 0, 0, 0
    for epoch in range(args.epochs):
        start = time.time()
        loss = train_epoch(train_step, optimizer, n_train, epoch, args, rank0 and not args.no_progress)
        acc = evaluate(model, x_test, y_test)
        elapsed = time.time() - start
        if use_hc:  # cumulative counters, so the epoch's share is a difference
            st = compression.stats()
            sent, dense = st["total_bytes_sent"] - sent_before, st["total_dense_bytes"] - dense_before
            sent_before, dense_before = st["total_bytes_sent"], st["total_dense_bytes"]
        else:
            steps = (n_train // hvd.size()) // args.batch_size
            sent = dense = dense_step * steps
            st = {"steps": steps_before + steps}
            steps_before += steps
        ratio = sent / dense if dense else float("nan")
        if rank0:
            print(f"epoch {epoch + 1}/{args.epochs}  loss {loss:.4f}  test_acc {acc:.4f}  "
                  f"bytes_sent {fmt_bytes(sent)}  dense {fmt_bytes(dense)}  ratio {ratio:.4f}  "
                  f"time {elapsed:.1f}s", flush=True)
        records.append(dict(epoch=epoch + 1, loss=loss, test_acc=acc, bytes_sent=sent, dense_bytes=dense,
                            ratio=ratio, time_s=elapsed, last_step_stats=st))

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
