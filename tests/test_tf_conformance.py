"""TensorFlow kernels against the PyTorch reference: wire format, C(x), payload bytes, statistics, tracing.

Single process, no Horovod. ``hvd_compress.tensorflow.kernels`` must give the same payload layout and bytes as
``hvd_compress.torch.kernels``, the same C(x) for deterministic compressors, and the same statistics for random
ones (both draw from one stream: tests/test_tf_fused.py checks the draws and payloads bit for bit).
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

tf = pytest.importorskip("tensorflow")      # imported once per session: TensorFlow's import is slow
torch = pytest.importorskip("torch")

from hvd_compress import kernels as dispatch  # noqa: E402
from hvd_compress.compressors import Compose, Natural, QSGD, RandK, Scaled, TopK  # noqa: E402
from hvd_compress.tensorflow import kernels as TK  # noqa: E402
from hvd_compress.torch import kernels as PK  # noqa: E402

from test_compressors import ALL  # noqa: E402  (every compressor, with the variants that change the wire format)
RANDOM = [name for name, c in ALL.items() if c.random]
DETERMINISTIC = [name for name, c in ALL.items() if not c.random]
# deterministic compressors whose math is gathers, scatters, bit operations and exact scalings only: TensorFlow
# and torch agree bit for bit on every input (the others sum, in an order that differs between frameworks)
EXACT = {"topk-ratio", "topk-k", "natural-det", "topk+natural-det", "0.5*topk", "bf16", "topk+bf16", "identity"}
FLOATS = {"float32": (tf.float32, torch.float32, np.float32), "float64": (tf.float64, torch.float64, np.float64)}
KEY = 1234567


def _fixed_k(c):
    inner = c.compressor if isinstance(c, Scaled) else c.first if isinstance(c, Compose) else c
    return getattr(inner, "k", None)


def _vector(d, np_dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(d)
    if d > 3:
        x[::4] *= 10.0   # some spread of magnitudes
        x[1] = 0.0       # a zero
    return x.astype(np_dtype)


def _shared_vectors(np_dtype):
    """Fixed vectors on which TensorFlow and torch are compared: (name, array, sums are exact)."""
    rng = np.random.default_rng(42)
    normal = rng.standard_normal(50)
    normal[::4] *= 10.0
    normal[1], normal[7] = 0.0, -0.0
    # distinct dyadic magnitudes with a power-of-two peak: every sum of |x| and of (x / peak)^2 is exact, so
    # even summing compressors agree bit for bit
    dyadic = np.concatenate([rng.choice(np.arange(1, 64), 44, replace=False), np.zeros(5), [64.0]])
    dyadic = rng.permutation(dyadic * rng.choice([-1.0, 1.0], 50)) * 2.0 ** -3
    big, small = (1e30, 1e-30) if np_dtype == np.float32 else (1e300, 1e-300)
    return [("normal", normal.astype(np_dtype), False),
            ("dyadic", dyadic.astype(np_dtype), True),
            ("large", (rng.standard_normal(40) * big).astype(np_dtype), False),
            ("tiny", (rng.standard_normal(40) * small).astype(np_dtype), False),
            ("short", rng.standard_normal(9).astype(np_dtype), False)]


def _bits(a):
    """An array's bit patterns (compares -0.0 and 0.0 as different, NaN as itself)."""
    a = np.ascontiguousarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.itemsize])


def _assert_bitwise(a, b, what=""):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    assert np.array_equal(_bits(a), _bits(b)), (what, a, b)


def _numpy(part):
    """A part of either framework as numpy; bfloat16 (which numpy lacks) as its bits, int16."""
    if part.dtype in (tf.bfloat16, torch.bfloat16):
        return (tf.bitcast(part, tf.int16) if isinstance(part, tf.Tensor) else part.view(torch.int16)).numpy()
    return part.numpy()


