"""Single-process tests of the compressors: wire format, class constants, statistics, parsing, dtypes.

No Horovod here: these exercise ``hvd_compress.compressors`` (definitions, wire sizes, class constants of the
first seed's table) and ``hvd_compress.torch.kernels`` (encode / decode / pack / unpack / apply).
"""
import functools
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from hvd_compress import compressors as C
from hvd_compress.compressors import (BFloat16, Compose, Identity, Natural, OneBit, QSGD, RandK, Scaled, ScaledSign,
                                      TopK, parse, scale_classes)
from hvd_compress.torch import kernels as K

FLOATS = [torch.float32, torch.float64]
DIMS = [1, 7, 8, 9, 1000]

# every kind of compressor, with the argument variants that change the wire format or the math
ALL = {
    "topk-ratio": TopK(ratio=0.1),
    "topk-k": TopK(k=5),
    "randk-unbiased": RandK(ratio=0.1),
    "randk-unbiased-k": RandK(k=3),
    "randk-biased": RandK(ratio=0.1, unbiased=False),
    "randk-shared": RandK(ratio=0.1, shared=True),
    "natural": Natural(),
    "natural-det": Natural(deterministic=True),
    "sign": ScaledSign(),
    "onebit": OneBit(),
    "qsgd4": QSGD(4),
    "qsgd300": QSGD(300),
    "bf16": BFloat16(),
    "topk+natural": Compose(TopK(ratio=0.1), Natural()),
    "topk+bf16": Compose(TopK(ratio=0.1), BFloat16()),
    "topk+natural-det": Compose(TopK(ratio=0.1), Natural(deterministic=True)),
    "randk-biased+sign": Compose(RandK(ratio=0.1, unbiased=False), ScaledSign()),
    "0.5*topk": Scaled(TopK(ratio=0.1), 0.5),
    "identity": Identity(),
}
RANDOM = {name for name, c in ALL.items() if c.random}


def _fixed_k(c):
    """The k a compressor needs at least d elements for (None when it scales with d)."""
    inner = c.compressor if isinstance(c, Scaled) else c.first if isinstance(c, Compose) else c
    return getattr(inner, "k", None)


