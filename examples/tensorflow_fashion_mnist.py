"""Data-parallel Fashion-MNIST training (TensorFlow 2 custom loop) with stock Horovod and hvd_compress.

    horovodrun -np 2 python examples/tensorflow_fashion_mnist.py --compressor topk:0.01 --error-feedback

The TensorFlow twin of examples/pytorch_fashion_mnist.py: same flags (but for the PyTorch plug-in's
--bucket-mb), same model, same sharding, same output. Gradients are combined by
``hvd.DistributedGradientTape`` inside a ``tf.function`` training step.
With ``--compressor none`` (no error feedback, no server pass) hvd_compress is not used at all: the run is
Horovod's own dense fp32 allreduce, the baseline the compressed runs are compared with.
"""
import os

# tf.keras must be Keras 2 (the tf-keras package): Horovod's Keras integration is written for it, and it
# must be chosen before TensorFlow is first imported.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np
import tensorflow as tf
import horovod.tensorflow as hvd
from tqdm import tqdm

# Next to this script: `python examples/tensorflow_fashion_mnist.py` puts examples/ first on sys.path.
from fmnist_common import (EpochLog, config_line, exit_unless_identical, momentum_split, parse_args,
                           steps_per_epoch, uses_hvd_compress)
from tf_fmnist_common import build_model, evaluate, load_split, replicas_identical, setup_devices


def epoch_shard(n, epoch, steps, args):
    """This rank's example indices for an epoch, ``steps`` x ``batch_size``: the same permutation on every
    rank (seeded by seed + epoch), strided shards of it, cut so every rank runs the same number of steps."""
    perm = np.random.default_rng(args.seed + epoch).permutation(n)
    return perm[hvd.rank()::hvd.size()][:steps * args.batch_size].reshape(steps, args.batch_size)


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


def train_epoch(train_step, optimizer, n, epoch, steps, args, progress):
    """One epoch of ``steps`` batches on this rank's shard; returns the mean training loss averaged over ranks."""
    shard = epoch_shard(n, epoch, steps, args)
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


def main():
    args = parse_args(__doc__, transport="tensorflow")
    # the hierarchical transport adds a process set per node and per local rank at its first step
    hvd.init(process_sets="dynamic" if args.transport == "hierarchical" else None)
    device = setup_devices(hvd)
    tf.keras.utils.set_random_seed(args.seed)     # same initial weights everywhere (broadcast anyway)
    rank0 = hvd.rank() == 0

    x_train, y_train = load_split("train", args.train_limit)
    x_test, y_test = load_split("test", args.test_limit)
    model = build_model()                         # built: trainable_variables exist from here on
    n_params = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    dense_step = 4 * n_params                     # bytes of one dense fp32 allreduce of all gradients
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    use_hc = uses_hvd_compress(args)
    in_optimizer, in_compression = momentum_split(args, use_hc)
    optimizer = tf.keras.optimizers.SGD(learning_rate=args.lr, **in_optimizer)
    compression = None
    if use_hc:
        import hvd_compress.tensorflow as htc
        compression = htc.Compression(args.compressor or None, error_feedback=args.error_feedback,
                                      server=args.server or None, variables=model.trainable_variables,
                                      transport=args.transport, link_gbps=args.link_gbps,
                                      dense_below=args.dense_below, **in_compression)
    hvd.broadcast_variables(model.variables, root_rank=0)
    train_step = make_train_step(model, optimizer, loss_fn, x_train, y_train, compression)

    if rank0:
        print(config_line(hvd.size(), device, args, n_params, use_hc), flush=True)

    n_train = int(x_train.shape[0])
    steps = steps_per_epoch(n_train, hvd.size(), args.batch_size)
    log = EpochLog(lambda: compression.stats() if use_hc else None, dense_step, steps, args.epochs, rank0)
    for epoch in range(args.epochs):
        log.start()
        loss = train_epoch(train_step, optimizer, n_train, epoch, steps, args, rank0 and not args.no_progress)
        acc = evaluate(hvd, model, x_test, y_test)
        log.end(epoch, loss, acc)
    log.finish(args, hvd.size(), n_params, use_hc)
    if args.check_replicas:
        exit_unless_identical(replicas_identical(hvd, model), rank0)


if __name__ == "__main__":
    main()
