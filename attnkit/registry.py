"""Kept for old imports: the registry is :mod:`attnkit.layers.registry` (it maps names to the classes of layers)."""

from attnkit.layers.registry import create_attention, get_attention_class, list_attentions, register_attention

__all__ = ["create_attention", "get_attention_class", "list_attentions", "register_attention"]
