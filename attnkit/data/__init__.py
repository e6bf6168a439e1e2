"""Loaders for the data sets that ship offline in packages (see DESIGN.md's data table)."""

from ._files import DataNotFoundError, package_file
from .images import ImageSplits, load_digits8, load_fashion_mnist, load_images, load_mnist

__all__ = [
    "DataNotFoundError",
    "ImageSplits",
    "load_digits8",
    "load_fashion_mnist",
    "load_images",
    "load_mnist",
    "package_file",
]
