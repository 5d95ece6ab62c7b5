"""The fused CPU kernels (hvd_compress/csrc, hvd_compress/fused.py) behind ``kernels.step``, ``encode``,
``decode`` and ``decode_mean``: self-consistency (step's payload and error are exactly encode's and
x - decode's), the statistics, decode_mean against the torch-ops formula, and the C path against the
pure-torch path (HVD_COMPRESS_FUSED=0): bitwise for element-wise compressors (one random stream for both),
to rounding for the reductions (a scale, a mean, a norm)."""
import math
import shutil

import pytest
import torch

from hvd_compress import compressors as C
from hvd_compress.kernels import topk_sample
from hvd_compress.seeds import hash_keys
from hvd_compress import fused
from hvd_compress.torch import kernels as K

SPECS = ["topk:0.3", "topk:k=2", "randk:0.3", "randk:0.3,biased", "randk:0.3,shared", "natural", "natural:det",
         "sign", "onebit", "qsgd:4", "qsgd:200", "topk:0.3+natural", "topk:0.3+bf16", "0.5*topk:0.3", "0.5*sign",
         "none"]
SIZES = [0, 1, 7, 1000, 300_000]     # 300000: TopK's sampled-threshold path
DTYPES = [torch.float32, torch.float64]
SEED = (987654321, 12)
REDUCTIONS = {"sign", "onebit", "qsgd:4", "qsgd:200", "0.5*sign"}


@pytest.fixture(scope="module", autouse=True)
def library():
    if fused.lib() is None:
        if shutil.which(fused._compiler()) is None:
            pytest.skip("no C compiler here: the fused kernels cannot be built")
        pytest.fail("the fused kernels did not build, though there is a C compiler (see the warning)")


def _vector(d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(d, generator=g, dtype=torch.float64) * torch.rand(d, generator=g, dtype=torch.float64)
            * 3).to(dtype)


def _equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8) if a.numel() else a,
                                                                      b.view(torch.uint8) if b.numel() else b)


def _encodable(c, d, dtype):
    try:
        K.encode(c, torch.zeros(d, dtype=dtype), SEED)
        return True
    except (ValueError, RuntimeError, IndexError, ZeroDivisionError):
        return False


CASES = [(s, d, dt) for s in SPECS for d in SIZES for dt in DTYPES]


@pytest.mark.parametrize("spec,d,dtype", CASES, ids=[f"{s}-{d}-{str(dt)[6:]}" for s, d, dt in CASES])
def test_step_equals_encode_and_decode(spec, d, dtype):
    c = C.parse(spec)
    if not _encodable(c, d, dtype):
        with pytest.raises((ValueError, RuntimeError, IndexError, ZeroDivisionError)):
            K.step(c, torch.zeros(d, dtype=dtype), None, torch.empty(d, dtype=dtype), SEED)
        return
    g, e = _vector(d, dtype, 1), _vector(d, dtype, 2) * 0.5
    g0, e0 = g.clone(), e.clone()
    for e_in in (None, e):
        x = g if e_in is None else g + e_in
        parts = K.encode(c, x, SEED)
        decoded = K.decode(c, parts, d, SEED, dtype)
        expected_error = x - decoded
        assert _equal(K.apply(c, x, SEED), decoded)
        for with_out in (False, True):
            e_out = torch.full((d,), 7.0, dtype=dtype) if with_out else None
            got, stats = K.step(c, g, e_in, e_out, SEED)
            assert len(got) == len(parts) and all(_equal(a, b) for a, b in zip(got, parts)), spec
            if with_out:
                assert _equal(e_out, expected_error)
            assert stats.dtype == torch.float64 and stats.shape == (3,)
            r, xd = expected_error.double(), x.double()
            assert stats[0].item() == pytest.approx(r.dot(r).item(), rel=1e-6, abs=1e-12)
            assert stats[1].item() == pytest.approx(xd.dot(xd).item(), rel=1e-6, abs=1e-12)
            assert stats[2].item() == 1.0
    assert _equal(g, g0) and _equal(e, e0)