def _test_vector(d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(d, generator=g, dtype=torch.float64)
    if d > 3:
        x[::4] *= 10.0   # some spread of magnitudes
        x[1] = 0.0       # a zero
    return x.to(dtype)


def _dot(a, b):
    return float(torch.dot(a.to(torch.float64).reshape(-1), b.to(torch.float64).reshape(-1)))


# ---- 1. payload: layout, packing, exact wire size ------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOATS, ids=["fp32", "fp64"])
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("name", list(ALL))
def test_payload_round_trip(name, d, dtype):
    c = ALL[name]
    x = _test_vector(d, dtype, seed=d)
    k = _fixed_k(c)
    if k is not None and k > d:
        with pytest.raises(ValueError, match=f"k={k}"):
            c.layout(d)
        with pytest.raises(ValueError, match=f"k={k}"):
            c(x, 0)
        return
    seed = 1234 + d
    parts = K.encode(c, x, seed)
    layout = c.layout(d)
    assert len(parts) == len(layout)
    for part, (kind, n), want_dtype in zip(parts, layout, K.part_dtypes(c, d, dtype)):
        assert part.dim() == 1 and part.numel() == n, (kind, n, part.shape)
        assert part.dtype == want_dtype == (dtype if kind == C.VALUE else K._DTYPES[kind])

    data = K.pack(c, parts, d)
    itemsize = torch.finfo(dtype).bits // 8
    assert data.dtype == torch.uint8 and data.dim() == 1
    assert data.numel() == c.wire_bytes(d, itemsize)
    assert c.wire_bytes(d, itemsize) == sum((itemsize if kind == C.VALUE else C._FIXED_ITEMSIZE[kind]) * n
                                            for kind, n in c.wire_layout(d))

    direct = K.decode(c, parts, d, seed, dtype)
    assert direct.dtype == dtype and direct.shape == (d,)
    assert torch.equal(c(x, seed), direct)

    back = K.unpack(c, data.clone(), d, dtype)
    assert len(back) == len(parts)
    for a, b in zip(back, parts):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert torch.equal(K.decode(c, back, d, seed, dtype), direct)

    # rows of an allgather can start at any byte: unpack must cope with an unaligned buffer
    buffer = torch.zeros(data.numel() + 1, dtype=torch.uint8)
    buffer[1:] = data
    assert torch.equal(K.decode(c, K.unpack(c, buffer[1:], d, dtype), d, seed, dtype), direct)

    with pytest.raises(ValueError, match="payload of"):
        K.unpack(c, torch.cat([data, torch.zeros(1, dtype=torch.uint8)]), d, dtype)

    # any shape: C(x) is computed on the flat tensor and comes back in x's shape
    if d == 1000:
        assert torch.equal(c(x.view(10, 100), seed), direct.view(10, 100))


WIRE_FORMULAS = [
    # (compressor, d, value itemsize, bytes)
    (TopK(ratio=0.01), 1000, 4, 10 * 2 + 10 * 4),    # an index: its low 16 bits (one block of 2^16: no counts)
    (TopK(ratio=0.01), 1000, 8, 10 * 2 + 10 * 8),
    (TopK(ratio=0.01), 7, 4, 1 * 2 + 1 * 4),          # k = max(1, floor(ratio * d))
    (TopK(k=5), 1000, 4, 5 * 2 + 5 * 4),
    (TopK(k=5), 2 ** 16, 4, 5 * 2 + 5 * 4),
    (TopK(k=5), 2 ** 16 + 1, 4, 5 * 2 + 5 * 4 + 4),  # two blocks: the count below the first one's end
    (TopK(k=3), 4 * 2 ** 16, 4, 3 * 2 + 3 * 4 + 3 * 4),
    (RandK(ratio=0.01), 1000, 4, 60),
    (RandK(ratio=0.01, unbiased=False), 1000, 8, 100),
    (RandK(ratio=0.01, shared=True), 1000, 4, 10 * 4),
    (RandK(ratio=0.01, shared=True), 1000, 8, 10 * 8),
    (ScaledSign(), 1000, 4, 4 + 125),
    (ScaledSign(), 1000, 8, 8 + 125),
    (ScaledSign(), 9, 4, 4 + 2),
    (ScaledSign(), 8, 4, 4 + 1),
    (ScaledSign(), 1, 4, 4 + 1),
    (OneBit(), 1000, 4, 8 + 125),
    (OneBit(), 9, 8, 16 + 2),
    (Natural(), 1000, 4, 4 + 1000),
    (Natural(), 1000, 8, 4 + 1000),                   # no value parts: independent of the value dtype
    (Natural(deterministic=True), 7, 4, 4 + 7),
    (QSGD(4), 1000, 4, 4 + 1000),
    (QSGD(127), 1000, 8, 8 + 1000),
    (QSGD(128), 1000, 4, 4 + 2 * 1000),
    (QSGD(300), 1000, 4, 4 + 2 * 1000),
    (BFloat16(), 1000, 8, 2 * 1000),
    (Compose(TopK(ratio=0.01), Natural()), 1000, 4, 10 * 2 + 4 + 10),
    (Compose(TopK(ratio=0.01), ScaledSign()), 1000, 4, 10 * 2 + 4 + 2),
    (Compose(TopK(ratio=0.01), BFloat16()), 1000, 4, 10 * 2 + 10 * 2),
    (Compose(TopK(ratio=0.01), BFloat16()), 10 ** 6, 8, 10 ** 4 * 4 + 15 * 4),
    (Compose(RandK(ratio=0.1, unbiased=False), QSGD(8)), 1000, 8, 100 * 2 + 8 + 100),
    (Scaled(TopK(ratio=0.01), 0.5), 1000, 4, 60),
    (Identity(), 1000, 4, 4000),
    (Identity(), 1000, 8, 8000),
]


@pytest.mark.parametrize("c, d, itemsize, expected", WIRE_FORMULAS, ids=lambda v: repr(v)[:40])
def test_wire_bytes_formulas(c, d, itemsize, expected):
    assert c.wire_bytes(d, itemsize) == expected
    dtype = {4: torch.float32, 8: torch.float64}[itemsize]
    assert K.pack(c, K.encode(c, _test_vector(d, dtype, seed=3), seed=5), d).numel() == expected


def test_wire_bytes_default_itemsize_is_fp32():
    assert TopK(ratio=0.01).wire_bytes(1000) == 60
    assert ScaledSign().wire_bytes(1000) == 129


def test_indices_travel_as_low_bits_and_block_counts():
    """A sparsifier's indices: their low 16 bits, then how many lie below the end of each 2^16-element block but
    the last; blocks without an index, indices at both ends of a block and in the last, partial block."""
    B = C.INDEX_BLOCK
    d = 4 * B + 5
    idx = [0, B - 1, B, 3 * B + 7, 4 * B, 4 * B + 4]   # block 2 holds none
    x = torch.zeros(d, dtype=torch.float64)
    x[idx] = torch.arange(1.0, len(idx) + 1, dtype=torch.float64)
    c = TopK(k=len(idx))
    parts = K.encode(c, x, 0)
    assert parts[0].tolist() == idx
    data = K.pack(c, parts, d)
    assert data.numel() == c.wire_bytes(d, 8) == 6 * 8 + 4 * 4 + 6 * 2
    # widest parts first: the values, the counts, the low bits
    values, below, low = data[:48].view(torch.float64), data[48:64].view(torch.int32), data[64:].view(torch.int16)
    assert values.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert below.tolist() == [2, 3, 3, 4]
    assert (low.to(torch.int32) & 0xFFFF).tolist() == [0, B - 1, 0, 7, 0, 4]
    back = K.unpack(c, data, d, torch.float64)
    assert back[0].dtype == torch.int32 and back[0].tolist() == idx and torch.equal(back[1], parts[1])


@pytest.mark.parametrize("d", [0, 1, 2, 7, 8, 9, 15, 16, 17, 63, 64, 65, 1000, 1001])
def test_bit_packing_round_trip(d):
    g = torch.Generator().manual_seed(d)
    for p in (0.0, 0.5, 1.0):
        bits = torch.rand(d, generator=g) < p
        packed = K.pack_bits(bits)
        assert packed.dtype == torch.uint8 and packed.numel() == (d + 7) // 8
        out = K.unpack_bits(packed, d)
        assert out.dtype == torch.bool and torch.equal(out, bits)


@pytest.mark.parametrize("dist", ["normal", "ties", "skewed", "zeros"])
@pytest.mark.parametrize("d, k", [(1 << 17, 1), (1 << 17, 1310), (300_001, 3000), (300_001, 37_000)])
def test_fast_topk_keeps_a_true_top_k_set(dist, d, k):
    """Large tensors take the sampled-threshold path of the TopK kernel: it must return k distinct indices
    whose magnitudes are >= every other magnitude, as torch.topk does (any subset among ties)."""
    g = torch.Generator().manual_seed(d + k)
    a = {"normal": lambda: torch.randn(d, generator=g).abs(),
         "ties": lambda: torch.randint(0, 5, (d,), generator=g).float(),
         "skewed": lambda: torch.cat([torch.full((d - 100,), 1.0), torch.arange(100.0) + 2]),   # the sample misses
         "zeros": lambda: torch.zeros(d)}[dist]()
    idx = K._topk_indices(a, k)
    assert idx.numel() == k and torch.unique(idx).numel() == k
    chosen = torch.zeros(d, dtype=torch.bool)
    chosen[idx] = True
    assert a[chosen].min() >= (a[~chosen].max() if (~chosen).any() else -1)
    assert torch.equal(torch.sort(a[idx]).values, torch.sort(torch.topk(a, k).values).values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_slices_round_trip_sparse_or_dense(dtype):
    """The sharded transport's exact downlink: nonzeros where smaller, else dense; sizes as the formula says."""
    from hvd_compress.transport import exact_bytes
    g = torch.Generator().manual_seed(1)
    B = C.INDEX_BLOCK   # a slice across blocks of 2^16 elements, one of them without a nonzero
    slices = [torch.zeros(0, dtype=dtype), torch.randn(7, generator=g, dtype=dtype),
              torch.zeros(50, dtype=dtype), torch.zeros(50, dtype=dtype).index_fill_(0, torch.tensor([3, 40]), -2.5),
              torch.randn(3, generator=g, dtype=dtype),
              torch.zeros(3 * B + 5, dtype=dtype).index_fill_(0, torch.tensor([0, B - 1, B, 3 * B + 4]), 1.5)]
    packed = [K.pack_exact(v) for v in slices]
    for v, data in zip(slices, packed):
        itemsize = v.element_size()
        assert data.numel() == exact_bytes(v.numel(), int((v != 0).sum()), itemsize)
    out = K.unpack_exact(torch.cat(packed), [v.numel() for v in slices], dtype)
    assert torch.equal(out, torch.cat(slices))
    with pytest.raises(ValueError, match="parsed"):
        K.unpack_exact(torch.cat(packed + [torch.zeros(3, dtype=torch.uint8)]), [v.numel() for v in slices], dtype)


def test_bit_packing_order_is_little_endian():
    bits = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 1], dtype=torch.bool)
    assert K.pack_bits(bits).tolist() == [1, 2 + 128, 1]
    assert K.unpack_bits(torch.tensor([255, 0, 5], dtype=torch.uint8), 20).tolist() == \
        [True] * 8 + [False] * 8 + [True, False, True, False]


