"""attnkit inside other libraries' models.

* :mod:`attnkit.integrations.transformers`: ``attn_implementation="attnkit"`` for HuggingFace transformers (5.x);
  importing it registers the implementation.

Nothing here is imported by ``import attnkit``: the integrations load their library only when you import them.
"""

__all__: list[str] = []
