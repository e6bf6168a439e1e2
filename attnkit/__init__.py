"""attnkit: attention mechanisms for PyTorch — kernels, modules, visualisation and tasks on real data.

Example:
    >>> import torch, attnkit
    >>> q = k = v = torch.randn(1, 2, 4, 8)             # (B, H, L, E)
    >>> attnkit.scaled_dot_product_attention(q, k, v, is_causal=True).shape
    torch.Size([1, 2, 4, 8])
"""

import importlib
from typing import Any

from .functional import (
    CausalMask,
    PaddingMask,
    attention_weights,
    causal_mask,
    padding_mask,
    scaled_dot_product_attention,
    which_backend,
)

__version__ = "0.1.0"

# Subpackages load on first use (``attnkit.viz`` pulls in matplotlib, ``attnkit.models`` the data loaders).
_SUBPACKAGES = ("functional", "layers", "viz", "models", "data", "tasks", "bench", "distributed", "train")


# The module registry lives in attnkit.layers (it names layers' classes); its three functions load with it.
_REGISTRY_NAMES = ("create_attention", "list_attentions", "register_attention")


def __getattr__(name: str) -> Any:
    if name in _REGISTRY_NAMES:
        return getattr(importlib.import_module(f"{__name__}.layers.registry"), name)
    if name == "registry":
        return importlib.import_module(f"{__name__}.registry")
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'attnkit' has no attribute {name!r}")

__all__ = [
    "CausalMask",
    "PaddingMask",
    "__version__",
    "attention_weights",
    "causal_mask",
    "create_attention",
    "list_attentions",
    "padding_mask",
    "register_attention",
    "scaled_dot_product_attention",
    "which_backend",
]