# ---- 2. class inequalities of deterministic compressors, exactly, on many vectors ----------------------------

DISTRIBUTIONS = ["normal", "student_t", "cauchy", "sparse", "equal_magnitudes", "ties", "one_hot", "zeros",
                 "powers_of_two", "natural_worst", "wide", "uniform_positive"]


@st.composite
def vectors(draw, max_d=300):
    """A float64 torch vector of 1..max_d elements from one of several distributions and scales."""
    d = draw(st.integers(1, max_d))
    dist = draw(st.sampled_from(DISTRIBUTIONS))
    scale = draw(st.sampled_from([1.0, 1e-20, 1e20, 3.7e-5, 6.1e7]))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    signs = rng.choice([-1.0, 1.0], size=d)
    if dist == "normal":
        v = rng.standard_normal(d)
    elif dist == "student_t":
        v = rng.standard_t(1.5, size=d)
    elif dist == "cauchy":
        v = rng.standard_cauchy(d)
    elif dist == "sparse":
        v = rng.standard_normal(d) * (rng.random(d) < 0.1)
    elif dist == "equal_magnitudes":
        v = signs
    elif dist == "ties":
        v = rng.integers(-3, 4, size=d).astype(np.float64)
    elif dist == "one_hot":
        v = np.zeros(d)
        v[rng.integers(d)] = signs[0]
    elif dist == "zeros":
        v = np.zeros(d)
    elif dist == "powers_of_two":
        v = signs * 2.0 ** rng.integers(-10, 10, size=d)
    elif dist == "natural_worst":   # 0.75 * 2^e: the rounding tie, worst case of deterministic natural
        v = signs * rng.choice([0.75, 4 / 3, 1.5], size=d) * 2.0 ** rng.integers(-10, 10, size=d)
    elif dist == "wide":            # magnitudes over 60 orders of magnitude
        v = signs * 10.0 ** rng.uniform(-30, 30, size=d)
    else:
        v = rng.random(d)
    return torch.from_numpy(np.ascontiguousarray(v * scale))


def class_inequalities(classes, xx, cc, cx, err):
    """(lhs, rhs, name), lhs <= rhs, for every class that ``classes`` claims, from ||x||^2, ||C||^2, <C,x> and
    ||C-x||^2: the seed's definitions, shared by the exact and the in-expectation checks."""
    out = []
    if "B1" in classes:
        a, b = classes["B1"]["alpha"], classes["B1"]["beta"]
        out += [(a * xx, cc, f"B1 alpha={a}: alpha||x||^2 <= ||C||^2"),
                (cc, b * cx, f"B1 beta={b}: ||C||^2 <= beta<C,x>")]
    if "B2" in classes:
        g, b = classes["B2"]["gamma"], classes["B2"]["beta"]
        out += [(g * xx, cx, f"B2 gamma={g}: gamma||x||^2 <= <C,x>"),
                (cc / b, cx, f"B2 beta={b}: ||C||^2/beta <= <C,x>")]
    if "B3" in classes:
        delta = classes["B3"]["delta"]
        out.append((err, (1 - 1 / delta) * xx, f"B3 delta={delta}: ||C-x||^2 <= (1-1/delta)||x||^2"))
    if "U" in classes:   # (deterministic: an unbiased compressor is then the identity)
        out.append((cc, classes["U"]["zeta"] * xx, f"U zeta={classes['U']['zeta']}: ||C||^2 <= zeta||x||^2"))
    return out


def check_classes(classes, x, out, tol=1e-9):
    """Every inequality of the seed's definitions that ``classes`` claims, on one (x, C(x)) pair."""
    xx, cc, cx = _dot(x, x), _dot(out, out), _dot(out, x)
    err = _dot(out - x, out - x)
    failures = [f"{what}: {lhs!r} > {rhs!r}" for lhs, rhs, what in class_inequalities(classes, xx, cc, cx, err)
                if not lhs <= rhs + tol * (abs(lhs) + abs(rhs))]
    if "U" in classes and not torch.equal(out, x):   # a deterministic unbiased compressor is the identity
        failures.append("U: deterministic C(x) != x")
    return failures


DETERMINISTIC = [
    TopK(ratio=0.1), TopK(ratio=0.5), TopK(ratio=1.0), TopK(k=1), TopK(k=4),
    Natural(deterministic=True), ScaledSign(), OneBit(),
    Compose(TopK(ratio=0.2), Natural(deterministic=True)),
    Compose(TopK(ratio=0.3), ScaledSign()),
    Compose(TopK(ratio=0.3), OneBit()),
    Compose(TopK(k=2), Natural(deterministic=True)),
    Scaled(TopK(ratio=0.1), 0.5), Scaled(Natural(deterministic=True), 0.75), Scaled(OneBit(), 2.5),
    Scaled(ScaledSign(), 1.0), Scaled(Compose(TopK(ratio=0.2), Natural(deterministic=True)), 1.0),
    Identity(), Scaled(Identity(), 0.3),
]


