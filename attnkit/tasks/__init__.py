"""One module per task: train / evaluate / report. Used by :mod:`attnkit.cli` and the tour.

A task module defines ``HELP``, ``add_arguments(parser)``, ``run(args) -> int`` and, for the tour,
``tour_section(out_dir: Path, quick: bool) -> attnkit.tasks.report.Section``.
"""
