"""What the plug-in has to know of Horovod's TensorFlow path, which passes ``compress()`` a bare gradient: which
variable it is, the process set it is reduced on, the Keras optimizer that reduces it (if one does), and which
variables its Keras wrapper cannot average."""
import os
import sys

import tensorflow as tf
import horovod.tensorflow as hvd

from .. import options


class GradientOrder:
    """The index of the variable a gradient belongs to. Gradients arrive in the order of the variables given
    to the tape or optimizer (Horovod skips variables without gradient): each is the next variable of its
    shape. The count starts again in each graph traced (a step function) and after the last variable."""

    def __init__(self, shapes):
        self.shapes, self.graph, self.cursor = shapes, None, 0

    def __call__(self, tensor):
        graph = tf.compat.v1.get_default_graph()
        while type(graph).__name__ == "CondBranchFuncGraph":   # Horovod wraps each reduction in a tf.cond
            graph = graph.outer_graph
        if graph is not self.graph or self.cursor >= len(self.shapes):
            self.graph, self.cursor = graph, 0
        shape = tuple(tensor.shape)
        while self.cursor < len(self.shapes) and self.shapes[self.cursor] != shape:
            self.cursor += 1   # a variable without gradient: Horovod skipped it
        if self.cursor == len(self.shapes):
            raise ValueError(f"compress() got a gradient of shape {shape} that matches no remaining variable: "
                             f"give Compression the variables in the order their gradients are reduced")
        self.cursor += 1
        return self.cursor - 1


def process_set_of_caller():
    """The process_set of Horovod's allreduce that called compress() (None for a direct call)."""
    frame = sys._getframe(1)   # compress(), maybe a decorator's frame, then Horovod's allreduce
    for _ in range(5):
        if frame is None:
            return None
        if frame.f_code.co_filename.endswith(os.path.join("horovod", "tensorflow", "__init__.py")) \
                and "process_set" in frame.f_locals:
            return frame.f_locals["process_set"]
        frame = frame.f_back
    return None


def process_set_for(given, theirs):
    """The process set of a Compression given ``given`` (or None) whose gradients are reduced on ``theirs``
    (or None: all ranks). On another set its collectives would wait for ranks that never come: refused."""
    if theirs is not None and given is not None and theirs.process_set_id != given.process_set_id:
        raise ValueError(f"the gradients are reduced on the process set {theirs.ranks or 'of all ranks'} but "
                         f"this Compression was given {given.ranks or 'all ranks'}: give it the same process_set "
                         f"as the tape or optimizer (or none)")
    return given or theirs or hvd.global_process_set


def optimizer_of_caller():
    """The Keras optimizer whose gradients compress() was called for (Horovod's tf-keras wrapper or
    ``hvd_compress.keras``: a method of it is among the callers, below Horovod's tf.cond), None for a tape."""
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if hasattr(candidate, "apply_gradients") and hasattr(candidate, "learning_rate"):
            return candidate
        frame = frame.f_back
    return None


def check_momentum_of(config, optimizer):
    """A Keras optimizer applies no momentum over the momentum correction (``options.refuse_second_momentum``)."""
    if optimizer is not None:
        options.refuse_second_momentum(config.momentum, float(getattr(optimizer, "momentum", 0.0) or 0.0),
                                       hasattr(optimizer, "beta_1"), "use SGD without momentum")


def variables_of(variables, compute_dtype):
    """The list of ``variables`` (tf.Variables of a dtype ``compute_dtype`` knows), as Horovod reduces them."""
    if variables is None:
        raise ValueError("Compression needs variables=model.trainable_variables (in the order Horovod "
                         "reduces their gradients): Horovod passes compress() no variable")
    variables = list(variables)
    refuse_keras3_variables(variables)
    for v in variables:
        if not isinstance(v, tf.Variable):
            raise ValueError(f"variables must be tf.Variables, got {type(v).__name__}")
        try:
            compute_dtype(v.dtype)
        except TypeError as err:
            raise TypeError(f"variable {v.name!r}: {err}") from None
    return variables


def is_keras3_variable(v):
    return type(v).__module__.startswith("keras.") and not isinstance(v, tf.Variable)


def refuse_keras3_variables(variables):
    if any(is_keras3_variable(v) for v in variables):
        raise ValueError(
            "these are Keras 3 variables. With Keras 3, Horovod 0.28's Keras DistributedOptimizer accepts "
            "compression= but never averages gradients (ranks silently diverge). For model.fit on Keras 3 use "
            "hvd_compress.keras: its Compression(...) and DistributedOptimizer(optimizer, compression=...). "
            "Or use tf-keras with Horovod's wrapper (pip install tf-keras, TF_USE_LEGACY_KERAS=1 before "
            "importing TensorFlow). For a custom loop with hvd.DistributedGradientTape, pass "
            "variables=[v.value for v in model.trainable_variables]")