def _rows(c, d, dtype, n):
    rows = []
    for j in range(n):
        packed = K.pack(c, K.encode(c, _vector(d, dtype, 10 + j), (SEED[0], SEED[1] + j)), d)
        buf = torch.empty(packed.numel() + 1, dtype=torch.uint8)[1:]    # an allgather row may start unaligned
        buf.copy_(packed)
        rows.append(buf)
    return rows


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 7, 1000, 4099, 300_000])   # 4099: 8 at a time, then a tail of 3
def test_decode_mean_is_the_torch_formula(spec, dtype, d):
    _check_decode_mean(spec, dtype, d, (1, 2, 3, 4, 5, 9))   # 1-4 rows: the C kernel's register paths


@pytest.mark.parametrize("spec", ["sign", "onebit", "natural", "natural:det", "qsgd:4", "qsgd:200", "0.5*sign"])
def test_decode_mean_past_the_caches(spec):
    """An output large enough for streaming stores (8 MB), 2 and 4 rows."""
    _check_decode_mean(spec, torch.float32, 2_100_003, (2, 4))


@pytest.mark.parametrize("spec", ["natural", "natural:det", "qsgd:16"])
@pytest.mark.parametrize("scale", [1e-30, 1e-3, 1e25])
def test_statistics_at_any_magnitude(spec, scale):
    """The statistics are sums of squares in double over several blocks: squares of 1e-30 would vanish in
    float, those of 1e25 overflow."""
    c, d = C.parse(spec), 3 * 2048 + 5
    g, e = _vector(d, torch.float32, 1) * scale, _vector(d, torch.float32, 2) * scale * 0.5
    e_out = torch.empty_like(g)
    _, stats = K.step(c, g, e, e_out, SEED)
    r, xd = e_out.double(), (g + e).double()
    assert stats[0].item() == pytest.approx(r.dot(r).item(), rel=1e-6, abs=0)
    assert stats[1].item() == pytest.approx(xd.dot(xd).item(), rel=1e-6, abs=0)


def _kernel_outputs(specs):
    """Each spec's step (payload, new error, statistics) and decode_mean of 2 rows, over whole blocks, a tail,
    a block that raises the largest value seen so far, zeros of both signs and values too small to code."""
    out = {}
    for spec in specs:
        c = C.parse(spec)
        for d, scale in ((5 * 2048 + 7, 1.0), (40_000, 1e-3)):
            g, e = _vector(d, torch.float32, 3) * scale, _vector(d, torch.float32, 4) * scale * 0.5
            g[3 * 2048 + 5] = 40.0 * scale
            for start, step, value in ((0, 97, 0.0), (5, 89, -0.0), (7, 101, 2.0 ** -125), (9, 103, -2.0 ** -125)):
                g[start::step], e[start::step] = value, value
            e_out = torch.empty_like(g)
            parts, stats = K.step(c, g, e, e_out, SEED)
            rows = [K.pack(c, K.encode(c, _vector(d, torch.float32, 5 + j) * scale, (SEED[0], j)), d)
                    for j in range(2)]
            out[(spec, d)] = [*parts, e_out, stats, K.decode_mean(c, rows, d, SEED, torch.float32)]
    return out


@pytest.mark.skipif("avx512f" not in fused._cpu_flags().split(), reason="this CPU has no AVX-512")
def test_avx512_kernels_equal_the_avx2_kernels(monkeypatch):
    """Where the CPU has AVX-512 some kernels have a second version (16 floats an instruction): a build
    without it (the AVX2 versions) gives the same bits for every compressor."""
    specs = SPECS + ["qsgd:16", "0.5*natural"]
    wide, wide_path = _kernel_outputs(specs), fused.lib().path
    monkeypatch.setattr(fused, "FLAGS", fused.FLAGS + ["-mno-avx512f"])
    monkeypatch.setattr(fused, "_lib", None)
    assert fused.lib().path != wide_path
    narrow = _kernel_outputs(specs)
    for key, outputs in wide.items():
        assert len(outputs) == len(narrow[key]) and all(map(_equal, outputs, narrow[key])), key