def _canonical(c, parts):
    """numpy parts with a TopK payload in increasing index order (each framework has its own order)."""
    parts = [np.asarray(p) for p in parts]
    if isinstance(c, (TopK, Compose)) or isinstance(c, Scaled) and isinstance(c.compressor, TopK):
        order = np.argsort(parts[0], kind="stable")
        k = len(order)
        parts = [p[order] if len(p) == k else p for p in parts]
    return parts


# ---- payload round trip and wire format --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("name", ALL)
def test_payload_round_trip(name, dtype):
    c, (tf_dtype, _, np_dtype) = ALL[name], FLOATS[dtype]
    for d in (1, 9, 1000):
        if _fixed_k(c) is not None and _fixed_k(c) > d:
            continue
        x = tf.constant(_vector(d, np_dtype))
        seed = (KEY, 3)
        parts = TK.encode(c, x, seed)
        layout = c.layout(d)
        assert [p.dtype for p in parts] == TK.part_dtypes(c, d, tf_dtype)
        assert [tuple(p.shape) for p in parts] == [(n,) for _, n in layout]
        data = TK.pack(c, parts, d)
        assert data.dtype == tf.uint8 and tuple(data.shape) == (c.wire_bytes(d, tf_dtype.size),)
        back = TK.unpack(c, data, d, tf_dtype)
        for p, q in zip(parts, back):
            _assert_bitwise(p.numpy(), q.numpy(), f"{name} d={d}")
        direct = TK.decode(c, parts, d, seed, tf_dtype)
        _assert_bitwise(TK.decode(c, back, d, seed, tf_dtype).numpy(), direct.numpy(), f"{name} d={d}")
        _assert_bitwise(TK.apply(c, x, seed).numpy(), direct.numpy(), f"{name} d={d}")
        assert direct.dtype == tf_dtype and tuple(direct.shape) == (d,)


def test_unpack_rejects_wrong_size():
    c = TopK(k=2)
    data = TK.pack(c, TK.encode(c, tf.constant([1.0, -3.0, 2.0]), 0), 3)
    with pytest.raises(ValueError, match="expected 12"):   # 2 x (2-byte index + 4-byte value)
        TK.unpack(c, data[:-1], 3, tf.float32)


def test_indices_travel_as_in_torch():
    """A sparsifier's indices on the wire (low 16 bits, counts per 2^16-element block): the bytes PyTorch
    writes, across blocks, with empty blocks, eagerly and under XLA."""
    B, rng = 2 ** 16, np.random.default_rng(7)
    for d, idx in [(4 * B + 5, [0, B - 1, B, 3 * B + 7, 4 * B, 4 * B + 4]), (3 * B, [5]),
                   (10 * B + 1, sorted(rng.choice(10 * B + 1, 500, replace=False).tolist()))]:
        c, values = TopK(k=len(idx)), rng.standard_normal(len(idx)).astype(np.float32)
        theirs = PK.pack(c, [torch.tensor(idx, dtype=torch.int32), torch.from_numpy(values)], d).numpy()
        ours = TK.pack(c, [tf.constant(idx, tf.int32), tf.constant(values)], d)
        _assert_bitwise(ours.numpy(), theirs, f"d={d}")
        for unpack in (lambda data: TK.unpack(c, data, d, tf.float32),
                       tf.function(lambda data: TK.unpack(c, data, d, tf.float32), jit_compile=True)):
            back = unpack(ours)
            assert back[0].numpy().tolist() == idx and np.array_equal(back[1].numpy(), values)


