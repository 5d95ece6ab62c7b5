"""TensorFlow on the fused C kernels (``hvd_compress/tensorflow/fused.py``) and the random stream both frameworks
share: the C step is encode + decode, it equals TensorFlow's ops bit for bit where no reduction rounds (to
rounding where one does), in a graph as eagerly (subnormals included: TensorFlow's threads flush them), falls
back to TensorFlow's ops for inputs the kernels do not take, and is used only where it should be.
Single process, no Horovod."""
import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

tf = pytest.importorskip("tensorflow")
torch = pytest.importorskip("torch")

from hvd_compress import compressors as C  # noqa: E402
from hvd_compress import fused  # noqa: E402
from hvd_compress.tensorflow import fused as TF  # noqa: E402
from hvd_compress.tensorflow import kernels as TK  # noqa: E402
from hvd_compress.tensorflow import ops  # noqa: E402
from hvd_compress.torch import kernels as PK  # noqa: E402

DENSE = ["sign", "onebit", "natural", "natural:det", "qsgd:4", "qsgd:200", "0.5*sign", "0.5*onebit", "0.5*natural",
         "0.5*qsgd:16"]
REDUCING = {"sign", "onebit", "qsgd:4", "qsgd:200", "0.5*sign", "0.5*onebit", "0.5*qsgd:16"}   # a scale or a norm
DTYPES = {"float32": np.float32, "float64": np.float64}
SIZES = [1, 7, 1000, 70_001]
SEED = (987654321, 12)


@pytest.fixture(scope="module", autouse=True)
def library():
    if fused.lib() is None:
        pytest.skip("the fused kernels cannot be built here")


def _vector(d, dtype, seed, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(d) * scale).astype(dtype)


def _same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _parts(parts):
    return [p.numpy() for p in parts]


# ---- one random stream for both frameworks --------------------------------------------------------------------

@pytest.mark.parametrize("seed", [(1, 2), (2 ** 31 - 1, 2 ** 40 + 3), 5, (123, 2 ** 64 - 1)])
def test_tensorflow_draws_what_torch_draws(seed):
    key, step = seed if isinstance(seed, tuple) else (seed, 0)
    in_graph = tf.function(lambda s, dtype: TK._uniform(1000, dtype, (key, s)))
    signed_step = step - 2 ** 64 if step >= 2 ** 63 else step
    for tdt, pdt in ((tf.float32, torch.float32), (tf.float64, torch.float64)):
        expected = PK._uniform(torch.empty(1000, dtype=pdt), seed).numpy()
        assert _same(TK._uniform(1000, tdt, seed).numpy(), expected)
        assert _same(in_graph(tf.constant(signed_step, tf.int64), tdt).numpy(), expected)
    assert _same(TK._random_indices(100_000, 1000, seed).numpy().astype(np.int64),
                 PK._random_indices(100_000, 1000, seed, "cpu").numpy())


@pytest.mark.parametrize("spec", ["natural", "0.5*natural", "randk:0.01", "randk:0.01,shared", "topk:0.01+natural"])
@pytest.mark.parametrize("path", ["C", "TensorFlow's ops"])
def test_random_payloads_are_torchs(spec, path):
    """The same bytes as PyTorch for the random compressors whose math is element-wise (RandK drawing fewer than
    d / 8 values), on both of TensorFlow's paths."""
    c, d = C.parse(spec), 20_000
    x = _vector(d, np.float32, 3)
    expected = PK.pack(c, PK.encode(c, torch.from_numpy(x), SEED), d).numpy()
    if path == "C":
        assert _same(TK.pack(c, TK.encode(c, tf.constant(x), SEED), d).numpy(), expected)
    else:
        with fused.disabled():
            assert _same(TK.pack(c, TK.encode(c, tf.constant(x), SEED), d).numpy(), expected)


# ---- the C path ------------------------------------------------------------------------------------------------

CASES = [(s, d, t) for s in DENSE for d in SIZES for t in DTYPES]


