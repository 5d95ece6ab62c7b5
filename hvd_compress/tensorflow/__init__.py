"""hvd_compress for TensorFlow: ``htc.Compression(...)`` goes to ``compression=`` of
``hvd.DistributedGradientTape``, ``hvd.DistributedOptimizer`` or Horovod's Keras ``DistributedOptimizer``."""
from ..compressors import (Compose, Compressor, Identity, Natural, OneBit, QSGD, RandK, Scaled, ScaledSign, TopK,
                           parse)
from .compression import Compression

__all__ = ["Compression", "Compressor", "TopK", "RandK", "Natural", "ScaledSign", "OneBit", "QSGD", "Compose",
           "Scaled", "Identity", "parse"]
