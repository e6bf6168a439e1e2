"""nn.Modules built on :mod:`attnkit.functional`: parameters plus a forward that calls one kernel."""

from .attend import Attend, GateTap, Tap, WeightsTap

__all__ = ["Attend", "GateTap", "Tap", "WeightsTap"]
