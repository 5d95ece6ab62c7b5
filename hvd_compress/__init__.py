"""hvd_compress: gradient compression with error feedback and the DoubleSqueeze server pass for Horovod.

The compressors (framework-neutral descriptions) are importable from here; the Horovod plug-ins live in
``hvd_compress.torch`` and ``hvd_compress.tensorflow`` (``hvd_compress.keras`` for Keras 3 ``fit``);
``hvd_compress.simulate`` is the single-process reference both are tested against.
"""
from .compressors import (BFloat16, Compose, Compressor, Identity, Natural, OneBit, QSGD, RandK, Scaled,
                          ScaledSign, TopK, parse)

__version__ = "0.1.0"
