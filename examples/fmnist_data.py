"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (gzipped IDX files), pure numpy.

No torch import, so the loader works for every framework. The examples (run as files, ``python examples/X.py``,
which puts this folder first on ``sys.path``) import it as ``fmnist_data``; the experiments (run as modules from
the repository root, ``python -m scripts.reproduce ...``) as ``examples.fmnist_data``.
"""
import gzip
import os

import numpy as np

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
MEAN, STD = 0.2860, 0.3530          # of the Fashion-MNIST training images scaled to [0, 1]
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049
_SPLITS = {"train": "train", "test": "t10k", "t10k": "t10k"}


def _read_idx(path, magic, ndim):
    """The array of an IDX file whose big-endian header must hold ``magic`` and ``ndim`` dimensions."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX file ({len(data)} bytes)")
    got = int.from_bytes(data[:4], "big")
    if got != magic:
        raise ValueError(f"{path}: bad IDX magic number {got}, expected {magic}")
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise ValueError(f"{path}: IDX header says {dims} ({expected} bytes) but the file holds "
                         f"{len(data) - offset} bytes of data")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def load_fashion_mnist(split="train", root=DEFAULT_ROOT):
    """(images, labels) of a split: images float32 N x 1 x 28 x 28, normalized; labels int64 N.

    ``split`` is "train" (60,000 examples) or "test" / "t10k" (10,000).
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    prefix = _SPLITS[split]
    img_path = os.path.join(root, f"{prefix}-images-idx3-ubyte.gz")
    lbl_path = os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz")
    missing = [p for p in (img_path, lbl_path) if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files not found: {', '.join(missing)}. Install them with "
            f"`bash scripts/setup.sh` (from the repository root) or `apt-get install dataset-fashion-mnist`.")

    images = _read_idx(img_path, _IMAGES_MAGIC, 3)
    labels = _read_idx(lbl_path, _LABELS_MAGIC, 1)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{img_path} holds {images.shape[0]} images but {lbl_path} holds "
                         f"{labels.shape[0]} labels")
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{img_path}: expected 28x28 images, got {images.shape[1:]}")

    x = images.astype(np.float32)[:, None, :, :] / np.float32(255.0)
    x = (x - np.float32(MEAN)) / np.float32(STD)
    return x.astype(np.float32, copy=False), labels.astype(np.int64)