def test_exact_slices_travel_as_in_torch():
    """The sharded transport's exact slices (nonzeros or dense): the bytes PyTorch writes, and back."""
    from hvd_compress.tensorflow import ops as TO
    B, rng = 2 ** 16, np.random.default_rng(8)
    for np_dtype, tf_dtype in ((np.float32, tf.float32), (np.float64, tf.float64)):
        sparse = np.zeros(3 * B + 5, np_dtype)
        sparse[[0, B - 1, B, 3 * B + 4]] = [1.5, -2.0, 3.0, 0.25]
        for v in (sparse, rng.standard_normal(7).astype(np_dtype), np.zeros(50, np_dtype)):
            theirs = PK.pack_exact(torch.from_numpy(v)).numpy()
            ours = TO.pack_exact(tf.constant(v))
            _assert_bitwise(ours.numpy(), theirs, f"{v.size} {np_dtype.__name__}")
            assert int(TO.exact_length(ours, 0, v.size, v.itemsize)) == theirs.size
            _assert_bitwise(TO.unpack_exact(ours, v.size, tf.zeros([v.size], tf_dtype)).numpy(), v, "unpack")


def test_bit_packing_matches_torch():
    rng = np.random.default_rng(1)
    for d in (1, 7, 8, 9, 17, 100):
        bits = rng.random(d) < 0.5
        packed = TK.pack_bits(tf.constant(bits))
        _assert_bitwise(packed.numpy(), PK.pack_bits(torch.from_numpy(bits)).numpy(), f"d={d}")
        assert np.array_equal(TK.unpack_bits(packed, d).numpy(), bits)


# ---- TensorFlow against torch --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_matches_torch(name, dtype):
    c, (tf_dtype, torch_dtype, np_dtype) = ALL[name], FLOATS[dtype]
    rtol = 1e-6 if np_dtype == np.float32 else 1e-12
    for label, x, exact_sums in _shared_vectors(np_dtype):
        what = f"{name} {label}"
        ours, theirs = TK.apply(c, tf.constant(x)).numpy(), PK.apply(c, torch.from_numpy(x)).numpy()
        ours_parts = _canonical(c, [_numpy(p) for p in TK.encode(c, tf.constant(x))])
        theirs_parts = _canonical(c, [_numpy(p) for p in PK.encode(c, torch.from_numpy(x))])
        if name in EXACT or exact_sums:
            _assert_bitwise(ours, theirs, what)
            ours_bytes = TK.pack(c, [tf.constant(p) for p in ours_parts], x.size).numpy()
            _assert_bitwise(ours_bytes, PK.pack(c, [torch.from_numpy(p) for p in theirs_parts], x.size).numpy(), what)
        else:
            np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=0, err_msg=what)
            for p, q in zip(ours_parts, theirs_parts):
                if p.dtype.kind == "f":
                    np.testing.assert_allclose(p, q, rtol=rtol, atol=0, err_msg=what)
                else:   # signs, indices, codes: the same bytes
                    _assert_bitwise(p, q, what)


@pytest.mark.parametrize("dtype", FLOATS)
def test_natural_extremes_match_torch(dtype):
    """Subnormals, rounding past the largest float, flushing, all zeros, one element: the same bytes."""
    _, _, np_dtype = FLOATS[dtype]
    info = np.finfo(np_dtype)
    tiny = float(info.smallest_subnormal)
    cases = [np.array([3 * tiny, -tiny, 1.5 * tiny * 2 ** 10, float(info.tiny), 0.7 * float(info.tiny)]),
             np.array([0.9 * float(info.max), 1.0, -2.0, -0.75 * float(info.max)]),
             np.array([1.0, 2.0 ** -125, -(2.0 ** -126), 2.0 ** -127, 0.75 * 2 ** -126, -0.0]),
             np.array([2.0 ** 100, 2.0 ** -26, 0.74 * 2.0 ** -25]),
             np.zeros(6), np.array([-0.0, 0.0]), np.array([-5.0]), np.array([0.75, -0.7499, 1.5, 3.0])]
    for c in (Natural(deterministic=True), Compose(TopK(k=1), Natural(deterministic=True))):
        for x in cases:
            x = x.astype(np_dtype)
            what = f"{c} {x}"
            ours_parts = _canonical(c, [_numpy(p) for p in TK.encode(c, tf.constant(x))])
            theirs_parts = _canonical(c, [_numpy(p) for p in PK.encode(c, torch.from_numpy(x))])
            if isinstance(c, Natural) or len(np.unique(np.abs(x))) == len(x):   # TopK: ties break differently
                for p, q in zip(ours_parts, theirs_parts):
                    _assert_bitwise(p, q, what)
            _assert_bitwise(TK.apply(c, tf.constant(x)).numpy(), PK.apply(c, torch.from_numpy(x)).numpy(), what)


