"""hvd_compress for PyTorch: ``hc.Compression(...)`` goes to ``compression=`` of ``hvd.DistributedOptimizer``."""
from ..compressors import (BFloat16, Compose, Compressor, Identity, Natural, OneBit, QSGD, RandK, Scaled,
                           ScaledSign, TopK, parse)
from .compression import Compression
from .optim import FrozenVarianceAdamW, MomentumCorrectedAdamW
from . import elastic   # hc.elastic.TorchState; registers Compression with Horovod's TorchState handlers

__all__ = ["Compression", "Compressor", "TopK", "RandK", "Natural", "ScaledSign", "OneBit", "QSGD", "BFloat16",
           "Compose", "Scaled", "Identity", "parse", "FrozenVarianceAdamW",
           "MomentumCorrectedAdamW"]
