"""Benchmarks: every figure is a median time measured in this process, shown as a ratio to a baseline measured
in the same run. ``python -m attnkit.bench SUITE`` (``dense``, ``modules``, ``vision``, ``long``)."""