@pytest.mark.parametrize("dtype", FLOATS)
def test_qsgd_matches_torch(dtype):
    """The norm as torch computes it (bit for bit where the sums are exact); levels at most one apart, and
    the same bytes where every level is deterministic (|x_i| / ||x|| * s an integer)."""
    _, _, np_dtype = FLOATS[dtype]
    rtol = 1e-6 if np_dtype == np.float32 else 1e-12
    for c in (QSGD(4), QSGD(300)):
        for label, x, exact_sums in _shared_vectors(np_dtype):
            what = f"{c} {label}"
            (norm, levels) = [p.numpy() for p in TK.encode(c, tf.constant(x), (KEY, 1))]
            (tnorm, tlevels) = [p.numpy() for p in PK.encode(c, torch.from_numpy(x), (KEY, 1))]
            if exact_sums:
                _assert_bitwise(norm, tnorm, what)
            else:
                np.testing.assert_allclose(norm, tnorm, rtol=rtol, err_msg=what)
            assert levels.dtype == tlevels.dtype
            assert np.all(np.abs(levels.astype(int) - tlevels.astype(int)) <= 1), what
            assert np.all(levels.astype(int) * np.sign(x) >= 0), what
    # norm 4, every |x_i| / ||x|| * 4 is 1 or 0: no randomness left
    x = np.array([1, 1, 1, -1, 1, 1, 1, 1, 1, -1, 1, 1, 1, 1, 1, 1, 0, -0.0], np_dtype) * np_dtype(2.0 ** -5)
    ours = TK.pack(QSGD(4), TK.encode(QSGD(4), tf.constant(x), (KEY, 1)), x.size).numpy()
    _assert_bitwise(ours, PK.pack(QSGD(4), PK.encode(QSGD(4), torch.from_numpy(x), (KEY, 1)), x.size).numpy())


@pytest.mark.parametrize("dtype", FLOATS)
def test_wire_compatible_with_torch(dtype):
    """torch's bytes decode in TensorFlow to what torch decodes them to, and the other way round (shared RandK
    left out: its receiver re-draws the indices, from its own framework's generator)."""
    tf_dtype, torch_dtype, np_dtype = FLOATS[dtype]
    x = _vector(50, np_dtype, seed=5)
    for name, c in ALL.items():
        if getattr(c, "shared", False):
            continue
        data = PK.pack(c, PK.encode(c, torch.from_numpy(x), (KEY, 2)), x.size)
        theirs = PK.decode(c, PK.unpack(c, data, 50, torch_dtype), 50, (KEY, 2), torch_dtype).numpy()
        ours = TK.decode(c, TK.unpack(c, tf.constant(data.numpy()), 50, tf_dtype), 50, (KEY, 2), tf_dtype)
        _assert_bitwise(ours.numpy(), theirs, f"torch -> tf {name}")
        data = TK.pack(c, TK.encode(c, tf.constant(x), (KEY, 2)), x.size)
        ours = TK.decode(c, TK.unpack(c, data, 50, tf_dtype), 50, (KEY, 2), tf_dtype).numpy()
        theirs = PK.decode(c, PK.unpack(c, torch.from_numpy(data.numpy()), 50, torch_dtype), 50, (KEY, 2),
                           torch_dtype)
        _assert_bitwise(theirs.numpy(), ours, f"tf -> torch {name}")


