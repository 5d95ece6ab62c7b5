"""Which random numbers a compressor draws: one seed per (step, who, parameter).

A seed is a pair (key, step): ``key`` names who draws for which parameter, ``step`` the training step.
Keying randomness by the call instead of by a generator's history makes every draw reproducible from the
checkpointed step alone, independent of the order in which Horovod happens to call compress(), and the same
in a multi-rank run and in its single-process simulation. The pair form lets graph frameworks (TensorFlow)
use a step that is a tensor (``hash_keys``' few integer operations then run in the graph).
"""
import hashlib

SHARED = "shared"   # the same draw on every rank (shared-index RandK: payloads become summable)
SERVER = "server"   # the DoubleSqueeze server pass


def call_key(base, who, name):
    """A 31-bit key for compressor calls of rank ``who`` (or SHARED / SERVER) on parameter ``name``."""
    digest = hashlib.blake2b(f"{base}/{who}/{name}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") >> 1


def worker_seed(compressor, base, step, rank, name):
    who = SHARED if compressor.summable else rank
    return call_key(base + compressor.seed, who, name), step


def server_seed(compressor, base, step, name):
    return call_key(base + compressor.seed, SERVER, name), step


def as_pair(seed):
    """(key, step) from a pair or from a plain integer seed (step 0)."""
    return tuple(seed) if isinstance(seed, (tuple, list)) else (int(seed), 0)


_MASK64 = 2 ** 64 - 1


def splitmix64(seed):
    """splitmix64 of the 64 bits (key mod 2^32, step mod 2^32): the seed's 64 mixed bits."""
    key, step = as_pair(seed)
    z = ((key & 0xFFFFFFFF) << 32 | step & 0xFFFFFFFF) + 0x9E3779B97F4A7C15 & _MASK64
    z = (z ^ z >> 30) * 0xBF58476D1CE4E5B9 & _MASK64
    z = (z ^ z >> 27) * 0x94D049BB133111EB & _MASK64
    return z ^ z >> 31


def hash_keys(seed):
    """(k1, k2): the keys of the counter-based random stream h_i = mix32(mix32(i ^ k1) + k2) that both frameworks'
    kernels and the C kernels draw from, the low and high 32 bits of ``splitmix64(seed)``."""
    z = splitmix64(seed)
    return z & 0xFFFFFFFF, z >> 32


def second_stage(seed):
    """An independent seed for the second stage of a composition."""
    key, step = as_pair(seed)
    return key ^ 0x5BD1E995, step
