"""TensorFlow twin of common.py: a tiny model, per-rank data, a distributed loop and its simulation.

The head ``extra`` is used on even steps only: on odd steps its gradient is None, Horovod skips it, and the
simulation leaves it out of that step too. A case with ``"extra_every_step": true`` uses it on every step:
its step function is traced once instead of twice (tracing is most of the TF tests' time).
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from hvd_compress.simulate import Simulation  # noqa: E402
from hvd_compress.transport import Link  # noqa: E402

LR = 0.03
# four variables, as each costs some 800 ops in every traced step (tracing is most of these tests' time); the
# 4-element bias is small enough that transport="auto" on a slow link leaves it dense
SHAPES = {"w1": (6, 4), "b1": (4,), "w2": (4, 3), "extra": (6, 3)}


def make_variables(dtype=tf.float64):
    rng = np.random.RandomState(0)
    return [tf.Variable(rng.randn(*shape), dtype=dtype, name=name) for name, shape in SHAPES.items()]


def batch(step, rank, dtype=tf.float64):
    rng = np.random.RandomState(10_000 * step + rank)
    return tf.constant(rng.randn(8, 6), dtype), tf.constant(rng.randn(8, 3), dtype)


def uses_extra(case, step):
    return case.get("extra_every_step", False) or step % 2 == 0


def loss_of(variables, x, y, use_extra):
    w1, b1, w2, extra = variables
    out = tf.tanh(x @ w1 + b1) @ w2
    if use_extra:
        out = out + x @ extra
    return tf.reduce_mean((out - y) ** 2)


def names_of(variables):
    return [f"{i}/{v.name}" for i, v in enumerate(variables)]   # as hvd_compress.tensorflow names them


def train_reference(case, n, steps, start=0, variables=None, sim=None):
    variables = variables or make_variables()
    link = Link.gbit(case["link_gbps"]) if case.get("link_gbps") else None
    sim = sim or Simulation(case["compressor"], case.get("error_feedback", False), case.get("server"), n=n,
                            transport=case.get("transport"), link=link, dense_below=case.get("dense_below", 0),
                            local_size=case.get("local_size", 1), **dgc_options(case))
    names = names_of(variables)
    for step in range(start, start + steps):
        grads = []
        for r in range(n):
            x, y = batch(step, r)
            with tf.GradientTape() as tape:
                loss = loss_of(variables, x, y, uses_extra(case, step))
            grads.append({name: g for name, g in zip(names, tape.gradient(loss, variables)) if g is not None})
        for name, update in sim.step(grads).items():
            variables[names.index(name)].assign_sub(LR * update)
    return variables


def dgc_options(case):
    """Deep Gradient Compression's options of a case (momentum correction, warm-up, local clipping), as given."""
    return {key: case[key] for key in ("momentum", "momentum_masking", "nesterov", "warmup", "clip") if key in case}


def compression_of(case, variables, **kwargs):
    """The case's Compression (every variable compressed unless the case says dense_below)."""
    import hvd_compress.tensorflow as htc
    return htc.Compression(case["compressor"], error_feedback=case.get("error_feedback", False),
                           server=case.get("server"), variables=variables, transport=case.get("transport"),
                           link_gbps=case.get("link_gbps"), dense_below=case.get("dense_below", 0),
                           **dgc_options(case), **kwargs)


def train_distributed(case, steps, start=0, variables=None, compression=None, process_set=None):
    """The case on Horovod's ranks (or a process set's: its ranks are the simulation's 0..n-1)."""
    import horovod.tensorflow as hvd
    import hvd_compress.tensorflow as htc

    process_set = process_set or hvd.global_process_set
    variables = variables or make_variables()
    if compression is None:
        compression = compression_of(case, variables, process_set=process_set)

    @tf.function(autograph=False)   # nothing to convert: tracing is most of this test's time
    def train_step(x, y, use_extra):
        with tf.GradientTape() as tape:
            loss = loss_of(variables, x, y, use_extra)
        tape = hvd.DistributedGradientTape(tape, compression=compression, process_set=process_set)
        for v, g in zip(variables, tape.gradient(loss, variables)):
            if g is not None:
                v.assign_sub(LR * g)

    for step in range(start, start + steps):
        x, y = batch(step, process_set.rank())
        train_step(x, y, uses_extra(case, step))
    return variables, compression
