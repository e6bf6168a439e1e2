"""nn.Modules built on :mod:`attnkit.functional`: parameters plus a forward that calls one kernel."""
