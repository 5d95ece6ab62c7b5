"""The compressors: their arguments, wire format, exact wire size and class constants.

This module is framework-neutral. A compressor here is a small immutable description; the tensor math
(encode / decode) lives in one kernel module per framework (``hvd_compress/torch/kernels.py``), found by
the type of the tensor a compressor is called on. Every compressor encodes a flat tensor of ``d`` elements
into a *payload*: a list of parts, each a 1-D array of a fixed dtype and a length that depends only on
``d`` (so receivers can size their buffers), and decodes it back to a dense tensor.

Class constants follow the first seed's table (Beznosikov et al., "On biased compression for distributed
learning"): ``U(zeta)`` unbiased with E||C(x)||^2 <= zeta ||x||^2, ``B1(alpha, beta)``, ``B2(gamma, beta)``
and ``B3(delta)``. Constants of random compressors hold in expectation.
"""
import functools
import math
from dataclasses import dataclass
from typing import Optional

# dtype names used in layouts; "value" means the compute dtype of the gradient (float32 or float64); "index":
# a sparsifier's increasing indices, int32 in memory, compact on the wire (see Compressor.wire_layout)
INT32, UINT8, INT8, INT16, BF16, VALUE, INDEX = "int32", "uint8", "int8", "int16", "bfloat16", "value", "index"
_FIXED_ITEMSIZE = {INT32: 4, UINT8: 1, INT8: 1, INT16: 2, BF16: 2}
INDEX_BLOCK = 2 ** 16   # an index travels as its low 16 bits; the counts of each block of 2^16 elements give the rest