@pytest.mark.parametrize("spec,d,dtype", CASES, ids=[f"{s}-{d}-{t}" for s, d, t in CASES])
def test_step_is_encode_and_decode_and_equals_the_ops(spec, d, dtype):
    c, dt = C.parse(spec), DTYPES[dtype]
    g, e = tf.constant(_vector(d, dt, 1)), tf.constant(_vector(d, dt, 2, 0.3))
    assert TF.usable(c, g.dtype, g, e)
    parts, stats, left = ops.step(c, g, e, True, SEED)
    x = g + e
    encoded = TK.encode(c, x, SEED)
    decoded = TK.decode(c, encoded, d, SEED, g.dtype)
    assert all(_same(a, b) for a, b in zip(_parts(parts), _parts(encoded)))
    assert _same(left.numpy(), (x - decoded).numpy())
    wide_left, wide_x = left.numpy().astype(np.float64), x.numpy().astype(np.float64)
    assert np.allclose(stats.numpy(), [np.sum(wide_left ** 2), np.sum(wide_x ** 2), 1.0], rtol=1e-9)
    no_error = ops.step(c, g, e, None, SEED)   # (sign, 1-bit: the residual in closed form)
    assert no_error[2] is None and all(_same(a, b) for a, b in zip(_parts(no_error[0]), _parts(parts)))
    assert np.allclose(no_error[1].numpy(), stats.numpy(), rtol=1e-6, atol=1e-9 * stats.numpy()[1])
    assert _same(decoded.numpy(), TK.decode_ops(c, encoded, d, SEED, g.dtype).numpy())   # decoding never rounds
    ops_parts = TK.encode_ops(c, x, SEED)
    if spec in REDUCING:   # the payload's body (signs, levels) may differ only where the scale or norm rounds
        assert np.allclose(parts[0].numpy(), ops_parts[0].numpy(), rtol=1e-5)
    else:
        assert all(_same(a, b) for a, b in zip(_parts(parts), _parts(ops_parts)))


@pytest.mark.parametrize("spec", DENSE)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_mean_is_the_formula(spec, dtype):
    c, dt, d = C.parse(spec), DTYPES[dtype], 5003
    vectors = [_vector(d, dt, j, 10.0 ** (j - 1)) for j in range(3)]
    for x in vectors:   # too small for Natural's code in every row: its byte is 128, which decodes to -0
        x[5] = -np.abs(x).max() * dt(2.0 ** -140)
    rows = [TK.pack(c, TK.encode(c, tf.constant(x), SEED), d) for x in vectors]
    mean = ops.decode_mean(c, rows, d, SEED, tf.zeros([0], dt))
    decoded = [TK.decode_ops(c, TK.unpack(c, row, d, tf.as_dtype(dt)), d, SEED, tf.as_dtype(dt)) for row in rows]
    expected = tf.math.divide_no_nan(decoded[0] + decoded[1] + decoded[2], tf.constant(3, dt))
    assert _same(mean.numpy(), expected.numpy())


@pytest.mark.parametrize("spec", DENSE)
@pytest.mark.parametrize("bad", [math.inf, math.nan, 1e-40])
def test_graph_equals_eager_and_falls_back_to_the_ops(spec, bad):
    """In a graph (TensorFlow's threads flush subnormals to zero) as eagerly; an input the kernels do not take
    (a non-finite value; for Natural a subnormal one) gives what TensorFlow's ops give, marked not finite."""
    c = C.parse(spec)
    x = _vector(5000, np.float32, 4)
    x[17] = bad
    g, e = tf.constant(x), tf.constant(_vector(5000, np.float32, 5, 1e-38))
    eager = ops.step(c, g, e, True, (3, 4))
    graph = tf.function(lambda g, e, s: ops.step(c, g, e, True, (3, s)))(g, e, tf.constant(4, tf.int64))
    for a, b in zip(_parts(eager[0]) + [eager[1].numpy(), eager[2].numpy()],
                    _parts(graph[0]) + [graph[1].numpy(), graph[2].numpy()]):
        assert _same(a, b)
    assert eager[1].numpy()[2] == (0.0 if not math.isfinite(bad) else 1.0)
    if not math.isfinite(bad) or (bad == 1e-40 and "natural" in spec):
        general = ops._step_ops(c, g, e, True, (3, 4))
        assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(_parts(eager[0]), _parts(general[0])))
        assert np.array_equal(eager[2].numpy(), general[2].numpy(), equal_nan=True)