def test_deterministic_list_is_deterministic_and_classed():
    for c in DETERMINISTIC:
        assert not c.random, c
        assert c.classes(50), c


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=vectors())
def test_class_inequalities_deterministic(x):
    d = x.numel()
    failures = []
    for c in DETERMINISTIC:
        k = _fixed_k(c)
        if k is not None and k > d:
            continue
        out = c(x, 7)
        assert out.dtype == torch.float64 and out.shape == x.shape
        assert torch.isfinite(out).all(), c
        failures += [f"{c!r} on d={d}: {f}" for f in check_classes(c.classes(d), x, out)]
    assert not failures, "\n".join(failures)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=vectors(), lam=st.floats(0.1, 3.0), base=st.sampled_from([
    TopK(ratio=0.1), TopK(ratio=0.7), Natural(deterministic=True), ScaledSign(), OneBit(), Identity(),
    Compose(TopK(ratio=0.2), Natural(deterministic=True))]))
def test_scaled_classes_hold(x, lam, base):
    d = x.numel()
    base_classes = base.classes(d)
    lams = [lam]
    for cls in ("B1", "B2"):
        if cls in base_classes:
            lams.append(1 / base_classes[cls]["beta"])
    if "U" in base_classes:
        lams.append(1 / base_classes["U"]["zeta"])
    for lam_ in lams:
        c = Scaled(base, lam_)
        classes = c.classes(d)
        assert classes == scale_classes(base_classes, lam_)
        if lam_ != lam and ("B1" in base_classes or "B2" in base_classes):
            assert "B3" in classes, (c, classes)   # lam = 1/beta makes a B3 compressor
        out = c(x, 3)
        assert torch.equal(out, base(x, 3) * lam_)
        failures = check_classes(classes, x, out)
        assert not failures, f"{c!r} on d={d}: {failures}"


def test_scale_classes_table():
    # U(zeta) -> lam C in B1(lam^2, lam zeta), B2(lam, lam zeta); (1/zeta) C in B3(zeta)
    got = scale_classes({"U": {"zeta": 4.0}}, 0.5)
    assert got == {"B1": {"alpha": 0.25, "beta": 2.0}, "B2": {"gamma": 0.5, "beta": 2.0}}
    got = scale_classes({"U": {"zeta": 4.0}}, 0.25)
    assert got["B3"] == {"delta": 4.0}
    assert scale_classes({"U": {"zeta": 4.0}}, 1.0)["U"] == {"zeta": 4.0}
    # B1(alpha, beta) -> lam C in B1(lam^2 alpha, lam beta); (1/beta) C in B3(beta^2 / alpha)
    assert scale_classes({"B1": {"alpha": 0.25, "beta": 2.0}}, 3.0) == {"B1": {"alpha": 2.25, "beta": 6.0}}
    assert scale_classes({"B1": {"alpha": 0.25, "beta": 2.0}}, 0.5)["B3"] == {"delta": 16.0}
    # B2(gamma, beta) -> lam C in B2(lam gamma, lam beta); (1/beta) C in B3(beta / gamma)
    assert scale_classes({"B2": {"gamma": 0.5, "beta": 2.0}}, 3.0) == {"B2": {"gamma": 1.5, "beta": 6.0}}
    assert scale_classes({"B2": {"gamma": 0.5, "beta": 2.0}}, 0.5)["B3"] == {"delta": 4.0}
    # both: the better (smaller) delta
    both = {"B1": {"alpha": 0.25, "beta": 2.0}, "B2": {"gamma": 0.5, "beta": 2.0}}
    assert scale_classes(both, 0.5)["B3"] == {"delta": 4.0}
    # B3 survives only lam = 1
    assert scale_classes({"B3": {"delta": 3.0}}, 1.0) == {"B3": {"delta": 3.0}}
    assert scale_classes({"B3": {"delta": 3.0}}, 0.9) == {}


def test_class_constants_of_the_table():
    d = 1000
    assert TopK(ratio=0.01).classes(d) == {"B1": {"alpha": 0.01, "beta": 1.0}, "B2": {"gamma": 0.01, "beta": 1.0},
                                          "B3": {"delta": 100.0}}
    assert RandK(ratio=0.01).classes(d) == {"U": {"zeta": 100.0}}
    assert RandK(k=10, shared=True).classes(d) == {"U": {"zeta": 100.0}}
    assert Natural().classes(d) == {"U": {"zeta": 9 / 8}}
    assert Natural(deterministic=True).classes(d)["B3"] == {"delta": 9 / 8}
    assert QSGD(4).classes(d) == {"U": {"zeta": 1 + min(d / 16, math.sqrt(d) / 4)}}
    assert Compose(TopK(ratio=0.01), Natural(deterministic=True)).classes(d) == {"B3": {"delta": 100 * 9 / 8}}
    assert Compose(TopK(ratio=0.01), Natural()).classes(d) == {"B3": {"delta": 100 / (2 - 9 / 8)}}
    assert Compose(RandK(ratio=0.01), Natural()).classes(d) == {}   # unbiased RandK first: no B3 claim


# ---- 3. statistics of random compressors --------------------------------------------------------------------

D_STAT = 50


def _stat_vector(kind):
    rng = np.random.default_rng({"normal": 1, "natural_worst": 2, "sparse": 3}[kind])
    if kind == "normal":
        v = rng.standard_normal(D_STAT) * np.where(np.arange(D_STAT) % 5 == 0, 10.0, 1.0)
    elif kind == "natural_worst":   # every element at (4/3) 2^e: E||C_nat(x)||^2 = 9/8 ||x||^2 (to rounding)
        v = rng.choice([-1.0, 1.0], size=D_STAT) * (4 / 3) * 2.0 ** rng.integers(-4, 4, size=D_STAT)
    else:
        v = rng.standard_normal(D_STAT) * (rng.random(D_STAT) < 0.3)
        v[0] = 2.0
    return torch.from_numpy(v)


STAT_N = {"normal": 20000, "natural_worst": 4000, "sparse": 4000}
N_EXPECTED = 3000   # draws for the class checks of the other random compressors


@functools.lru_cache(maxsize=None)
def _samples(c, kind, n=None):
    """C(x, seed=s) for s in range(n), stacked (n, d) in float64."""
    x = _stat_vector(kind)
    return torch.stack([c(x, s) for s in range(n or STAT_N[kind])])


