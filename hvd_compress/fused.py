"""The fused CPU kernels: a small C library (hvd_compress/csrc/), built on first use and loaded with ctypes, for
both frameworks (``hvd_compress.torch.kernels`` passes tensors' data pointers; ``hvd_compress.tensorflow.fused``
numpy views of TensorFlow's CPU tensors).

No framework headers and no build step at install time: the first call compiles ``csrc/fused.c`` with the system
C compiler into a user cache directory (``$HVD_COMPRESS_CACHE``, else ``$XDG_CACHE_HOME/hvd_compress``, else
``~/.cache/hvd_compress``). The file name carries a hash of the sources, the flags and the CPU's feature flags,
so a cache shared by different machines never hands one a binary built for another; the build goes to a
temporary file that is renamed into place, so ranks that build at once do not see half a file.
``python -c "from hvd_compress import fused; fused.build()"`` builds ahead of time.

The kernels are used when ``HVD_COMPRESS_FUSED`` is not ``0`` and the library could be built; otherwise (and
for tensors not on the CPU) each framework's kernels run their own ops, warning once when the library could not
be built. ``disabled()`` turns them off in a block (tests compare both paths).
"""
import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path

SOURCES = Path(__file__).resolve().parent / "csrc"
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC"]
_lock = threading.Lock()
_lib = None          # the loaded library, False after a failed build, None before trying
_off = 0             # depth of disabled() blocks