def test_random_outputs_have_the_right_support():
    """Natural(): each element one of the two powers of two around it; RandK: k of x's elements, scaled."""
    x = _vector(50, np.float64, seed=3)
    nz = x != 0
    mantissa, exponent = np.frexp(np.abs(x))
    low = np.ldexp(1.0, exponent - 1)
    for step in range(5):
        out = TK.apply(Natural(), tf.constant(x), (KEY, step)).numpy()
        assert np.all((out == 0) == ~nz)
        assert np.all(np.isin(np.abs(out[nz]) / low[nz], [1.0, 2.0])) and np.all(np.sign(out) == np.sign(x))
        for c, scale in ((RandK(k=5), 10.0), (RandK(k=5, unbiased=False), 1.0), (RandK(k=5, shared=True), 10.0)):
            out = TK.apply(c, tf.constant(x), (KEY, step)).numpy()
            kept = out != 0     # 5 drawn, minus those that drew a zero of x
            assert 5 - (~nz).sum() <= kept.sum() <= 5
            _assert_bitwise(out[kept], x[kept] * scale)


# ---- random compressors: reproducibility and statistics ------------------------------------------------------

@pytest.mark.parametrize("name", RANDOM)
def test_random_reproducible(name):
    c = ALL[name]
    x = tf.constant(_vector(1000, np.float32, seed=2))
    first = TK.apply(c, x, (KEY, 5)).numpy()
    _assert_bitwise(TK.apply(c, x, (KEY, 5)).numpy(), first)
    _assert_bitwise(TK.apply(c, x, (KEY, tf.constant(5, tf.int64))).numpy(), first)
    _assert_bitwise(TK.apply(c, x, [KEY, tf.constant(5, tf.int32)]).numpy(), first)
    assert not np.array_equal(TK.apply(c, x, (KEY, 6)).numpy(), first)
    assert not np.array_equal(TK.apply(c, x, (KEY + 1, 5)).numpy(), first)
    _assert_bitwise(TK.apply(c, x, 77).numpy(), TK.apply(c, x, (77, 0)).numpy())


def _samples_tf(c, x, n):
    @tf.function(jit_compile=False)
    def draws(x, steps):
        return tf.map_fn(lambda step: TK.apply(c, x, (KEY, step)), steps, fn_output_signature=x.dtype)
    return draws(tf.constant(x), tf.range(n, dtype=tf.int64)).numpy()


def _samples_torch(c, x, n):
    xt = torch.from_numpy(x)
    return np.stack([PK.apply(c, xt, (KEY, step)).numpy() for step in range(n)])


STATS = {"randk-unbiased": RandK(k=6), "randk-shared": RandK(k=6, shared=True), "natural": Natural(),
         "qsgd4": QSGD(4)}


