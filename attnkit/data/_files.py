"""Find data files that ship inside installed packages, without importing those packages."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path


class DataNotFoundError(FileNotFoundError):
    """A data set is missing; the message names the command that installs it."""


def package_file(distribution: str, relative: str, *, install: str) -> Path:
    """Path of ``relative`` inside the installed ``distribution`` (never imports it).

    Raises:
        DataNotFoundError: the distribution or the file is missing; the message says ``install``.
    """
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise DataNotFoundError(
            f"the data package {distribution!r} is not installed; install it with: {install}"
        ) from None
    path = Path(str(dist.locate_file(relative)))
    if not path.exists():
        raise DataNotFoundError(f"{relative!r} is missing from {distribution!r} ({path}); reinstall it with: {install}")
    return path


def system_file(path: str | Path, *, install: str) -> Path:
    """A file installed by the system package manager, or a clear error naming the install command."""
    p = Path(path)
    if not p.exists():
        raise DataNotFoundError(f"{p} is missing; install it with: {install}")
    return p
