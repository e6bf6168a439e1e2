"""Name -> class registry: ``create_attention("cbam", 64)``, ``list_attentions()``.

A dict, not an if-chain. Modules register themselves with :func:`register_attention` where they are defined;
importing this module imports :mod:`attnkit.layers` first (its package), which fills the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

__all__ = ["create_attention", "get_attention_class", "list_attentions", "register_attention"]

T = TypeVar("T", bound=type[nn.Module])

_REGISTRY: dict[str, type[nn.Module]] = {}


def _qualified(cls: type) -> str:
    """A class's import path; a module imported twice (doctest by file path) registers the same name again."""
    return f"{cls.__module__}.{cls.__qualname__}"


def register_attention(*names: str) -> Callable[[T], T]:
    """Class decorator: make a module constructible by name (first name is the canonical one)."""

    def wrap(cls: T) -> T:
        for name in names:
            key = name.lower()
            if key in _REGISTRY and _qualified(_REGISTRY[key]) != _qualified(cls):
                raise ValueError(f"attention name {key!r} is already registered to {_REGISTRY[key].__name__}")
            _REGISTRY[key] = cls
        return cls

    return wrap


def list_attentions() -> list[str]:
    """Every registered name, sorted."""
    return sorted(_REGISTRY)


def get_attention_class(name: str) -> type[nn.Module]:
    key = name.lower() if isinstance(name, str) else name
    if key not in _REGISTRY:
        raise ValueError(f"expected an attention name in {sorted(_REGISTRY)}, got {name!r}; try list_attentions()")
    return _REGISTRY[key]


def create_attention(name: str, *args: Any, **kwargs: Any) -> nn.Module:
    """Build a registered attention module by name: ``create_attention("se", 64, rd_ratio=1/8)``.

    Raises:
        ValueError: the name is unknown; the message lists the valid names.
    """
    return get_attention_class(name)(*args, **kwargs)