UNBIASED = [RandK(ratio=0.2), RandK(k=7, shared=True), Natural(), QSGD(2), QSGD(16)]


@pytest.mark.parametrize("kind", list(STAT_N))
@pytest.mark.parametrize("c", UNBIASED, ids=repr)
def test_unbiased_and_zeta(c, kind):
    assert "U" in c.classes(D_STAT) and c.random
    x = _stat_vector(kind)
    s = _samples(c, kind)
    n = s.shape[0]
    mean, sd = s.mean(0), s.std(0)
    # per coordinate: within 5 standard errors (exact where a coordinate does not vary)
    slack = 5 * sd / math.sqrt(n) + 1e-12 * float(x.abs().max())
    assert ((mean - x).abs() <= slack).all(), ((mean - x).abs() / slack).max()
    # all together: sum of squared z-scores ~ chi^2(m); far in its tail means a bias
    varying = sd > 0
    m = int(varying.sum())
    if m:
        z2 = float((((mean - x) / (sd / math.sqrt(n)))[varying] ** 2).sum())
        assert z2 <= m + 8 * math.sqrt(2 * m), (z2, m)
    # E||C(x)||^2 <= zeta ||x||^2
    zeta, xx = c.classes(D_STAT)["U"]["zeta"], _dot(x, x)
    sq = (s ** 2).sum(1)
    assert float(sq.mean()) <= zeta * xx * (1 + 1e-9) + 5 * float(sq.std()) / math.sqrt(n)
    # the constant is attained where the theory says so
    if isinstance(c, RandK) or (isinstance(c, Natural) and kind == "natural_worst"):
        assert abs(float(sq.mean()) - zeta * xx) <= 5 * float(sq.std()) / math.sqrt(n) + 1e-9 * xx


def test_statistical_check_detects_a_bias():
    # negative control: biased RandK has mean q x, not x
    c, x = RandK(ratio=0.2, unbiased=False), _stat_vector("normal")
    s = _samples(c, "normal", N_EXPECTED)
    mean, se = s.mean(0), s.std(0) / math.sqrt(s.shape[0])
    assert ((mean - x).abs() > 5 * se).any()
    assert ((mean - 0.2 * x).abs() <= 5 * se + 1e-12).all()


def check_expected_classes(classes, x, s, n_se=5.0, tol=1e-9):
    """The inequalities of ``classes`` in expectation over the samples s (N, d) of C(x)."""
    x = x.to(torch.float64)
    xx = _dot(x, x)
    cc = (s ** 2).sum(1)
    cx = s @ x
    err = ((s - x) ** 2).sum(1)
    n = s.shape[0]
    failures = []
    for lhs, rhs, what in class_inequalities(classes, xx, cc, cx, err):   # E[lhs - rhs] <= 0 up to sampling error
        diff = lhs - rhs if torch.is_tensor(lhs) or torch.is_tensor(rhs) else torch.tensor([lhs - rhs])
        diff = diff * torch.ones(n, dtype=torch.float64)
        bound = n_se * float(diff.std()) / math.sqrt(n) + tol * (xx + float(cc.mean()))
        if float(diff.mean()) > bound:
            failures.append(f"{what}: E[lhs - rhs] = {float(diff.mean())!r} > {bound!r}")
    return failures


RANDOM_CLASSED = [
    RandK(ratio=0.2, unbiased=False), RandK(k=1, unbiased=False),
    Compose(TopK(ratio=0.2), Natural()), Compose(TopK(ratio=0.4), QSGD(8)),
    Compose(RandK(ratio=0.2, unbiased=False), ScaledSign()),
    Compose(RandK(ratio=0.4, unbiased=False), Natural(deterministic=True)),
    Scaled(RandK(ratio=0.2), 0.5), Scaled(RandK(ratio=0.2), 0.2), Scaled(QSGD(4), 1.7),
    Scaled(Natural(), 8 / 9), Scaled(RandK(ratio=0.2, unbiased=False), 1.0),
    Scaled(RandK(ratio=0.2, unbiased=False), 0.6),
] + UNBIASED