@pytest.mark.parametrize("spec", ["natural", "0.5*natural"])
@pytest.mark.parametrize("d", [37, 4099])
def test_natural_decode_mean_of_small_values_and_any_byte(spec, d):
    """Rows whose top is below 0 (gradients smaller than 1), and a row of arbitrary bytes (codes the encoder
    never writes: exponents below the normal range), through the C kernel's 16-lane path and its tables."""
    c, dtype = C.parse(spec), torch.float32
    for n in (1, 2, 3):
        rows = [K.pack(c, K.encode(c, _vector(d, dtype, 20 + j) * 1e-3, (SEED[0], j)), d) for j in range(n)]
        top, _ = K.unpack(c, rows[-1], d, dtype)
        rows[-1] = K.pack(c, [top, torch.randint(0, 256, (d,), dtype=torch.uint8,
                                                 generator=torch.Generator().manual_seed(d + n))], d)
        decoded = [K.decode(c, K.unpack(c, row, d, dtype), d, SEED, dtype) for row in rows]
        assert (decoded[-1] != 0).any() and (decoded[-1].abs() < torch.finfo(dtype).tiny).any()   # subnormals
        total = decoded[0]
        for dec in decoded[1:]:
            total = total + dec
        assert _equal(K.decode_mean(c, rows, d, SEED, dtype), total / n), (spec, d, n)


def test_natural_decode_mean_at_the_edge_of_the_normal_range():
    """Codes of magnitude top + 128 (exponent field 0: a subnormal the 16-bit lanes cannot write) and top + 127
    (the least normal) among valid ones, in rows whose top is below 0: the mean is the decoded rows' sum / n."""
    c, d, dtype = C.parse("natural"), 600, torch.float32
    parts = [K.encode(c, _vector(d, dtype, 30 + j) * 1e-3, (SEED[0], j)) for j in range(2)]
    base = int(parts[1][0].item()) + 128
    assert 1 <= base <= 127
    for at, byte in ((300, base), (301, (base - 1) | 128), (20, base | 128)):
        codes = [p[1].clone() for p in parts]
        codes[0][at], codes[1][at] = 0, byte   # alone at its place: a subnormal would vanish beside a normal value
        rows = [K.pack(c, [p[0], code], d) for p, code in zip(parts, codes)]
        decoded = [K.decode(c, K.unpack(c, row, d, dtype), d, SEED, dtype) for row in rows]
        assert decoded[1][at] != 0
        assert _equal(K.decode_mean(c, rows, d, SEED, dtype), (decoded[0] + decoded[1]) / 2), (at, byte)


@pytest.mark.parametrize("order", ["increasing", "decreasing", "repeated"])
def test_sparse_decode_mean_of_rows_in_any_order(order):
    """The C kernel walks rows whose indices do not decrease (as TopK and RandK send them) with a cursor each,
    and sorts the entries of other rows (from a payload made elsewhere) by block first: both equal index_add_
    row by row, then / n."""
    c, d = C.parse("topk:0.3"), 5000
    rows, total = [], torch.zeros(d)
    for j in range(3):
        idx, values = K.encode(c, _vector(d, torch.float32, 40 + j), SEED)
        if order == "decreasing" and j == 1:
            idx, values = idx.flip(0), values.flip(0)
        if order == "repeated":
            idx = torch.cat([idx[:10], idx[10:].clone().fill_(idx[10].item())])
        rows.append(K.pack(c, [idx, values], d))
        total.index_add_(0, idx.long(), values)
    assert torch.equal(K.decode_mean(c, rows, d, SEED, torch.float32), total / 3)


def _check_decode_mean(spec, dtype, d, row_counts):
    c = C.parse(spec)
    if not _encodable(c, d, dtype):
        return
    for n in row_counts:
        rows = _rows(c, d, dtype, n)
        decoded = [K.decode(c, K.unpack(c, row, d, dtype), d, SEED, dtype) for row in rows]
        total = decoded[0]
        for dec in decoded[1:]:
            total = total + dec
        expected = total / n
        got = K.decode_mean(c, rows, d, SEED, dtype)
        if isinstance(c, (C.TopK, C.RandK)) and not c.summable:   # index_add_ from +0.0: -0.0 may become +0.0
            assert torch.equal(got, expected)
        else:
            assert _equal(got, expected), spec
        out = torch.full((d,), 3.0, dtype=dtype)
        assert K.decode_mean(c, rows, d, SEED, dtype, out=out) is out and torch.equal(out, got)