@pytest.mark.parametrize("spec", ["topk:0.01", "0.5*topk:0.01", "topk:k=100"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_step_is_the_ops_and_torchs(spec, dtype):
    """Top-k's C step (a sample's candidates) selects what TensorFlow's ops and PyTorch select, ties included."""
    c, dt, d = C.parse(spec), DTYPES[dtype], 300_001
    g, e = _vector(d, dt, 7), _vector(d, dt, 8, 0.3)
    g[::1000] = g[1]   # many equal magnitudes
    tg, te = tf.constant(g), tf.constant(e)
    assert TF.usable(c, tg.dtype, tg, te)
    parts, stats, left = ops.step(c, tg, te, True, SEED)
    ops_parts, ops_stats, ops_left = ops._step_ops(c, tg, te, True, SEED)
    assert all(_same(a, b) for a, b in zip(_parts(parts), _parts(ops_parts))) and _same(left, ops_left)
    torch_left = torch.empty(d, dtype=getattr(torch, dtype))
    torch_parts, torch_stats = PK.step(c, torch.from_numpy(g), torch.from_numpy(e), torch_left, SEED)
    assert all(_same(a, b.numpy()) for a, b in zip(_parts(parts), torch_parts)) and _same(left, torch_left.numpy())
    assert np.allclose(stats.numpy(), ops_stats.numpy(), rtol=1e-9)
    graph = tf.function(lambda g, e: ops.step(c, g, e, True, SEED))(tg, te)
    assert all(_same(a, b) for a, b in zip(_parts(parts), _parts(graph[0]))) and _same(left, graph[2])


def test_output_buffers_are_reused_only_when_released():
    """The pool of large output arrays: a tensor TensorFlow holds keeps its values; a released array is reused."""
    def filled(x):
        out = TF._empty(1 << 20, np.float32)
        out[:] = x[0]
        return out
    make = tf.function(lambda x: tf.numpy_function(filled, [x], tf.float32))   # (a graph's output is the array)
    held = [make(tf.constant([float(j)])) for j in range(2 * TF._POOL_SIZE)]
    assert [(float(tf.reduce_min(t)), float(tf.reduce_max(t))) for t in held] == [(j, j) for j in range(len(held))]
    first = TF._empty(3 << 18, np.float32)   # (another size: the pool of 4 MB is full of held arrays)
    address = first.ctypes.data
    del first
    assert TF._empty(3 << 18, np.float32).ctypes.data == address


def test_used_on_the_cpu_outside_xla_only():
    c, x = C.parse("natural"), tf.constant(_vector(100, np.float32, 6))
    assert TF.usable(c, tf.float32, x)
    assert not TF.usable(C.parse("topk:0.1"), tf.float32, x)     # (a small Top-k: TensorFlow's ops)
    big = tf.zeros([1 << 17])
    assert TF.usable(C.parse("topk:0.01"), tf.float32, big) and not TF.usable(C.parse("topk:0.5"), tf.float32, big)
    assert not TF.usable(C.parse("topk:0.01"), tf.float32, big, decoding=True)
    assert not TF.usable(c, tf.float16, x)
    with fused.disabled():
        assert not TF.usable(c, tf.float32, x)
    seen = []
    tf.function(lambda x: seen.append(TF.usable(c, tf.float32, x)) or x, jit_compile=True)(x)
    assert seen == [False]
