"""Which random numbers a compressor draws: one seed per (step, who, parameter).

Keying randomness by the call instead of by a generator's history makes every draw reproducible from the
checkpointed step alone, independent of the order in which Horovod happens to call compress(), and the same
in a multi-rank run and in its single-process simulation.
"""
import hashlib

SHARED = "shared"   # the same draw on every rank (shared-index RandK: payloads become summable)
SERVER = "server"   # the DoubleSqueeze server pass


def derive_seed(base, step, who, name):
    """A 63-bit seed for compressor calls of rank ``who`` (or SHARED / SERVER) on parameter ``name``."""
    key = f"{base}/{step}/{who}/{name}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def worker_seed(compressor, base, step, rank, name):
    return derive_seed(base + getattr(compressor, "seed", 0), step, SHARED if compressor.summable else rank, name)


def server_seed(compressor, base, step, name):
    return derive_seed(base + getattr(compressor, "seed", 0), step, SERVER, name)
