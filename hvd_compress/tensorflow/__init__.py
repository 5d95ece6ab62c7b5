"""hvd_compress for TensorFlow: ``htc.Compression(...)`` goes to ``compression=`` of
``hvd.DistributedGradientTape``, ``hvd.DistributedOptimizer`` or Horovod's Keras ``DistributedOptimizer``."""
from ..compressors import (BFloat16, Compose, Compressor, Identity, Natural, OneBit, QSGD, RandK, Scaled,
                           ScaledSign, TopK, parse)
from .compression import Compression

__all__ = ["Compression", "Compressor", "TopK", "RandK", "Natural", "ScaledSign", "OneBit", "QSGD", "BFloat16",
           "Compose", "Scaled", "Identity", "parse"]