def index_counts(d):
    """How many block counts travel with indices into d elements: one per block of INDEX_BLOCK elements the
    tensor spans, but the last."""
    return max(-(-d // INDEX_BLOCK) - 1, 0)


def _itemsize(kind, value_itemsize):
    return value_itemsize if kind == VALUE else _FIXED_ITEMSIZE[kind]


class Compressor:
    """Base class. Subclasses define ``layout(d)`` and ``classes(d)``; kernels do the math."""

    random = False      # draws random numbers (needs a seed per call)
    summable = False    # payloads of different ranks can be summed element-wise (allreduce transport)
    sparsifies = False  # sends a subset of the coordinates (momentum correction masks the others)
    seed = 0            # added to the per-call seeds (RandK(seed=...)); Scaled and Compose take their parts'

    def layout(self, d):
        """[(dtype kind, length)] of the payload parts for a tensor of d elements."""
        raise NotImplementedError

    def wire_layout(self, d):
        """[(dtype kind, length)] of what travels: the layout, with an INDEX part of k increasing indices into
        the d elements sent as two: their low 16 bits (INT16), and how many of them lie below the end of each
        block of 2^16 elements but the last (INT32, cumulative): 2 bytes per index instead of 4, lossless."""
        wire = []
        for kind, n in self.layout(d):
            wire += [(INT16, n), (INT32, index_counts(d))] if kind == INDEX else [(kind, n)]
        return wire

    def wire_bytes(self, d, value_itemsize=4):
        """Exact bytes of the payload for d elements whose values are ``value_itemsize`` bytes wide."""
        return sum(_itemsize(kind, value_itemsize) * n for kind, n in self.wire_layout(d))

    def classes(self, d):
        """Class memberships {"U": {"zeta"}, "B1": {"alpha", "beta"}, "B2": {...}, "B3": {"delta"}}."""
        raise NotImplementedError

    def max_nonzeros(self, d):
        """At most how many nonzeros C(x) has for d elements (what the sharded transport's exact average of n
        payloads may hold)."""
        return d

    def stages(self, d):
        """[(compressor, elements)]: the basic compressors a call runs, on how many elements (the kernels'
        cost); Scaled and Compose name their parts."""
        return [(self, d)]

    def __call__(self, x, seed=0):
        """C(x): encode then decode, for tests and theory tools. ``x`` is a torch tensor (any shape)."""
        from .kernels import apply
        return apply(self, x, seed)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other):
        return type(self) is type(other) and self.__dict__ == other.__dict__

    def __hash__(self):
        return hash(repr(self))


def _check_ratio_k(ratio, k):
    if (ratio is None) == (k is None):
        raise ValueError(f"give exactly one of ratio= or k= (got ratio={ratio!r}, k={k!r})")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(f"ratio must be a number in (0, 1], got {ratio!r}")
        return float(ratio), None
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return None, k


class _Sparsifier(Compressor):
    """Keeps k of d coordinates; k = max(1, floor(ratio * d)) or the given k."""

    sparsifies = True

    def __init__(self, ratio=None, k=None):
        self.ratio, self.k = _check_ratio_k(ratio, k)

    k_of = None   # a rule d -> k that replaces ratio= and k= (see with_k_of)

    def k_for(self, d):
        if self.k_of is not None:
            return self.k_of(d)
        if self.k is not None:
            if self.k > d:
                raise ValueError(f"{self!r}: k={self.k} is larger than the tensor's {d} elements")
            return self.k
        return max(1, min(d, int(self.ratio * d)))

    def max_nonzeros(self, d):
        return self.k_for(d) if d else 0


class TopK(_Sparsifier):
    """Keeps the k coordinates of largest magnitude; of those whose magnitude equals the k-th largest, the first
    ones. Wire: k indices, in increasing order (2 bytes each, see ``wire_layout``), + k values."""

    def layout(self, d):
        k = self.k_for(d)
        return [(INDEX, k), (VALUE, k)]

    def classes(self, d):
        q = self.k_for(d) / d
        return {"B1": {"alpha": q, "beta": 1.0}, "B2": {"gamma": q, "beta": 1.0}, "B3": {"delta": 1 / q}}


class RandK(_Sparsifier):
    """Keeps k coordinates drawn uniformly without replacement, scaled by d/k when ``unbiased``.

    ``shared=True``: every rank draws the same indices from the seed, so only the k values travel and
    payloads of different ranks can be summed (allreduce)."""

    random = True

    def __init__(self, ratio=None, k=None, unbiased=True, shared=False, seed=0):
        super().__init__(ratio, k)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.unbiased, self.shared, self.seed = bool(unbiased), bool(shared), seed

    @property
    def summable(self):
        return self.shared

    def layout(self, d):
        k = self.k_for(d)
        return [(VALUE, k)] if self.shared else [(INDEX, k), (VALUE, k)]

    def classes(self, d):
        q = self.k_for(d) / d
        if self.unbiased:
            return {"U": {"zeta": 1 / q}}
        # biased restriction: <C(x), x> = ||C(x)||^2 and E||C(x)||^2 = q ||x||^2
        return {"B1": {"alpha": q, "beta": 1.0}, "B2": {"gamma": q, "beta": 1.0}, "B3": {"delta": 1 / q}}


class Natural(Compressor):
    """Natural compression: each element rounded to a power of two, keeping its sign.

    Unbiased (default): stochastic rounding between the two neighbouring powers, U(9/8).
    ``deterministic=True``: the nearest power of two in value, B3(9/8). Wire: one byte per element
    (sign bit + 7-bit exponent below the tensor's largest exponent; 0 means zero) + an int32 header.
    Elements more than 2^126 times smaller than the largest one are flushed to zero."""

    def __init__(self, deterministic=False):
        self.deterministic = bool(deterministic)

    @property
    def random(self):
        return not self.deterministic

    def layout(self, d):
        return [(INT32, 1), (UINT8, d)]

    def classes(self, d):
        if not self.deterministic:
            return {"U": {"zeta": 9 / 8}}
        # every element c of C(x) satisfies c/x in [2/3, 4/3]
        return {"B1": {"alpha": 4 / 9, "beta": 4 / 3}, "B2": {"gamma": 2 / 3, "beta": 4 / 3},
                "B3": {"delta": 9 / 8}}


class ScaledSign(Compressor):
    """||x||_1 / d * sign(x). Wire: one value + signs bit-packed 8 per byte."""

    def layout(self, d):
        return [(VALUE, 1), (UINT8, (d + 7) // 8)]

    def classes(self, d):
        return {"B1": {"alpha": 1 / d, "beta": 1.0}, "B2": {"gamma": 1 / d, "beta": 1.0}, "B3": {"delta": float(d)}}


class OneBit(Compressor):
    """1-bit quantization: each sign reconstructed with the mean magnitude of its sign group
    (zeros count with the positive group). Wire: two values + signs bit-packed 8 per byte."""

    def layout(self, d):
        return [(VALUE, 2), (UINT8, (d + 7) // 8)]

    def classes(self, d):
        # per sign group <C, x> = ||C||^2 (beta = 1) and <C, x> >= ||x||_1^2 / d >= ||x||^2 / d
        return {"B1": {"alpha": 1 / d, "beta": 1.0}, "B2": {"gamma": 1 / d, "beta": 1.0}, "B3": {"delta": float(d)}}


class QSGD(Compressor):
    """QSGD with s levels (Alistarh et al. 2017): ||x||_2 * sign(x_i) * l_i / s, l_i stochastically rounded.
    Wire: the norm + one signed level per element (int8 for s <= 127, int16 up to 32767)."""

    random = True

    def __init__(self, levels=16):
        if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= 32767:
            raise ValueError(f"QSGD levels must be an integer in [1, 32767], got {levels!r}")
        self.levels = levels

    def layout(self, d):
        return [(VALUE, 1), (INT8 if self.levels <= 127 else INT16, d)]

    def classes(self, d):
        s = self.levels
        return {"U": {"zeta": 1 + min(d / s ** 2, math.sqrt(d) / s)}}


class BFloat16(Compressor):
    """Each element rounded to bfloat16 (8 significant bits, float32's range), to nearest, ties to even: 2 bytes
    per element. Meant as a composition's second stage (``topk:0.01+bf16``: a kept value costs 4 bytes with its
    index), where error feedback keeps what the rounding drops. Alone it travels by allgather (a sum of bfloat16
    payloads would round again). The class constants hold for elements in float32's normal range."""

    UNIT = 2.0 ** -8   # the largest relative rounding error

    def layout(self, d):
        return [(BF16, d)]

    def classes(self, d):
        u = self.UNIT   # every element c of C(x) satisfies c/x in [1 - u, 1 + u]
        return {"B1": {"alpha": (1 - u) ** 2, "beta": 1 + u}, "B2": {"gamma": 1 - u, "beta": 1 + u},
                "B3": {"delta": 1 / (1 - u * u)}}


class Compose(Compressor):
    """A sparsifier's kept values compressed further by a second compressor, e.g. Top-k then Natural.

    C(x) = scatter(indices, second(values)); equal to second(first(x)) for element-wise ``second``."""

    sparsifies = True
    seed = property(lambda self: self.first.seed + self.second.seed)
    max_nonzeros = property(lambda self: self.first.max_nonzeros)

    def stages(self, d):
        return self.first.stages(d) + self.second.stages(self.first.k_for(d))

    def __init__(self, first, second):
        if not isinstance(first, (TopK, RandK)) or getattr(first, "shared", False):
            raise ValueError(f"Compose needs TopK or a non-shared RandK first, got {first!r}")
        if not isinstance(second, Compressor) or isinstance(second, Compose):
            raise ValueError(f"Compose needs a compressor second, got {second!r}")
        self.first, self.second = first, second

    @property
    def random(self):
        return self.first.random or self.second.random

    def layout(self, d):
        k = self.first.k_for(d)
        return [(INDEX, k)] + self.second.layout(k)

    def classes(self, d):
        # ||C(x) - x||^2 = ||x - v||^2 + ||second(v) - v||^2 with v the kept values (a restriction, for
        # TopK and biased RandK): with second in B3(delta2), C is in B3(delta1 * delta2); with second in
        # U(zeta < 2), in B3(delta1 / (2 - zeta)) in expectation.
        first, second = self.first.classes(d), self.second.classes(self.first.k_for(d))
        if "B3" not in first:
            return {}
        delta1 = first["B3"]["delta"]
        if "B3" in second:
            return {"B3": {"delta": delta1 * second["B3"]["delta"]}}
        if "U" in second and second["U"]["zeta"] < 2:
            return {"B3": {"delta": delta1 / (2 - second["U"]["zeta"])}}
        return {}


class Scaled(Compressor):
    """lam * C(x). Class constants by the seed's scaling rules (U -> B1/B2; B1, B2 scale; lam = 1/beta or
    1/zeta gives B3)."""

    def __init__(self, compressor, lam):
        if not isinstance(compressor, Compressor):
            raise ValueError(f"Scaled needs a compressor, got {compressor!r}")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam > 0 or math.isinf(lam):
            raise ValueError(f"lam must be a finite number > 0, got {lam!r}")
        self.compressor, self.lam = compressor, float(lam)

    random = property(lambda self: self.compressor.random)
    summable = property(lambda self: self.compressor.summable)
    sparsifies = property(lambda self: self.compressor.sparsifies)
    seed = property(lambda self: self.compressor.seed)
    max_nonzeros = property(lambda self: self.compressor.max_nonzeros)
    stages = property(lambda self: self.compressor.stages)

    def layout(self, d):
        return self.compressor.layout(d)

    def classes(self, d):
        return scale_classes(self.compressor.classes(d), self.lam)


class Identity(Compressor):
    """No compression: the values travel as they are (summable: allreduce)."""

    summable = True

    def layout(self, d):
        return [(VALUE, d)]

    def classes(self, d):
        return {"U": {"zeta": 1.0}, "B1": {"alpha": 1.0, "beta": 1.0}, "B2": {"gamma": 1.0, "beta": 1.0},
                "B3": {"delta": 1.0}}


def scale_classes(classes, lam):
    """The seed's table: the classes of lam * C from those of C."""
    out = {}
    if "U" in classes:
        zeta = classes["U"]["zeta"]
        out["B1"] = {"alpha": lam ** 2, "beta": lam * zeta}
        out["B2"] = {"gamma": lam, "beta": lam * zeta}
        if math.isclose(lam, 1 / zeta):
            out["B3"] = {"delta": zeta}   # the poster prints B3(1/zeta); delta = zeta is what holds (delta >= 1)
        if lam == 1:
            out["U"] = dict(classes["U"])
    if "B1" in classes:
        a, b = classes["B1"]["alpha"], classes["B1"]["beta"]
        out["B1"] = {"alpha": lam ** 2 * a, "beta": lam * b}
        if math.isclose(lam, 1 / b):
            out["B3"] = {"delta": b ** 2 / a}
    if "B2" in classes:
        g, b = classes["B2"]["gamma"], classes["B2"]["beta"]
        out["B2"] = {"gamma": lam * g, "beta": lam * b}
        if math.isclose(lam, 1 / b):
            out["B3"] = {"delta": min(b / g, out.get("B3", {"delta": math.inf})["delta"])}
    if "B3" in classes and lam == 1:
        out["B3"] = dict(classes["B3"])
    return out


# ---- command-line spelling -----------------------------------------------------------------------------
# "topk:0.01", "topk:k=5", "randk:0.01,shared", "randk:0.05,biased", "natural", "natural:det", "sign",
# "onebit", "qsgd:16", "bf16", "topk:0.01+natural" / "topk:0.01+bf16" (Compose), "0.5*topk:0.01" (Scaled),
# "none" / "identity".

def _number(text):
    try:
        return int(text)
    except ValueError:
        return float(text)


def parse(spec) -> Optional[Compressor]:
    """A compressor from its command-line spelling; None for "" (no compressor)."""
    if spec is None or isinstance(spec, Compressor):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"a compressor spec must be a string, got {spec!r}")
    text = spec.strip().lower()
    if not text:
        return None
    try:
        if "+" in text:
            first, second = text.split("+", 1)
            return Compose(parse(first), parse(second))
        if "*" in text:
            lam, inner = text.split("*", 1)
            return Scaled(parse(inner), _number(lam))
        name, _, argtext = text.partition(":")
        args = [a.strip() for a in argtext.split(",") if a.strip()]
        flags = {a for a in args if "=" not in a and not a[0].isdigit() and a[0] != "."}
        kwargs = {k.strip(): _number(v) for k, v in (a.split("=", 1) for a in args if "=" in a)}
        numbers = [_number(a) for a in args if a not in flags and "=" not in a]
        if name in ("topk", "randk"):
            if numbers:
                kwargs["ratio" if isinstance(numbers[0], float) else "k"] = numbers[0]
            if name == "topk":
                _no_flags(spec, flags)
                return TopK(**kwargs)
            _no_flags(spec, flags - {"shared", "biased", "unbiased"})
            return RandK(**kwargs, shared="shared" in flags, unbiased="biased" not in flags)
        if name == "natural":
            _no_flags(spec, flags - {"det", "deterministic"})
            return Natural(deterministic=bool(flags))
        if name == "qsgd":
            _no_flags(spec, flags)
            return QSGD(levels=numbers[0] if numbers else kwargs.get("levels", 16))
        simple = {"sign": ScaledSign, "scaledsign": ScaledSign, "onebit": OneBit, "bf16": BFloat16,
                  "none": Identity, "identity": Identity}
        if name in simple and not args:
            return simple[name]()
    except (ValueError, TypeError) as err:
        raise ValueError(f"bad compressor spec {spec!r}: {err}") from None
    raise ValueError(f"unknown compressor spec {spec!r}; known: topk:RATIO|k=K, randk:RATIO[,shared][,biased], "
                     f"natural[:det], sign, onebit, qsgd:LEVELS, bf16, A+B (compose), LAM*A (scaled), none")


def _no_flags(spec, flags):
    if flags:
        raise ValueError(f"unknown option(s) {sorted(flags)}")


@dataclass(frozen=True)
class Config:
    """What every rank must agree on. ``transport`` (see ``hvd_compress.transport``): None for the default
    (allreduce for summable payloads, allgather otherwise)."""
    worker: Compressor
    error_feedback: bool
    server: Optional[Compressor]
    transport: Optional[str] = None
    momentum: float = 0.0   # momentum correction (Deep Gradient Compression): see check_momentum
    momentum_masking: bool = True   # its factor masking: see check_momentum_option
    nesterov: bool = False   # Nesterov's form of it: see check_momentum_option
    warmup: tuple = (0, 0.25)   # (steps, first ratio) of the worker sparsifier's warm-up: see check_warmup
    clip: float = 0.0   # local gradient clipping: see check_clip

    def fingerprint(self):
        text = f"worker={self.worker!r} error_feedback={self.error_feedback} server={self.server!r}"
        return (text + (f" transport={self.transport}" if self.transport else "")
                + (f" momentum={self.momentum}" if self.momentum else "")
                + ("" if self.momentum_masking else " momentum_masking=False")
                + (" nesterov=True" if self.nesterov else "")
                + (f" warmup={self.warmup}" if self.warmup[0] else "")
                + (f" clip={self.clip}" if self.clip else ""))

    def clip_threshold(self, n):
        """The norm each of n workers clips a gradient tensor to: clip / sqrt(n), as in Deep Gradient
        Compression, so that the sum of n independent clipped gradients has about the norm ``clip``."""
        return self.clip / math.sqrt(n)

    def worker_at(self, step):
        """The worker compressor in force at ``step``: during the warm-up, the sparsifier's ratio falls
        geometrically from the warm-up's first ratio to its own (Deep Gradient Compression's exponential
        warm-up of the density, e.g. 25% -> 1% over the warm-up steps); after it, ``worker`` itself."""
        return _warming(self.worker, self.warmup, step)

    def server_at(self, step):
        """The server compressor in force at ``step``: the warm-up holds for the server pass too (else the root
        would squeeze the warm-up's denser average back to its own ratio): a sparsifier given by ratio= on the
        worker's schedule, uncompressed during a "dense" warm-up, any other compressor as it is."""
        if self.server is None or self.warmup[1] != "dense" and ratio_of(self.server) is None:
            return self.server
        return _warming(self.server, self.warmup, step)

    def in_force_by(self, look_up):
        """The worker and server compressors at a step that only a framework knows (in TensorFlow, a value in
        the graph), for a warm-up of the ratio: sparsifiers that keep, of d coordinates, ``look_up(ks)``, ks
        being their k at each step of the warm-up and then their own (look_up picks the step's, e.g. with a
        gather in the graph); without a warm-up of the ratio, the compressors themselves (a dense warm-up is the
        framework's to switch to)."""
        steps = self.warmup[0]
        if not steps or self.warmup[1] == "dense":
            return self.worker, self.server

        def warming(c, schedule):
            if c is None or ratio_of(c) is None:
                return c
            return with_k_of(c, functools.lru_cache(None)(
                lambda d: look_up([sparsifier_of(schedule(t)).k_for(d) for t in range(steps + 1)])))
        return warming(self.worker, self.worker_at), warming(self.server, self.server_at)


def _warming(c, warmup, step):
    steps, first = warmup
    if step >= steps:
        return c
    if first == "dense":   # 1-bit Adam's warm-up: uncompressed
        return Identity()
    final = sparsifier_of(c).ratio
    return _with_sparsifier(c, ratio=max(final, first * (final / first) ** (step / steps)))


def sparsifier_of(c):
    """The sparsifier of a compressor that sparsifies (itself, a composition's first stage, a scaled one's)."""
    return sparsifier_of(c.compressor) if isinstance(c, Scaled) else c.first if isinstance(c, Compose) else c


def ratio_of(c):
    """The ratio= of a compressor's sparsifier (None for other compressors, or one given by k=)."""
    return sparsifier_of(c).ratio if c.sparsifies else None


def with_k_of(c, k_of):
    """A copy of c whose sparsifier keeps ``k_of(d)`` of d coordinates, where k_of may return a framework's
    scalar tensor (``Config.in_force_by``)."""
    return _with_sparsifier(c, k_of=k_of)


def _with_sparsifier(c, **attributes):
    """A copy of c whose sparsifier has the given attributes (ratio=, k_of=)."""
    if isinstance(c, Scaled):
        return Scaled(_with_sparsifier(c.compressor, **attributes), c.lam)
    if isinstance(c, Compose):
        return Compose(_with_sparsifier(c.first, **attributes), c.second)
    copy = object.__new__(type(c))
    copy.__dict__.update(c.__dict__, **attributes)
    return copy


def check_warmup(warmup, worker):
    """``warmup``: 0 (none), a number of steps (first ratio 0.25, as Deep Gradient Compression starts), or
    (steps, first ratio): only for a sparsifier given by ratio= (the ratio is what warms up). Or
    (steps, "dense"): the first steps send the gradients uncompressed, for any compressor (1-bit Adam's
    warm-up, which ``hvd_compress.torch.FrozenVarianceAdamW`` pairs with)."""
    steps, first = tuple(warmup) if isinstance(warmup, (tuple, list)) and len(warmup) == 2 else (warmup, 0.25)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"warmup must be a number of steps >= 0 or (steps, first ratio), got {warmup!r}")
    if not steps:
        return 0, 0.25
    if first == "dense":
        return steps, first
    if isinstance(first, bool) or not isinstance(first, (int, float)) or not 0 < first <= 1:
        raise ValueError(f"the warm-up's first ratio must be a number in (0, 1] or \"dense\", got {first!r}")
    if not worker.sparsifies or sparsifier_of(worker).ratio is None:
        raise ValueError(f"warmup={warmup!r} needs a sparsifier given by ratio= (e.g. topk:0.01), got {worker!r}")
    return steps, float(first)


def check_momentum(momentum, worker, error_feedback, masking=True):
    """Momentum correction (Lin et al., Deep Gradient Compression): each worker keeps a velocity
    u <- m u + g and compresses x = u + e with error feedback; the coordinates sent leave u (factor masking,
    unless momentum_masking=False), and the optimizer runs without momentum of its own. With error feedback
    only; with the masking only for sparsifiers (a compressor that sends every coordinate would reset the
    whole velocity every step), without it for any compressor (1-bit Adam compresses its momentum by sign)."""
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
        raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
    if momentum and not error_feedback:
        raise ValueError(f"momentum={momentum!r} (momentum correction) needs error_feedback=True")
    if momentum and masking and not worker.sparsifies:
        raise ValueError(f"momentum={momentum!r} (momentum correction with factor masking) needs a sparsifying "
                         f"compressor (TopK, RandK, or a composition starting with one), got {worker!r}; "
                         f"momentum_masking=False works with any")
    return float(momentum)


def check_momentum_option(name, value, default, momentum):
    """A switch of momentum correction, True or False; away from its ``default`` only with momentum:
    ``momentum_masking`` (default True): off, a sent coordinate keeps its velocity, so every gradient moves its
    weight by lr / (1 - m) in all, as dense SGD with momentum does (masked, the coordinates sent most often
    move less); ``nesterov`` (default False): on, g + m u is compressed (or averaged) in g's place instead of
    u, as ``torch.optim.SGD(nesterov=True)`` steps."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    if value != default and not momentum:
        raise ValueError(f"{name}={value} needs momentum correction (momentum > 0)")
    return value


def check_clip(clip):
    """Local gradient clipping (Deep Gradient Compression): before anything else (momentum correction, error
    feedback), each worker scales each gradient tensor down to norm ``clip / sqrt(n)`` if it is longer.
    0 for none."""
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not (clip >= 0 and math.isfinite(clip)):
        raise ValueError(f"clip must be a finite number >= 0 (a gradient norm; 0 for none), got {clip!r}")
    return float(clip)
