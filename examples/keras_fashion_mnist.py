"""Data-parallel Fashion-MNIST training (Keras ``compile``/``fit``) with stock Horovod and hvd_compress.

    horovodrun -np 2 python examples/keras_fashion_mnist.py --compressor topk:0.01 --error-feedback

The Keras twin of examples/pytorch_fashion_mnist.py: same flags (but for the PyTorch plug-in's --bucket-mb),
same model, same sharding, same output.
Gradients are combined by ``horovod.tensorflow.keras.DistributedOptimizer`` on tf-keras (the default here),
or by ``hvd_compress.keras.DistributedOptimizer`` on Keras 3 (run with ``TF_USE_LEGACY_KERAS=0``). With
``--compressor none`` (no error feedback, no server pass) hvd_compress is not used at all: the run is Horovod's
own dense fp32 allreduce, the baseline the compressed runs are compared with.
"""
import os

# tf.keras is Keras 2 (the tf-keras package) unless TF_USE_LEGACY_KERAS=0 is set: horovod.tensorflow.keras is
# written for it (hvd_compress.keras is the Keras 3 path), and it must be chosen before TensorFlow is imported.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np
import tensorflow as tf
import horovod.tensorflow as hvd_tf          # tensor collectives (allreduce, allgather, broadcast_variables)
import horovod.tensorflow.keras as hvd      # init / rank / DistributedOptimizer / callbacks

# Next to this script: `python examples/keras_fashion_mnist.py` puts examples/ first on sys.path.
from fmnist_common import (EpochLog, config_line, exit_unless_identical, momentum_split, parse_args,
                           steps_per_epoch, uses_hvd_compress)
from tf_fmnist_common import build_model, evaluate, load_split, replicas_identical, setup_devices

KERAS3 = hasattr(tf.keras, "version")   # Keras 3: Horovod's Keras wrapper would not average, hvd_compress.keras does
if KERAS3:
    import hvd_compress.keras as hck


def train_dataset(x, y, steps, args):
    """This rank's batches for all epochs, in order: per epoch the same permutation on every rank (seeded
    by seed + epoch), a strided shard of it, cut to ``steps * batch_size``. Exactly what the PyTorch and
    custom-loop examples feed, so ``fit(steps_per_epoch=steps)`` walks one epoch's shard per epoch."""
    n = len(x)
    idx = np.concatenate([np.random.default_rng(args.seed + e).permutation(n)[hvd.rank()::hvd.size()]
                          [:steps * args.batch_size] for e in range(args.epochs)])
    with tf.device("/cpu:0"):                 # tf.data runs on the host: a host copy of the set
        xt, yt = tf.identity(x), tf.identity(y)
    return (tf.data.Dataset.from_tensor_slices(idx).batch(args.batch_size, drop_remainder=True)
            .map(lambda i: (tf.gather(xt, i), tf.gather(yt, i))).prefetch(2))


class EpochReport(tf.keras.callbacks.Callback):
    """Per epoch (on every rank, since it runs collectives): the rank-averaged loss and the test accuracy over
    all ranks go to the EpochLog, which adds this epoch's bytes; rank 0 prints the line."""

    def __init__(self, log, x_test, y_test):
        super().__init__()
        self.log, self.x_test, self.y_test = log, x_test, y_test

    def on_epoch_begin(self, epoch, logs=None):
        self.log.start()

    def on_epoch_end(self, epoch, logs=None):
        loss = float(hvd_tf.allreduce(tf.constant(float(logs["loss"])), op=hvd_tf.Average, name="train_loss"))
        acc = evaluate(hvd_tf, self.model, self.x_test, self.y_test)
        self.log.end(epoch, loss, acc)


def main():
    args = parse_args(__doc__, progress_bar="Keras", transport="tensorflow")
    # the hierarchical transport adds a process set per node and per local rank at its first step
    hvd.init(process_sets="dynamic" if args.transport == "hierarchical" else None)
    device = setup_devices(hvd_tf)
    tf.keras.utils.set_random_seed(args.seed)     # same initial weights everywhere (broadcast anyway)
    rank0 = hvd.rank() == 0

    x_train, y_train = load_split("train", args.train_limit)
    x_test, y_test = load_split("test", args.test_limit)
    steps = steps_per_epoch(len(x_train), hvd.size(), args.batch_size)
    model = build_model()                         # built: trainable_variables exist from here on
    n_params = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    dense_step = 4 * n_params                     # bytes of one dense fp32 allreduce of all gradients

    use_hc = uses_hvd_compress(args)
    in_optimizer, in_compression = momentum_split(args, use_hc)
    optimizer = tf.keras.optimizers.SGD(learning_rate=args.lr, **in_optimizer)
    compression = None
    if use_hc:
        import hvd_compress.tensorflow as htc
        compression = (hck if KERAS3 else htc).Compression(
            args.compressor or None, error_feedback=args.error_feedback, server=args.server or None,
            variables=model.trainable_variables, transport=args.transport, link_gbps=args.link_gbps,
            dense_below=args.dense_below, **in_compression)
    optimizer = (hck if KERAS3 else hvd).DistributedOptimizer(
        optimizer, **({"compression": compression} if use_hc else {}))   # else Horovod's dense allreduce
    # Keras 3: Horovod's collectives have no XLA kernels (jit_compile="auto" would pick XLA on a GPU)
    model.compile(optimizer=optimizer, loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  **({"jit_compile": False} if KERAS3 else {}))
    if not KERAS3:   # (on Keras 3, hck's callback broadcasts when fit starts, before the first step)
        hvd_tf.broadcast_variables(model.variables, root_rank=0)

    if rank0:
        print(config_line(hvd.size(), device, args, n_params, use_hc), flush=True)

    log = EpochLog(lambda: compression.stats() if use_hc else None, dense_step, steps, args.epochs, rank0)
    progress = rank0 and not args.no_progress
    callbacks = [
        # Makes the optimizer's slots (created by the first step) rank 0's, and the model again. Keras 3:
        # the model and the optimizer (built by then) are made rank 0's when fit starts.
        hck.BroadcastGlobalVariablesCallback(0) if KERAS3 else hvd.callbacks.BroadcastGlobalVariablesCallback(0),
        # Listed explicitly so that it closes its bar before the report prints (Keras appends its own
        # progress bar after the user's callbacks otherwise). It shows rank 0's own running loss.
        *([tf.keras.callbacks.ProgbarLogger(**({} if KERAS3 else {"count_mode": "steps"}))] if progress else []),
        EpochReport(log, x_test, y_test),
    ]
    model.fit(train_dataset(x_train, y_train, steps, args), epochs=args.epochs, steps_per_epoch=steps,
              shuffle=False, callbacks=callbacks, verbose=1 if progress else 0)   # (the batches are in order)

    log.finish(args, hvd.size(), n_params, use_hc)
    if args.check_replicas:
        exit_unless_identical(replicas_identical(hvd_tf, model), rank0)


if __name__ == "__main__":
    main()
