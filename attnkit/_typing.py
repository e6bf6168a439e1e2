"""Typing helpers shared across attnkit (annotations only)."""

from __future__ import annotations

from typing import TypedDict

import torch


class FactoryKwargs(TypedDict):
    """The ``device=`` / ``dtype=`` pair a module passes on to the constructors of its parameters and submodules."""

    device: torch.device | str | None
    dtype: torch.dtype | None