@pytest.mark.parametrize("name", STATS)
def test_random_statistics_match_torch(name):
    """E C(x) = x, E||C(x)||^2 <= zeta ||x||^2, and E||C(x)||^2 the same as torch's (within noise)."""
    c, d, n = STATS[name], 30, 4000
    x = _vector(d, np.float64, seed=11)
    zeta = c.classes(d)["U"]["zeta"]
    ours, theirs = _samples_tf(c, x, n), _samples_torch(c, x, n // 2)
    assert len({row.tobytes() for row in ours}) > n // 2    # the steps draw differently
    mean, se = ours.mean(0), ours.std(0) / np.sqrt(n)
    assert np.all(np.abs(mean - x) <= 5 * se + 1e-12 * np.abs(x)), (mean, x, se)
    norms, tnorms = (ours ** 2).sum(1), (theirs ** 2).sum(1)
    se2, tse2 = norms.std() / np.sqrt(len(norms)), tnorms.std() / np.sqrt(len(tnorms))
    bound = zeta * (x ** 2).sum()
    assert norms.mean() <= bound * (1 + 1e-12) + 5 * se2, (norms.mean(), bound)
    assert abs(norms.mean() - tnorms.mean()) <= 5 * np.hypot(se2, tse2) + 1e-9 * bound


# ---- graphs, dtypes, errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_traceable_in_tf_function(name):
    """C(x) inside tf.function with a tensor step equals eager; one trace serves every step."""
    c = ALL[name]

    @tf.function(jit_compile=False)
    def compress(x, step):
        return TK.apply(c, x, (KEY, step))

    for dtype in ("float32", "float64"):
        x = tf.constant(_vector(100, FLOATS[dtype][2], seed=4).reshape(4, 25))
        for step in (3, 4):
            out = compress(x, tf.constant(step, tf.int64))
            assert out.shape == x.shape and out.dtype == x.dtype
            _assert_bitwise(out.numpy(), TK.apply(c, x, (KEY, step)).numpy(), f"{name} {dtype} step {step}")
    assert compress.experimental_get_tracing_count() == 2     # one per dtype

    if c.random:   # a variable's value as the step, read at run time
        v = tf.Variable(7, dtype=tf.int64)
        by_variable = tf.function(lambda x: TK.apply(c, x, (KEY, v)))
        for step in (7, 8):
            v.assign(step)
            _assert_bitwise(by_variable(x).numpy(), TK.apply(c, x, (KEY, step)).numpy(), f"{name} variable")


def test_unpack_of_unknown_length_in_graph():
    """Rows of an allgather have no static length: unpack still gives parts and results of static shapes."""
    x = tf.constant(_vector(50, np.float32, seed=7))
    for name, c in ALL.items():
        @tf.function(input_signature=[tf.TensorSpec([None], tf.uint8)])
        def receive(data):
            parts = TK.unpack(c, data, 50, tf.float32)
            assert [tuple(p.shape) for p in parts] == [(n,) for _, n in c.layout(50)], name
            out = TK.decode(c, parts, 50, (KEY, 1), tf.float32)
            assert tuple(out.shape) == (50,), name
            return out

        _assert_bitwise(receive(TK.pack(c, TK.encode(c, x, (KEY, 1)), 50)).numpy(), TK.apply(c, x, (KEY, 1)).numpy(),
                        name)


@pytest.mark.parametrize("name", [name for name, c in ALL.items() if c.sparsifies and _fixed_k(c) is None])
def test_k_given_in_the_graph_gives_the_same_bytes(name):
    """A warm-up's sparsifier keeps k(d) coordinates with k a tensor (``compressors.with_k_of``): the payload's
    parts and the composition's second stage have no static length then, and the bytes and C(x) are those of the
    compressor with that k, across index blocks of 2^16 elements too."""
    from hvd_compress.compressors import sparsifier_of, with_k_of
    c = ALL[name]

    @tf.function(jit_compile=False)
    def compress(x, k):
        warming = with_k_of(c, lambda d: k)
        d = x.shape[0]
        data = TK.pack(warming, TK.encode(warming, x, (KEY, 2)), d)
        return data, TK.decode(warming, TK.unpack(warming, data, d, x.dtype), d, (KEY, 2), x.dtype)

    for d in (50, 140_000):
        x = tf.constant(_vector(d, np.float32, seed=8))
        k = sparsifier_of(c).k_for(d)
        data, out = compress(x, tf.constant(k))
        _assert_bitwise(data.numpy(), TK.pack(c, TK.encode(c, x, (KEY, 2)), d).numpy(), f"{name} d={d}")
        _assert_bitwise(out.numpy(), TK.apply(c, x, (KEY, 2)).numpy(), f"{name} d={d}")
        assert len(data.numpy()) == c.wire_bytes(d)


def test_xla_draws_match_eager():
    """The random streams (and TopK's index order) do not depend on XLA."""
    x = tf.constant(_vector(100, np.float32, seed=6))
    for c in (Natural(), RandK(ratio=0.1, shared=True), Compose(TopK(ratio=0.1), Natural())):
        compress = tf.function(lambda x, step: TK.apply(c, x, (KEY, step)), jit_compile=True)
        _assert_bitwise(compress(x, tf.constant(9, tf.int64)).numpy(), TK.apply(c, x, (KEY, 9)).numpy(), str(c))


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_precision(half):
    half = getattr(tf, half)
    x32 = tf.constant(_vector(60, np.float32, seed=8).reshape(3, 20))
    x = tf.cast(x32, half)
    for name in ("topk-ratio", "randk-unbiased", "natural", "natural-det", "sign", "onebit", "qsgd4", "identity"):
        out = TK.apply(ALL[name], x, (KEY, 1))
        assert out.dtype == half and out.shape == x.shape
        expected = tf.cast(TK.apply(ALL[name], tf.cast(x, tf.float32), (KEY, 1)), half)
        _assert_bitwise(out.numpy(), expected.numpy(), name)


def test_non_floating_rejected():
    for dtype in (tf.int32, tf.int64, tf.bool, tf.uint8):
        with pytest.raises(TypeError, match="gradients must be floating point"):
            TK.apply(TopK(k=1), tf.zeros([4], dtype))
        with pytest.raises(TypeError, match="gradients must be floating point"):
            TK.compute_dtype(dtype)
    assert TK.compute_dtype(tf.float16) == tf.float32 and TK.compute_dtype(tf.float64) == tf.float64


def test_dispatch_by_tensor_type():
    x = tf.constant(_vector(40, np.float32).reshape(8, 5))
    for c in (TopK(k=3), Natural(), QSGD(4)):
        expected = TK.apply(c, x, (KEY, 2)).numpy()
        _assert_bitwise(dispatch.apply(c, x, (KEY, 2)).numpy(), expected)
        _assert_bitwise(c(x, (KEY, 2)).numpy(), expected)
        _assert_bitwise(dispatch.apply(c, tf.Variable(x), (KEY, 2)).numpy(), expected)
    assert isinstance(TopK(k=1)(torch.ones(3)), torch.Tensor)


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def test_every_compressor_class_has_both_kernels_in_both_frameworks():
    """The kernel registries: a Compressor class added without its PyTorch or TensorFlow encode / decode
    fails here, not at a user's first step."""
    from hvd_compress import compressors as C
    classes = [cls for cls in _subclasses(C.Compressor) if not cls.__name__.startswith("_")]
    assert {c.__name__ for c in classes} >= {"TopK", "RandK", "Natural", "ScaledSign", "OneBit", "QSGD", "Compose",
                                             "Scaled", "Identity"}
    for label, registry in [("PyTorch encode", PK._encode_torch), ("PyTorch decode", PK._decode_torch),
                            ("TensorFlow encode", TK._encode_tf), ("TensorFlow decode", TK._decode_tf)]:
        default = registry.dispatch(object)
        missing = [cls.__name__ for cls in classes if registry.dispatch(cls) is default]
        assert not missing, f"{label}: no kernel for {missing}"


@pytest.mark.parametrize("data", ["gauss", "ties", "skewed"])
def test_large_topk_selects_as_the_whole_tensor_and_torch(data):
    """Past 2^17 elements Top-k selects among the candidates above a sampled threshold (and from the whole
    tensor when too few pass): the same indices as top_k over the whole tensor and as PyTorch, ties included."""
    rng = np.random.default_rng(0)
    x = {"gauss": rng.standard_normal(300_000),
         "ties": np.round(rng.standard_normal(300_000) * 4),                  # many equal magnitudes
         "skewed": np.concatenate([np.zeros(290_000), rng.standard_normal(10_000)])}[data].astype(np.float32)
    for c in (TopK(ratio=0.01), TopK(ratio=0.1), TopK(k=3), Compose(TopK(ratio=0.01), Natural())):
        k = (c.first if isinstance(c, Compose) else c).k_for(x.size)
        ours = TK.encode(c, tf.constant(x), (KEY, 2))[0].numpy()
        whole = tf.sort(tf.math.top_k(tf.abs(tf.constant(x)), k, sorted=False).indices).numpy()
        theirs = PK.encode(c, torch.from_numpy(x), (KEY, 2))[0].numpy()
        assert np.array_equal(ours, whole) and np.array_equal(ours, theirs), c