def _torch_path(fn, *args):
    with fused.disabled():
        assert fused.lib() is None
        return fn(*args)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [7, 1000, 300_000])
def test_c_path_matches_torch_path(spec, dtype, d):
    c = C.parse(spec)
    if not _encodable(c, d, dtype):
        return
    x = _vector(d, dtype, 5)      # distinct values: TopK keeps one set
    ours, theirs = K.encode(c, x, SEED), _torch_path(K.encode, c, x, SEED)
    assert [p.dtype for p in ours] == [p.dtype for p in theirs]
    dec, tdec = K.decode(c, ours, d, SEED, dtype), _torch_path(K.decode, c, theirs, d, SEED, dtype)
    e = torch.empty_like(x)
    (tparts, tstats) = _torch_path(K.step, c, x, None, e, SEED)
    assert all(_equal(a, b) for a, b in zip(tparts, theirs))
    if spec not in REDUCTIONS:
        assert all(_equal(a, b) for a, b in zip(ours, theirs)), spec
        assert _equal(dec, tdec)
    else:
        rtol = 1e-5 if dtype == torch.float32 else 1e-12
        assert torch.allclose(ours[0], theirs[0], rtol=rtol, atol=0)
        if spec.startswith("qsgd"):   # a level may round the other way where the norms differ in the last bit
            diff = (ours[1].long() - theirs[1].long()).abs()
            assert diff.max() <= 1 and diff.float().mean() < 1e-3
        else:
            assert _equal(ours[1], theirs[1])
        assert torch.allclose(dec, tdec, rtol=rtol, atol=rtol * dec.abs().max().item())
    # the same decoded values either way, given the same payload
    assert torch.allclose(_torch_path(K.decode, c, ours, d, SEED, dtype), dec, rtol=1e-6 if dtype == torch.float32
                          else 1e-14, atol=0)
    _, stats = K.step(c, x, None, torch.empty_like(x), SEED)
    assert torch.allclose(stats, tstats, rtol=1e-4 if spec.startswith("qsgd") else 1e-6)


