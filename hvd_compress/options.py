"""The options both plug-ins' ``Compression`` take, checked in one place (a bad value is named)."""
import dataclasses

from . import compressors as C
from . import transport as T


def config_of(compressor, error_feedback=False, server=None, transport=None, link_gbps=None, momentum=0.0,
              warmup=0, clip=0.0, momentum_masking=True, nesterov=False):
    """(the configuration, the link given for "auto" or None)."""
    worker = C.parse(compressor) or C.Identity()
    masking = C.check_momentum_option("momentum_masking", momentum_masking, True, momentum)
    config = C.Config(worker, bool(error_feedback), C.parse(server),
                      momentum=C.check_momentum(momentum, worker, bool(error_feedback), masking),
                      momentum_masking=masking, nesterov=C.check_momentum_option("nesterov", nesterov, False, momentum),
                      warmup=C.check_warmup(warmup, worker), clip=C.check_clip(clip))
    config = dataclasses.replace(config, transport=T.check(transport, config))
    if link_gbps is not None and transport != T.AUTO:
        raise ValueError(f"link_gbps={link_gbps!r} is only used by transport='auto' (got {transport!r})")
    return config, None if link_gbps is None else T.Link.gbit(link_gbps)


def refuse_second_momentum(momentum, theirs, adam_like, remedy):
    """The momentum is applied once: in the Compression (momentum correction) or in the optimizer, whose own
    momentum (``theirs``) and first moment (``adam_like``) each plug-in reads from its optimizer at the first
    step; ``remedy`` says what to use instead of an Adam-like optimizer."""
    if momentum and theirs:
        raise ValueError(f"Compression(momentum={momentum}) applies the momentum before compressing, but the "
                         f"optimizer has momentum {theirs} too: give the optimizer momentum=0")
    if momentum and adam_like:
        raise ValueError(f"Compression(momentum={momentum}) applies the momentum before compressing, but an "
                         f"Adam-like optimizer keeps a first moment too: {remedy}")


def check(dense_below, nonfinite):
    if isinstance(dense_below, bool) or not isinstance(dense_below, int) or dense_below < 0:
        raise ValueError(f"dense_below must be an integer >= 0 (elements), got {dense_below!r}")
    if nonfinite not in ("skip", "raise"):
        raise ValueError(f"nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
    return dense_below, nonfinite
