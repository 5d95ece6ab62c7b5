"""hvd_compress for Keras 3 (TensorFlow backend): ``model.fit`` that averages compressed gradients.

Horovod 0.28's ``horovod.tensorflow.keras.DistributedOptimizer`` is written for tf-keras: with Keras 3 (the
default ``tf.keras`` of TensorFlow >= 2.16) it hooks methods Keras 3 never calls, so it accepts
``compression=`` and never averages (the ranks silently diverge), and its ``BroadcastGlobalVariablesCallback``
calls ``optimizer.variables()``, a list in Keras 3. This module is the Keras 3 counterpart:

    import hvd_compress.keras as hck
    compression = hck.Compression("topk:0.01", error_feedback=True, variables=model.trainable_variables)
    model.compile(optimizer=hck.DistributedOptimizer(keras.optimizers.SGD(0.05), compression=compression),
                  loss="mse", jit_compile=False)
    model.fit(x, y, callbacks=[hck.BroadcastGlobalVariablesCallback(0)])

A Keras 3 optimizer's ``apply_gradients(grads_and_vars)`` calls ``apply(grads, variables)``; the distributed
optimizer is a subclass of the given optimizer's class whose ``apply`` first averages the gradients with
Horovod's own reduction (the function both of Horovod's optimizers use, so the ``Compression`` sees exactly
what the tf-keras path shows it) and then applies them as the optimizer would. Horovod's collectives have no
XLA kernels: compile the model with ``jit_compile=False`` (Keras' "auto" picks XLA where there is a GPU);
``apply`` refuses to be traced under XLA with an error that says so.
"""
import keras
import tensorflow as tf
import horovod.tensorflow as hvd
from tensorflow.python.ops import control_flow_util

from .tensorflow.compression import Compression as _TFCompression
from .tensorflow.horovod import is_keras3_variable

__all__ = ["Compression", "DistributedOptimizer", "BroadcastGlobalVariablesCallback", "broadcast_weights"]


def _tf_variable(v):
    """The tf.Variable under a Keras 3 variable (``.value`` is it outside an autocast scope); others as they are."""
    return v.value if is_keras3_variable(v) else v


class Compression(_TFCompression):
    """``hvd_compress.tensorflow.Compression`` that takes a Keras 3 model's variables
    (``variables=model.trainable_variables``), for :func:`DistributedOptimizer` only: Horovod's own Keras
    wrapper never averages with Keras 3."""

    def __init__(self, compressor, error_feedback=False, server=None, variables=None, **kwargs):
        if variables is not None:
            variables = [_tf_variable(v) for v in variables]
        super().__init__(compressor, error_feedback=error_feedback, server=server, variables=variables, **kwargs)


def DistributedOptimizer(optimizer, compression=None, process_set=hvd.global_process_set, sparse_as_dense=False,
                         name=None):
    """A Keras 3 optimizer like ``optimizer`` (same class, same configuration, not yet built) that averages the
    gradients over the ranks of ``process_set`` before applying them.

    Args:
        optimizer: a Keras 3 optimizer that has not been built (its configuration is copied, not its state).
        compression: an :class:`hvd_compress.keras.Compression` (or ``hvd_compress.tensorflow.Compression`` given
            the ``tf.Variable``s ``[v.value for v in model.trainable_variables]``), or one of Horovod's
            compressors; None: Horovod's dense average.
        process_set: the Horovod process set that averages the gradients.
        sparse_as_dense: reduce ``tf.IndexedSlices`` gradients as dense tensors (as Horovod's option).
        name: the name of Horovod's reduction scope (default ``Distributed<class name>``).
    """
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError(f"DistributedOptimizer wraps a Keras 3 optimizer, got {type(optimizer).__module__}."
                        f"{type(optimizer).__name__}; for tf-keras use horovod.tensorflow.keras.DistributedOptimizer")
    if keras.backend.backend() != "tensorflow":
        raise ValueError(f"hvd_compress.keras needs Keras' TensorFlow backend, not {keras.backend.backend()!r}")
    if optimizer.built:
        raise ValueError("wrap the optimizer before it is built (before compile/fit has run): its configuration is "
                         "copied into the distributed optimizer, its state would be lost")
    base = type(optimizer)
    # Horovod's gradient reduction, as both of Horovod's DistributedOptimizers build it (private API of
    # Horovod 0.28): allreduce with op=Average (compression's compress/decompress around it) under a
    # "size > 1" condition, None gradients passed through
    reduce = hvd._make_allreduce_grads_fn(name or f"Distributed{base.__name__}", "", "",
                                          compression or hvd.Compression.none, sparse_as_dense, hvd.Average,
                                          1.0, None, process_set)

    class Distributed(base):
        def apply(self, grads, trainable_variables=None):
            grads = list(grads)
            if grads:
                if control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()):
                    raise ValueError("Horovod's collectives cannot be compiled by XLA: compile the model with "
                                     "model.compile(..., jit_compile=False)")
                grads = reduce(grads, None)
            return super().apply(grads, trainable_variables)

    # Saved models record the user's optimizer class: they load without hvd_compress
    Distributed.__name__, Distributed.__qualname__, Distributed.__module__ = \
        base.__name__, base.__qualname__, base.__module__
    return Distributed.from_config(optimizer.get_config())


def broadcast_weights(model, root_rank=0, process_set=hvd.global_process_set):
    """Sets the model's weights (trainable and not) and its optimizer's variables to root_rank's (eagerly)."""
    variables = list(model.weights)
    if getattr(model, "optimizer", None) is not None:
        variables += list(model.optimizer.variables)
    if variables:
        hvd.broadcast_variables([_tf_variable(v) for v in variables], root_rank,
                                process_set=process_set)


class BroadcastGlobalVariablesCallback(keras.callbacks.Callback):
    """At the start of ``fit`` (the model and its optimizer are built by then, no step has run), makes the
    weights and optimizer variables of every rank root_rank's. The Keras 3 counterpart of Horovod's callback."""

    def __init__(self, root_rank=0, process_set=hvd.global_process_set):
        super().__init__()
        self.root_rank, self.process_set = root_rank, process_set

    def on_train_begin(self, logs=None):
        broadcast_weights(self.model, self.root_rank, self.process_set)