def test_uniform_stream_is_the_c_stream():
    lib = fused.lib()
    for seed in [(1, 2), (2 ** 31 - 1, 2 ** 40 + 3), 5, 2 ** 64 - 1]:
        h = torch.empty(1000, dtype=torch.int32)
        k1, k2 = hash_keys(seed)
        lib.dll.hvdc_hash(h.data_ptr(), 1000, k1, k2)
        assert torch.equal(h.long() & 0xFFFFFFFF, K._hash32(1000, seed, "cpu"))
    u = K._uniform(torch.empty(100_000, dtype=torch.float64), SEED)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    assert not torch.equal(u, K._uniform(u, (SEED[0], SEED[1] + 1)))


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_non_finite_input_is_reported(spec, dtype, bad):
    c = C.parse(spec)
    for d in (1000, 300_000):
        g = _vector(d, dtype, 3)
        g[d // 3] = bad
        e_out = torch.empty_like(g)
        parts, stats = K.step(c, g, torch.zeros_like(g), e_out, SEED)
        assert stats[2].item() == 0.0
        assert [p.numel() for p in parts] == [n for _, n in c.layout(d)]


@pytest.mark.parametrize("spec", ["natural", "natural:det", "sign", "onebit", "qsgd:4", "topk:0.3"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_subnormal_input(spec, dtype):
    c = C.parse(spec)
    tiny = torch.finfo(dtype).tiny
    x = _vector(1000, dtype, 4)
    x[::7] = tiny / 4            # subnormals
    x[3] = 0.0
    e_out = torch.empty_like(x)
    parts, stats = K.step(c, x, None, e_out, SEED)
    decoded = K.decode(c, parts, x.numel(), SEED, dtype)
    assert all(_equal(a, b) for a, b in zip(parts, K.encode(c, x, SEED)))
    assert _equal(e_out, x - decoded)
    assert stats[2].item() == 1.0
    if spec.startswith("natural"):    # the C kernel hands subnormals to the general path: same as torch's
        theirs = _torch_path(K.encode, c, x, SEED)
        assert all(_equal(a, b) for a, b in zip(parts, theirs))


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("HVD_COMPRESS_FUSED", "0")
    assert fused.lib() is None
    x = _vector(100, torch.float32, 6)
    parts, stats = K.step(C.parse("sign"), x, None, torch.empty_like(x), SEED)
    assert stats[2].item() == 1.0


def test_library_is_cached_by_source_flags_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("HVD_COMPRESS_CACHE", str(tmp_path))
    path = fused.library_path()
    assert path.parent == tmp_path and path.name.startswith("hvdc_fused_") and path.suffix == ".so"
    monkeypatch.setattr(fused, "_cpu_flags", lambda: "some other cpu")
    assert fused.library_path() != path


def _growing(d, dtype):
    """Values whose magnitude grows along the tensor by many powers of two: the one-pass Natural kernel codes
    early blocks with a smaller largest exponent than the final one (and some end up too small to code)."""
    x = _vector(d, dtype, 8)
    scale = torch.logspace(-45 if dtype == torch.float64 else -30, 5, d, base=2.0 ** 4, dtype=torch.float64)
    x = (x.double() * scale).to(dtype)
    x[::97] = 0.0
    return x


@pytest.mark.parametrize("spec", ["natural", "natural:det"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [5000, 70_001])
def test_natural_one_pass_with_growing_top(spec, dtype, d):
    c = C.parse(spec)
    x = _growing(d, dtype)
    g, e = x * 0.75, x * 0.25
    xs = g + e
    theirs = _torch_path(K.encode, c, xs, SEED)
    e_out = torch.empty_like(xs)
    parts, stats = K.step(c, g, e, e_out, SEED)
    assert all(_equal(a, b) for a, b in zip(parts, theirs))
    assert (parts[1] & 127).eq(0).logical_and(xs != 0).any()      # some values too small to code
    decoded = _torch_path(K.decode, c, theirs, d, SEED, dtype)
    assert _equal(e_out, xs - decoded)
    r = (xs - decoded).double()
    assert stats[0].item() == pytest.approx(r.dot(r).item(), rel=1e-6)


@pytest.mark.parametrize("spec", ["randk:0.01", "randk:0.01,shared", "randk:0.01,biased", "topk:0.01",
                                  "topk:0.01+natural", "randk:0.01+natural:det", "scaled topk:0.01+natural"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_small_k_matches_torch_path(spec, dtype):
    """k << d: RandK's index draw (first distinct of uniform draws) and the sparse decode_mean; compositions
    (the sparsifier's one pass, then the second stage on the kept values), also scaled."""
    scaled = spec.startswith("scaled ")
    c, d = C.parse(spec.removeprefix("scaled ")), 300_000
    c = C.Scaled(c, 0.5) if scaled else c
    g, e = _vector(d, dtype, 1), _vector(d, dtype, 2) * 0.5
    e_out = torch.empty_like(g)
    parts, stats = K.step(c, g, e, e_out, SEED)
    t_out = torch.empty_like(g)
    tparts, tstats = _torch_path(K.step, c, g, e, t_out, SEED)
    assert all(_equal(a, b) for a, b in zip(parts, tparts))
    if spec.startswith("randk") and not c.summable:   # drawn in increasing order, as the kernels walk them
        assert bool((parts[0][1:] > parts[0][:-1]).all())
    assert _equal(e_out, t_out)
    assert torch.allclose(stats, tstats, rtol=1e-6)
    rows = _rows(c, d, dtype, 3)
    for n in (1, 2, 3):
        got = K.decode_mean(c, rows[:n], d, SEED, dtype)
        want = _torch_path(K.decode_mean, c, rows[:n], d, SEED, dtype)
        assert _equal(got, want) if c.summable else torch.equal(got, want)


@pytest.mark.parametrize("d", [1000, 300_000])     # TopK's whole-tensor path, its sampled-threshold path
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", ["topk:0.01", "topk:0.01+natural"])
def test_topk_ties_take_the_first_indices_on_every_path(spec, d, dtype):
    """Magnitudes on a grid, so that many equal the k-th largest: every path keeps those above it and, of
    those equal to it, the first ones, in increasing index order (a composition's second stage draws for the
    values in that order, as TensorFlow's kernel sorts them)."""
    c = C.parse(spec)
    k = (c.first if isinstance(c, C.Compose) else c).k_for(d)
    x = torch.round(torch.randn(d, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 4).to(dtype) / 4
    a = x.abs()
    if d == 300_000:   # the sampled threshold keeps few enough candidates for the C selection (kernels.step)
        stride, rank = topk_sample(d, k)
        threshold = torch.kthvalue(a[::stride], rank).values
        assert k <= int((a >= threshold).sum()) <= 3 * k + 1024
    e_out, t_out = torch.empty_like(x), torch.empty_like(x)
    parts, _ = K.step(c, x, None, e_out, SEED)
    tparts, _ = _torch_path(K.step, c, x, None, t_out, SEED)
    assert all(_equal(a, b) for a, b in zip(parts, tparts)) and _equal(e_out, t_out)
    idx = parts[0].long()
    assert idx.numel() == k and bool((idx[1:] > idx[:-1]).all())
    t = a[idx].min()
    assert int((a > t).sum()) < k < int((a >= t).sum())          # the boundary splits a run of equal magnitudes
    kept = torch.zeros(d, dtype=torch.bool)
    kept[idx] = True
    assert bool(kept[a > t].all())
    tied = torch.nonzero(a == t).squeeze(1)
    assert torch.equal(kept[tied], torch.arange(tied.numel()) < k - int((a > t).sum()))


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 7, 1000, 300_000])
def test_step_packed_is_pack_of_step(spec, dtype, d):
    c = C.parse(spec)
    if not _encodable(c, d, dtype):
        return
    g, e = _vector(d, dtype, 1), _vector(d, dtype, 2) * 0.5
    for e_in in (None, e):
        for with_out in (False, True):
            e_out, e_ref = (torch.empty_like(g), torch.empty_like(g)) if with_out else (None, None)
            parts, stats = K.step(c, g, e_in, e_ref, SEED)
            packed, pstats = K.step_packed(c, g, e_in, e_out, SEED)
            assert packed.dtype == torch.uint8 and _equal(packed, K.pack(c, parts, d)), spec
            assert torch.equal(pstats, stats)
            if with_out:
                assert _equal(e_out, e_ref)
            got = K.unpack(c, packed, d, dtype)
            assert all(_equal(a, b) for a, b in zip(got, parts))


@pytest.mark.parametrize("spec", ["sign", "onebit", "natural", "natural:det", "qsgd:4", "0.5*natural"])
@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_step_packed_non_finite_or_subnormal(spec, bad):
    c = C.parse(spec)
    for value in (bad, torch.finfo(torch.float32).tiny / 4):
        g = _vector(1000, torch.float32, 3)
        g[333] = value
        e_out, e_ref = torch.empty_like(g), torch.empty_like(g)
        parts, stats = K.step(c, g, torch.zeros_like(g), e_ref, SEED)
        packed, pstats = K.step_packed(c, g, torch.zeros_like(g), e_out, SEED)
        assert _equal(packed, K.pack(c, parts, 1000)) and torch.equal(pstats.isnan(), stats.isnan())
        assert torch.equal(pstats.nan_to_num(), stats.nan_to_num())
        assert _equal(e_out, e_ref)


def test_indices_from_the_wire_as_torch_expands_them():
    """A sparsifier's indices, from their low 16 bits and block counts: the C loop gives torch's int32s."""
    gen = torch.Generator().manual_seed(5)
    for d, k in [(7, 3), (2 ** 16, 100), (2 ** 16 + 1, 1), (5 * 2 ** 16 + 3, 1000), (3_000_000, 30_000)]:
        idx = torch.randperm(d, generator=gen)[:k].sort().values.to(torch.int32)
        if d > 2 ** 17:   # a block without an index
            idx = idx[(idx < 2 ** 16) | (idx >= 2 ** 17)]
        low, below = K.index_to_wire(idx, d)
        got = K.index_from_wire(low, below)
        with fused.disabled():
            want = K.index_from_wire(low, below)
        assert got.dtype == want.dtype == torch.int32 and torch.equal(got, want) and torch.equal(got, idx), d


@pytest.mark.parametrize("bad", [None, math.inf, math.nan])
def test_topk_writes_its_payload_into_out(bad):
    """TopK's one-pass path (large tensors) writes indices and values straight into ``out``; a non-finite
    x sends it to the general path, which fills ``out`` as well."""
    c, d = C.parse("topk:0.01"), 300_000
    g, e = _vector(d, torch.float32, 1), _vector(d, torch.float32, 2) * 0.5
    if bad is not None:
        g[4321] = bad
    out = torch.full((K.packed_nbytes(c, d, torch.float32),), 255, dtype=torch.uint8)
    for _ in range(2):   # the second call reuses the scratch buffers of the first
        e_out, e_ref = torch.empty_like(g), torch.empty_like(g)
        parts, stats = K.step(c, g, e, e_ref, SEED)
        got, pstats = K.step_packed(c, g, e, e_out, SEED, out=out)
        assert got is out and _equal(got, K.pack(c, parts, d)) and _equal(e_out, e_ref)
        assert torch.equal(pstats.nan_to_num(), stats.nan_to_num())


@pytest.mark.parametrize("spec", ["sign", "onebit", "natural", "qsgd:200", "topk:0.3", "randk:0.3,shared", "none",
                                  "0.5*natural"])
def test_step_packed_into_out(spec):
    c, d, dtype = C.parse(spec), 1000, torch.float32
    g, e = _vector(d, dtype, 1), _vector(d, dtype, 2) * 0.5
    out = torch.full((K.packed_nbytes(c, d, dtype),), 255, dtype=torch.uint8)
    for seed in (SEED, (SEED[0], SEED[1] + 1)):
        want, wstats = K.step_packed(c, g, e, None, seed)
        got, stats = K.step_packed(c, g, e, None, seed, out=out)
        assert got is out and _equal(got, want) and torch.equal(stats, wstats)
    with pytest.raises(ValueError):
        K.step_packed(c, g, e, None, SEED, out=out[1:])


@pytest.mark.parametrize("spec", ["randk:0.01,shared", "randk:0.3,shared", "0.5*randk:0.01,shared", "none"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_averaged_values_decode_into_out(spec, dtype):
    """A summable payload's average (Horovod's allreduce of its values) is decoded straight into the
    gradient's memory: the same bits as decode()."""
    from hvd_compress.torch import ops
    c, d = C.parse(spec), 300_000
    values = K.step(c, _vector(d, dtype, 1), None, None, SEED)[0][0]
    out = torch.full((d,), 3.0, dtype=dtype)
    assert ops.decode_values(c, values, d, SEED, out) is out
    assert _equal(out, K.decode(c, [values], d, SEED, dtype))


@pytest.mark.parametrize("spec", ["topk:0.01+natural", "randk:0.01+natural"])
@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_composition_with_a_non_finite_x(spec, bad):
    """A composition's one-pass path hands a non-finite x to the general path, with x left in e_out."""
    c, d = C.parse(spec), 300_000
    g, e = _vector(d, torch.float32, 1), _vector(d, torch.float32, 2) * 0.5
    g[4321] = bad
    e_out, e_ref = torch.empty_like(g), torch.empty_like(g)
    parts, stats = K.step(c, g, e, e_out, SEED)
    tparts, tstats = _torch_path(K.step, c, g, e, e_ref, SEED)
    assert all(_equal(a, b) for a, b in zip(parts, tparts)) and _equal(e_out, e_ref)
    assert stats[2] == 0 and tstats[2] == 0


@pytest.mark.parametrize("spec", ["sign", "onebit", "0.5*sign", "0.25*onebit"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [7, 1000, 300_001])
def test_deferred_correction_is_the_exact_error(spec, dtype, d):
    """defer=True (the plug-in's steps): e_out holds x and owes its correction to the next step, which takes it
    while it loads; three steps give the payloads, statistics and (settled) errors of the exact steps, bit for bit,
    with double buffers as the plug-in keeps them."""
    c = C.parse(spec)
    exact = [torch.zeros(d, dtype=dtype), torch.empty(d, dtype=dtype)]
    lazy = [torch.zeros(d, dtype=dtype), torch.empty(d, dtype=dtype)]
    for t in range(3):
        g = _vector(d, dtype, 20 + t)
        want, wstats = K.step_packed(c, g, exact[t % 2], exact[1 - t % 2], SEED)
        got, gstats = K.step_packed(c, g, lazy[t % 2], lazy[1 - t % 2], SEED, defer=True)
        assert _equal(got, want)
        assert K._owed_by(lazy[1 - t % 2]) is not None   # (and lazy[t % 2] still owes: a dropped step keeps it)
        assert torch.equal(gstats[1:], wstats[1:])
        assert gstats[0].item() == pytest.approx(wstats[0].item(), rel=1e-9 if dtype == torch.float64 else 1e-6)
    last = lazy[1]
    assert not _equal(last, exact[1])                      # still x
    assert K.settle(last) is last and _equal(last, exact[1]) and K._owed_by(last) is None


def test_deferred_correction_is_settled_by_every_other_reader():
    """An owed buffer read by another compressor's step, the general path (a non-finite gradient) or a step
    without deferral is settled first; slices of one buffer (sharded) owe their own values and settle together;
    a buffer that is freed leaves nothing behind."""
    d = 4099
    c = C.parse("sign")
    g = _vector(d, torch.float32, 1)
    base = torch.zeros(2 * d)
    halves = [base[:d], base[d:]]
    exact = torch.empty(2 * d)
    for j, half in enumerate(halves):
        K.step(c, g * (j + 1), None, half, SEED, defer=True)
        K.step(c, g * (j + 1), None, exact[j * d:(j + 1) * d], SEED)
    assert all(K._owed_by(h) is not None for h in halves)
    K.settle(base)
    assert _equal(base, exact) and all(K._owed_by(h) is None for h in halves)

    e = torch.empty(d)
    K.step(c, g, None, e, SEED, defer=True)
    reference = K.settle(e.clone().copy_(e))                # a copy owes nothing: not settled
    assert _equal(reference, e)
    K.step(c, g, None, e, SEED, defer=True)
    exact_e = torch.empty(d)
    K.step(c, g, None, exact_e, SEED)
    for other in ("topk:0.1", "natural", "none"):
        K.step(c, g, None, e, SEED, defer=True)
        parts, _ = K.step(C.parse(other), g, e, None, SEED)
        assert _equal(e, exact_e)                            # settled in place first
        assert all(_equal(a, b) for a, b in zip(parts, K.step(C.parse(other), g, exact_e, None, SEED)[0]))
    bad = g.clone()
    bad[5] = math.nan
    K.step(c, g, None, e, SEED, defer=True)
    out = torch.empty(d)
    _, stats = K.step(c, bad, e, out, SEED, defer=True)    # the general path
    exact_out = torch.empty(d)
    _, want = K.step(c, bad, exact_e, exact_out, SEED)
    assert stats[2] == 0 and torch.equal(stats.isnan(), want.isnan()) and K._owed_by(out) is None
    assert _equal(out, exact_out)
    K.step(c, g, None, e, SEED, defer=True)
    assert _equal(K.step_packed(c, g, e, None, SEED)[0], K.step_packed(c, g, exact_e, None, SEED)[0])

    # a buffer that owes as a whole, then read and written in halves (a change of transport): settled first
    whole, exact_whole, g2 = torch.empty(2 * d), torch.empty(2 * d), torch.cat([g, 2 * g])
    K.step(c, g2, None, whole, SEED, defer=True)
    K.step(c, g2, None, exact_whole, SEED)
    for j in range(2):
        half, exact_half = whole[j * d:(j + 1) * d], exact_whole[j * d:(j + 1) * d]
        assert _equal(K.step_packed(c, g, half, None, SEED)[0], K.step_packed(c, g, exact_half, None, SEED)[0])
    K.step(c, g2, None, whole, SEED, defer=True)
    K.step(c, g, None, whole[:d], SEED, defer=True)
    K.settle(whole)
    assert _equal(whole[:d], exact_e) and _equal(whole[d:], exact_whole[d:])

    gone = torch.empty(d)
    K.step(c, g, None, gone, SEED, defer=True)
    key = id(gone)
    assert key in K._owed
    del gone
    assert key not in K._owed