@pytest.mark.parametrize("kind", ["normal", "sparse"])
@pytest.mark.parametrize("c", RANDOM_CLASSED, ids=repr)
def test_random_compressor_classes_in_expectation(c, kind):
    classes = c.classes(D_STAT)
    assert classes and c.random
    x = _stat_vector(kind)
    s = _samples(c, kind) if c in UNBIASED else _samples(c, kind, N_EXPECTED)
    failures = check_expected_classes(classes, x, s)
    assert not failures, failures
    if isinstance(c, RandK) and not c.unbiased:   # biased RandK: a restriction, so <C, x> = ||C||^2 on every draw
        assert torch.allclose((s ** 2).sum(1), s @ x, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", list(ALL))
def test_seed_determinism(name):
    c = ALL[name]
    x = _test_vector(200, torch.float64, seed=11)
    for seed in (0, 1, 2 ** 62 + 5, 2 ** 64 - 1):
        assert torch.equal(c(x, seed), c(x, seed))
        assert torch.equal(c(x.clone(), seed), c(x, seed))
    if name in RANDOM:
        outs = [c(x, s) for s in range(5)]
        assert all(not torch.equal(outs[0], o) for o in outs[1:]), name
    else:
        assert torch.equal(c(x, 0), c(x, 12345))


def test_shared_randk_draws_the_same_indices_and_sums():
    c = RandK(ratio=0.1, shared=True)
    assert c.summable and not RandK(ratio=0.1).summable
    d = 500
    xs = [_test_vector(d, torch.float64, seed=i) + 100.0 for i in range(3)]   # no zeros
    for seed in (0, 17):
        outs = [c(x, seed) for x in xs]
        masks = [o != 0 for o in outs]
        assert all(torch.equal(masks[0], m) for m in masks) and int(masks[0].sum()) == 50
        summed = sum(K.encode(c, x, seed)[0] for x in xs)
        assert torch.allclose(K.decode(c, [summed], d, seed, torch.float64), sum(outs), rtol=1e-12, atol=0)
    assert not torch.equal(c(xs[0], 0) != 0, c(xs[0], 1) != 0)


def test_identity_payloads_sum():
    c = Identity()
    xs = [_test_vector(100, torch.float32, seed=i) for i in range(3)]
    summed = sum(K.encode(c, x)[0] for x in xs)
    assert torch.equal(K.decode(c, [summed], 100), sum(xs))


# ---- 4. parse() ------------------------------------------------------------------------------------------------

GOOD_SPECS = [
    ("topk:0.01", TopK(ratio=0.01)),
    ("topk:k=5", TopK(k=5)),
    ("topk:5", TopK(k=5)),
    ("topk:ratio=0.25", TopK(ratio=0.25)),
    ("randk:0.01,shared", RandK(ratio=0.01, shared=True)),
    ("randk:0.05,biased", RandK(ratio=0.05, unbiased=False)),
    ("randk:0.05", RandK(ratio=0.05)),
    ("randk:k=3,unbiased", RandK(k=3)),
    ("randk:0.1,shared,biased", RandK(ratio=0.1, shared=True, unbiased=False)),
    ("randk:0.1,seed=4", RandK(ratio=0.1, seed=4)),
    ("natural", Natural()),
    ("natural:det", Natural(deterministic=True)),
    ("natural:deterministic", Natural(deterministic=True)),
    ("sign", ScaledSign()),
    ("scaledsign", ScaledSign()),
    ("onebit", OneBit()),
    ("qsgd:16", QSGD(16)),
    ("qsgd", QSGD(16)),
    ("qsgd:300", QSGD(300)),
    ("qsgd:levels=8", QSGD(8)),
    ("topk:0.01+natural", Compose(TopK(ratio=0.01), Natural())),
    ("topk:0.01+natural:det", Compose(TopK(ratio=0.01), Natural(deterministic=True))),
    ("bf16", BFloat16()),
    ("topk:0.01+bf16", Compose(TopK(ratio=0.01), BFloat16())),
    ("randk:0.1,biased+sign", Compose(RandK(ratio=0.1, unbiased=False), ScaledSign())),
    ("0.5*topk:0.01", Scaled(TopK(ratio=0.01), 0.5)),
    ("2*sign", Scaled(ScaledSign(), 2.0)),
    ("none", Identity()),
    ("identity", Identity()),
    ("  TopK:0.01 ", TopK(ratio=0.01)),
    ("NATURAL:DET", Natural(deterministic=True)),
]


@pytest.mark.parametrize("spec, expected", GOOD_SPECS, ids=[s for s, _ in GOOD_SPECS])
def test_parse_good(spec, expected):
    got = parse(spec)
    assert got == expected and type(got) is type(expected)
    assert parse(got) is got   # a compressor passes through


def test_parse_nothing():
    assert parse("") is None and parse("   ") is None and parse(None) is None


BAD_SPECS = [
    ("bogus", "bogus"),
    ("topk:0", "0"),
    ("topk:0.0", "0.0"),
    ("topk:1.5", "1.5"),
    ("topk:-0.1", "-0.1"),
    ("topk:k=0", "k=0"),
    ("randk:k=0", "k=0"),
    ("randk:2.5", "2.5"),
    ("qsgd:0", "0"),
    ("qsgd:40000", "40000"),
    ("qsgd:2.5", "2.5"),
    ("natural:fast", "fast"),
    ("topk:0.01,fast", "fast"),
    ("randk:0.1,sharde", "sharde"),
    ("sign:3", "sign:3"),
    ("onebit:fast", "onebit:fast"),
    ("topk", "topk"),
    ("topk:0.01,k=5", "k=5"),
    ("topk:k=x", "k=x"),
    ("topk:0.01,bogus=1", "bogus"),
    ("0*topk:0.01", "0*topk"),
    ("-1*topk:0.01", "-1"),
    ("natural+sign", "natural"),
    ("randk:0.1,shared+natural", "shared"),
    ("topk:0.1+", "topk:0.1+"),
]


@pytest.mark.parametrize("spec, bad", BAD_SPECS, ids=[s for s, _ in BAD_SPECS])
def test_parse_bad(spec, bad):
    with pytest.raises(ValueError, match=re.escape(bad)):
        parse(spec)


@pytest.mark.parametrize("spec", [3, 0.5, ["topk:0.01"], b"topk:0.01", True])
def test_parse_non_string(spec):
    with pytest.raises(ValueError, match=re.escape(repr(spec))):
        parse(spec)


def test_constructor_validation():
    with pytest.raises(ValueError, match="ratio=0.1"):
        TopK(ratio=0.1, k=3)
    with pytest.raises(ValueError):
        TopK()
    for bad in (0, 0.0, 1.5, -0.2, True, "0.1"):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            TopK(ratio=bad)
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            RandK(k=bad)
    with pytest.raises(ValueError, match="'x'"):
        RandK(ratio=0.1, seed="x")
    for bad in (0, 32768, 2.0, True):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            QSGD(bad)
    for bad in (0, -1.0, math.inf, math.nan, True):
        with pytest.raises(ValueError, match="lam"):
            Scaled(TopK(ratio=0.1), bad)
    with pytest.raises(ValueError, match="Compose"):
        Compose(Natural(), TopK(ratio=0.1))
    with pytest.raises(ValueError, match="Compose"):
        Compose(RandK(ratio=0.1, shared=True), Natural())
    with pytest.raises(ValueError, match="Compose"):
        Compose(TopK(ratio=0.1), Compose(TopK(ratio=0.5), Natural()))


@pytest.mark.parametrize("c", [TopK(k=20), RandK(k=20), RandK(k=20, shared=True), Compose(TopK(k=20), Natural()),
                               Scaled(TopK(k=20), 2.0)], ids=repr)
def test_k_larger_than_tensor(c):
    with pytest.raises(ValueError, match="k=20"):
        c(torch.randn(10), 0)
    with pytest.raises(ValueError, match="k=20"):
        c.wire_bytes(10)
    assert c(torch.randn(20), 0).shape == (20,)


@pytest.mark.parametrize("name", list(ALL))
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
def test_non_floating_input_raises(name, dtype):
    with pytest.raises(TypeError, match=str(dtype).replace("torch.", "")):
        ALL[name](torch.ones(1000, dtype=dtype), 0)


def test_numpy_input():
    x = _test_vector(100, torch.float64, seed=4).numpy()
    for c in (TopK(ratio=0.1), Natural(), QSGD(4)):
        out = c(x, 3)
        assert isinstance(out, np.ndarray) and out.dtype == np.float64
        assert np.array_equal(out, c(torch.from_numpy(x), 3).numpy())
    with pytest.raises(TypeError):
        TopK(ratio=0.1)([1.0, 2.0], 0)


# ---- 5. half-precision inputs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", list(ALL))
def test_half_precision(name, dtype):
    c = ALL[name]
    x = _test_vector(1000, torch.float32, seed=21).to(dtype).view(20, 50)
    out = c(x, 5)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, c(x.float(), 5).to(dtype))
    assert K.compute_dtype(dtype) == torch.float32
    assert K.compute_dtype(torch.float64) == torch.float64