def _cache_dir():
    if os.environ.get("HVD_COMPRESS_CACHE"):
        return Path(os.environ["HVD_COMPRESS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hvd_compress"


def _cpu_flags():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.machine() + " " + platform.processor()


def _compiler():
    return os.environ.get("CC") or "cc"


def library_path():
    """Where the library for these sources, flags and CPU lives (built or not)."""
    h = hashlib.sha256()
    for path in sorted(SOURCES.glob("*.[ch]")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(" ".join([_compiler()] + FLAGS).encode() + b"\0" + _cpu_flags().encode())
    return _cache_dir() / f"hvdc_fused_{h.hexdigest()[:20]}.so"


def _compile(target):
    target.parent.mkdir(parents=True, exist_ok=True)
    if shutil.which(_compiler()) is None:
        raise RuntimeError(f"no C compiler ({_compiler()!r} is not on PATH)")
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([_compiler(), *FLAGS, "-o", tmp, str(SOURCES / "fused.c"), "-lm"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{_compiler()} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


CHUNK = 2048   # fused.c's block of elements


def blocks(d):
    """How many blocks of CHUNK elements d elements make (the kernels' arrays per block have blocks(d) + 1 entries)."""
    return (d + CHUNK - 1) // CHUNK


_F, _D, _I64, _P, _U32, _INT = (ctypes.c_float, ctypes.c_double, ctypes.c_int64, ctypes.c_void_p,
                                ctypes.c_uint32, ctypes.c_int)
_SIGNATURES = {   # name: (restype, [argtypes]); "T" is the value type of the suffix
    "addx": (_INT, [_P, _P, _P, _I64, _P]),
    "sign1": (_INT, [_P, _P, _P, _P, _I64, _P, _P]),
    "onebit1": (_INT, [_P, _P, _P, _P, _I64, _P, _P]),
    "select2": (None, [_P, _P, _P, _I64, "T", "T", _P]),
    "natural1": (_INT, [_P, _P, _P, _I64, _INT, _U32, _U32, _P, _P, _P]),
    "natural_step": (_INT, [_P, _P, _P, _I64, _INT, _U32, _U32, _P, _P, _P, _P]),
    "natural2": (None, [_P, _P, _P, _I64, _I64, _P, _P, _P]),
    "qsgd1": (_INT, [_P, _P, _P, _I64, _P]),
    "qsgd2": (None, [_P, _P, _P, _I64, "T", "T", "T", _U32, _U32, _P, _INT, _P]),
    "topk1": (_I64, [_P, _P, _P, _I64, "T", _P, _P, _I64, _P]),
    "topk_pick": (None, [_P, _P, _I64, _I64, _P, _P, "T", _P, _P, _P]),
    "dec_table": (None, [_P, _I64, _P, _P, _INT, "T"]),
    "dec_bits": (None, [_P, _I64, "T", "T", _P, _INT, "T"]),
    "dec_qsgd": (None, [_P, _INT, _I64, "T", "T", "T", _P, _INT, "T"]),
    "mean_bits": (None, [_P, _P, _P, _INT, _I64, _P, "T"]),
    "mean_table": (None, [_P, _P, _P, _INT, _INT, _I64, _P, "T"]),
    "mean_qsgd": (None, [_P, _INT, _P, "T", "T", _INT, _I64, _P, "T"]),
    "mean_sparse": (_INT, [_P, _P, _P, _INT, _I64, _P, "T", _P, _P, _P]),
    "mean_shared": (_INT, [_P, _I64, _P, _INT, _I64, _P, "T"]),
    "randk_step": (_INT, [_P, _P, _P, _I64, _P, _I64, _INT, "T", "T", _P, _P]),
}


class _Lib:
    """The library's functions as attributes: ``lib.f.sign1`` (float) and ``lib.d.sign1`` (double)."""

    def __init__(self, path):
        self.path = path
        self.dll = ctypes.CDLL(str(path))
        if self.dll.hvdc_version() != 1:
            raise RuntimeError(f"{path}: unexpected version")
        self.f, self.d = type("F", (), {})(), type("D", (), {})()
        for suffix, ns, value in (("f", self.f, _F), ("d", self.d, _D)):
            for name, (res, args) in _SIGNATURES.items():
                fn = getattr(self.dll, f"hvdc_{name}_{suffix}")
                fn.restype = res
                fn.argtypes = [value if a == "T" else a for a in args]
                setattr(ns, name, fn)
        self.dll.hvdc_ieee_begin.restype = ctypes.c_uint
        self.dll.hvdc_ieee_begin.argtypes = []
        self.dll.hvdc_ieee_end.restype = None
        self.dll.hvdc_ieee_end.argtypes = [ctypes.c_uint]
        self.dll.hvdc_hash.restype = None
        self.dll.hvdc_hash.argtypes = [_P, _I64, _U32, _U32]
        self.dll.hvdc_first_distinct.restype = _I64
        self.dll.hvdc_first_distinct.argtypes = [_I64, _I64, _I64, _U32, _U32, _P, _P]
        self.dll.hvdc_index_expand.restype = None
        self.dll.hvdc_index_expand.argtypes = [_P, _I64, _P, _I64, _P]


@contextlib.contextmanager
def ieee():
    """IEEE subnormal arithmetic on this thread for the calls in the block (TensorFlow runs its threads with
    flush-to-zero: the same kernels then gave other bits in a graph than eagerly)."""
    dll = lib().dll
    old = dll.hvdc_ieee_begin()
    try:
        yield
    finally:
        dll.hvdc_ieee_end(old)


def build(verbose=True):
    """Build (if needed) and load the library now; returns its path. For setup scripts: prints where and how
    long the build took."""
    global _lib
    target = library_path()
    with _lock:
        start = time.perf_counter()
        built = not target.exists()
        if built:
            _compile(target)
        _lib = _Lib(target)
    if verbose:
        took = time.perf_counter() - start
        print(f"hvd_compress fused kernels: {'built' if built else 'already built'} {target} ({took:.2f} s)")
    return target


def lib():
    """The loaded library, or None when it is turned off (HVD_COMPRESS_FUSED=0, disabled()) or cannot be
    built (warned once)."""
    global _lib
    if _off or os.environ.get("HVD_COMPRESS_FUSED", "1") == "0":
        return None
    if _lib is None:
        with _lock:
            if _lib is None:
                try:
                    target = library_path()
                    if not target.exists():
                        _compile(target)
                    _lib = _Lib(target)
                except Exception as err:   # no compiler, a read-only cache, a failed build: the framework's ops instead
                    _lib = False
                    warnings.warn(f"hvd_compress: the fused CPU kernels could not be built ({err}); using the "
                                  f"slower kernels of the framework's own ops. Install a C compiler (cc) or set "
                                  f"HVD_COMPRESS_FUSED=0 to silence this.", RuntimeWarning, stacklevel=2)
    return _lib or None


@contextlib.contextmanager
def disabled():
    """Inside this block the framework's own kernels run (as with HVD_COMPRESS_FUSED=0)."""
    global _off
    _off += 1
    try:
        yield
    finally:
        _off -= 1
