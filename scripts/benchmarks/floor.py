"""The memory floor of the kernels benchmark's step (the worker step with error feedback + the decode of 2
payloads) for three payload layouts: C kernels (floor.c) that form x = g + e, stream it into the error buffer,
write and read the layout's bytes, and do no other arithmetic: about the least time a compressor of that layout
can take on the same machine. The benchmark times them side by side with the compressors."""
import ctypes
import functools
import os
import subprocess
import tempfile
from pathlib import Path

import torch

from hvd_compress import fused

# label -> (bits per element of the first pass's code, a second pass?, bits per element the decode reads)
LAYOUTS = {
    "floor: 1 bit, one pass (sign, 1-bit)": (1, False, 1),
    "floor: 1 byte, one pass (natural)": (8, False, 8),
    "floor: 1 byte, two passes (QSGD)": (0, True, 8),
}


@functools.lru_cache(maxsize=None)
def library():
    """floor.c built with the fused kernels' flags (None where it does not build: no compiler, no AVX2)."""
    with tempfile.TemporaryDirectory(prefix="hvdc_floor_") as tmp:
        target = Path(tmp) / "floor.so"
        cmd = [os.environ.get("CC") or "cc", *fused.FLAGS, str(Path(__file__).with_name("floor.c")), "-o", str(target)]
        if subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT).returncode != 0:
            return None
        return ctypes.CDLL(str(target))   # loaded: the file may go


def kernels(lib, d, g, e_in, e_out, out):
    """{label: (step, decode)} in the benchmark's form: step(g) -> payload, decode(payload) -> out."""
    ptr = ctypes.c_void_p
    n = ctypes.c_int64(d)
    other = torch.randint(0, 256, (d,), dtype=torch.uint8, generator=torch.Generator().manual_seed(d))
    made = {}
    for label, (bits, second, read_bits) in LAYOUTS.items():
        code = torch.zeros(d, dtype=torch.uint8)

        def step(g, bits=bits, second=second, code=code):
            lib.floor_pass(ptr(g.data_ptr()), ptr(e_in.data_ptr()), ptr(e_out.data_ptr()), ptr(code.data_ptr()), n,
                           bits)
            if second:
                lib.floor_second_pass(ptr(e_out.data_ptr()), ptr(code.data_ptr()), n)
            return code

        def decode(code, read_bits=read_bits):
            lib.floor_decode(ptr(code.data_ptr()), ptr(other.data_ptr()), ptr(out.data_ptr()), n, read_bits)
            return out

        made[label] = (step, decode)
    return made