# ---- 6. natural compression ----------------------------------------------------------------------------------

def _natural_input(dtype):
    g = torch.Generator().manual_seed(99)
    x = torch.randn(4000, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-8, 8, (4000,), generator=g)
    x[::7] = 0.0
    x[3::11] = -0.0
    x[5::13] = 2.0 ** torch.randint(-20, 20, (len(x[5::13]),), generator=g).double()   # exact powers of two
    x[6::17] = 0.75 * 2.0 ** torch.randint(-20, 20, (len(x[6::17]),), generator=g).double()   # rounding ties
    return x.to(dtype)


def _is_power_of_two(t):
    mantissa, _ = torch.frexp(t.abs())
    return mantissa == 0.5


@pytest.mark.parametrize("dtype", FLOATS, ids=["fp32", "fp64"])
def test_natural_deterministic(dtype):
    x = _natural_input(dtype)
    out = Natural(deterministic=True)(x)
    zero = x == 0
    assert (out[zero] == 0).all()
    assert (out[~zero] != 0).all()
    assert _is_power_of_two(out[~zero]).all()
    assert torch.equal(torch.sign(out), torch.sign(x))
    ratio = out[~zero].double() / x[~zero].double()
    assert (ratio >= 2 / 3).all() and (ratio <= 4 / 3).all(), (ratio.min(), ratio.max())
    # the nearest power of two in value (ties, 0.75 * 2^e, go up)
    lower = torch.ldexp(torch.ones_like(x), torch.frexp(x.abs())[1] - 1)
    a, lo = x.abs()[~zero].double(), lower[~zero].double()
    want = torch.where(a - lo >= 2 * lo - a, 2 * lo, lo)
    assert torch.equal(out.abs()[~zero].double(), want)
    # exact powers of two are kept exactly
    p2 = _is_power_of_two(x) & ~zero
    assert torch.equal(out[p2], x[p2])


@pytest.mark.parametrize("dtype", FLOATS, ids=["fp32", "fp64"])
def test_natural_unbiased_rounds_to_a_neighbouring_power(dtype):
    x = _natural_input(dtype)
    zero = x == 0
    lower = torch.ldexp(torch.ones_like(x), torch.frexp(x.abs())[1] - 1)
    seen_up = seen_down = False
    for seed in range(5):
        out = Natural()(x, seed)
        assert (out[zero] == 0).all()
        assert torch.equal(torch.sign(out), torch.sign(x))
        assert _is_power_of_two(out[~zero]).all()
        up, down = out.abs() == 2 * lower, out.abs() == lower
        assert (up | down)[~zero].all()
        seen_up, seen_down = seen_up or bool(up[~zero].any()), seen_down or bool(down[~zero].any())
        p2 = _is_power_of_two(x) & ~zero
        assert torch.equal(out[p2], x[p2])   # exact powers of two never move
    assert seen_up and seen_down


def test_natural_edge_cases():
    for dtype in FLOATS:
        assert torch.equal(Natural(deterministic=True)(torch.zeros(5, dtype=dtype)), torch.zeros(5, dtype=dtype))
        assert torch.equal(Natural()(torch.zeros(5, dtype=dtype), 3), torch.zeros(5, dtype=dtype))
    # float32 subnormals are powers of two too
    x = torch.tensor([1e-40, -3e-41, 1e-39, 1.0e-45], dtype=torch.float32)
    out = Natural(deterministic=True)(x)
    assert _is_power_of_two(out).all() and torch.equal(torch.sign(out), torch.sign(x))
    # documented: elements more than 2^126 times smaller than the largest are flushed to zero
    x = torch.tensor([1.0, 2.0 ** -120, -(2.0 ** -130), 2.0 ** 300], dtype=torch.float64)
    out = Natural(deterministic=True)(x)
    assert out.tolist() == [0.0, 0.0, 0.0, 2.0 ** 300]
    x = torch.tensor([1.0, 2.0 ** -120, -(2.0 ** -125)], dtype=torch.float64)
    assert torch.equal(Natural(deterministic=True)(x), x)
    # float64 beyond float32's range
    x = torch.tensor([3.0 * 2.0 ** 500, -(2.0 ** 400)], dtype=torch.float64)
    assert Natural(deterministic=True)(x).tolist() == [2.0 ** 502, -(2.0 ** 400)]


# ---- QSGD specifics ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("levels", [1, 2, 16, 127, 128, 300, 32767])
@pytest.mark.parametrize("dtype", FLOATS, ids=["fp32", "fp64"])
def test_qsgd_levels(levels, dtype):
    c = QSGD(levels)
    x = _test_vector(500, dtype, seed=levels)
    norm, signed = K.encode(c, x, 9)
    assert signed.dtype == (torch.int8 if levels <= 127 else torch.int16)
    assert int(signed.abs().max()) <= levels
    nonzero = signed != 0
    assert torch.equal(torch.sign(signed[nonzero].to(dtype)), torch.sign(x[nonzero]))
    # a one-element tensor sits exactly on the top level: no overflow of the level's integer type
    for v in (3.5, -0.25):
        one = torch.tensor([v], dtype=dtype)
        assert K.encode(c, one, 0)[1].tolist() == [levels if v > 0 else -levels]
        assert torch.equal(c(one, 0), one)
    assert torch.equal(c(torch.zeros(7, dtype=dtype), 1), torch.zeros(7, dtype=dtype))


def test_qsgd_float32_large_values():
    """||x||^2 overflows float32 from |x| ~ 1e19; the norm must not."""
    x = _test_vector(100, torch.float32, seed=1) * 1e20
    assert torch.isfinite(QSGD(16)(x, 0)).all()


# ---- other compressor specifics --------------------------------------------------------------------------------

def test_topk_keeps_the_largest():
    x = torch.tensor([0.5, -3.0, 2.0, 0.1, -0.2, 1.0], dtype=torch.float64)
    assert TopK(k=2)(x).tolist() == [0.0, -3.0, 2.0, 0.0, 0.0, 0.0]
    assert TopK(ratio=0.5)(x).tolist() == [0.0, -3.0, 2.0, 0.0, 0.0, 1.0]
    assert torch.equal(TopK(ratio=1.0)(x), x)


def test_sign_and_onebit_values():
    x = torch.tensor([1.0, -2.0, 0.0, 5.0], dtype=torch.float64)
    assert ScaledSign()(x).tolist() == [2.0, -2.0, 2.0, 2.0]          # ||x||_1 / d = 8 / 4; zero counts positive
    assert OneBit()(x).tolist() == [2.0, -2.0, 2.0, 2.0]              # positive group mean (1 + 0 + 5) / 3
    x = torch.tensor([1.0, -2.0, -4.0, 5.0], dtype=torch.float64)
    assert OneBit()(x).tolist() == [3.0, -3.0, -3.0, 3.0]
    assert OneBit()(torch.tensor([-1.0, -3.0])).tolist() == [-2.0, -2.0]   # an empty group


def test_randk_values():
    x = torch.arange(1.0, 21.0, dtype=torch.float64)
    out = RandK(k=5)(x, 3)
    kept = out != 0
    assert int(kept.sum()) == 5 and torch.equal(out[kept], x[kept] * 4)
    out_b = RandK(k=5, unbiased=False)(x, 3)
    assert torch.equal(out_b != 0, kept) and torch.equal(out_b[kept], x[kept])


def test_warmup_schedule_falls_geometrically_to_the_ratio():
    from hvd_compress.compressors import Config, check_warmup, parse
    for spec in ["topk:0.01", "randk:0.01,shared", "topk:0.01+natural", "0.5*topk:0.01"]:
        worker = parse(spec)
        config = Config(worker, True, None, warmup=check_warmup(100, worker))
        ratios = [config.worker_at(s) for s in range(101)]
        kept = [getattr(getattr(c, "compressor", c), "first", getattr(c, "compressor", c)).ratio for c in ratios]
        assert kept[0] == 0.25 and kept[50] == pytest.approx(0.05) and ratios[100] is worker
        assert all(a > b for a, b in zip(kept, kept[1:]))
        assert type(ratios[10]) is type(worker) and repr(ratios[10]) != repr(worker)



def test_warmup_holds_for_the_server_pass():
    """A DoubleSqueeze server that sparsifies by ratio= follows the worker's schedule (else the root would squeeze
    the warm-up's denser average back to its own ratio); a "dense" warm-up sends the server pass uncompressed
    too; other server compressors stay as they are."""
    from hvd_compress.compressors import Config, Identity, check_warmup, parse
    worker = parse("topk:0.01")
    for spec, first in [("topk:0.05", 0.25), ("randk:0.02+natural", 0.5)]:
        server = parse(spec)
        config = Config(worker, True, server, warmup=check_warmup((100, first), worker))
        servers = [config.server_at(s) for s in range(101)]
        kept = [getattr(c, "first", c).ratio for c in servers]
        final = getattr(server, "first", server).ratio
        assert kept[0] == first and kept[50] == pytest.approx(first * (final / first) ** 0.5)
        assert all(a > b for a, b in zip(kept, kept[1:])) and servers[100] is server
    onebit = parse("onebit")
    assert Config(worker, True, onebit, warmup=check_warmup(100, worker)).server_at(0) is onebit
    dense = Config(worker, True, onebit, warmup=check_warmup((10, "dense"), worker))
    assert isinstance(dense.server_at(9), Identity) and dense.server_at(10) is onebit
    assert Config(worker, True, None, warmup=check_warmup(100, worker)).server_at(0) is None


def test_warmup_at_a_step_a_framework_looks_up():
    """``Config.in_force_by``: the compressors whose k, for any d, is what ``look_up`` picks of the schedule's
    (TensorFlow gathers it at the step in its graph): the k of ``worker_at`` / ``server_at`` at that step."""
    from hvd_compress.compressors import Config, check_warmup, parse, sparsifier_of
    worker = parse("topk:0.01+natural")
    for server in [parse("0.5*randk:0.02"), parse("onebit"), None]:
        config = Config(worker, True, server, warmup=check_warmup(20, worker))
        for step in (0, 7, 19, 20, 25):
            in_force = config.in_force_by(lambda ks: ks[min(step, 20)])
            for c, expected in zip(in_force, (config.worker_at(step), config.server_at(step))):
                if expected is None or not expected.sparsifies:
                    assert c is (server if expected is not None else None)
                    continue
                assert type(c) is type(expected)
                for d in (1, 50, 1000, 70_000):
                    assert sparsifier_of(c).k_for(d) == sparsifier_of(expected).k_for(d)
                    assert c.wire_layout(d) == expected.wire_layout(d)
    assert Config(worker, True, None).in_force_by(None) == (worker, None)


def test_a_wrapped_compressor_keeps_its_seed():
    """seed= of a RandK inside Scaled or Compose changes the draws as it does alone (it was ignored)."""
    from hvd_compress.compressors import Compose, Natural, RandK, Scaled
    from hvd_compress.seeds import server_seed, worker_seed
    for wrap in (lambda c: Scaled(c, 0.5), lambda c: Compose(c, Natural())):
        seeded, plain = wrap(RandK(ratio=0.1, seed=5)), wrap(RandK(ratio=0.1))
        assert worker_seed(seeded, 0, 3, 1, "w") == worker_seed(RandK(ratio=0.1, seed=5), 0, 3, 1, "w")
        assert worker_seed(seeded, 0, 3, 1, "w") != worker_seed(plain, 0, 3, 1, "w")
        assert server_seed(seeded, 0, 3, "w") != server_seed(plain, 0, 3, "w")
