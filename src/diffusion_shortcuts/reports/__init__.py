"""What each command-line verb does, as plain functions: sample, steer, prune and fine-tune a model, judge
the results with the evaluation classifier (never a reward), and write the pictures and figures.

Each ``*_report(out, **flags)`` takes its verb's flags as keyword arguments (the names ``cli.py`` parses)
and returns the figures that ``cli.main`` writes to ``out/metrics.json``. Bad input is a
:class:`UsageError`: one line for the user, exit status 2.

One module per verb (``sample``, ``optimize``, ``prune``, ``finetune``, ``demo``) and what they share in
:mod:`.common`; a new verb is one module here, named in ``cli.VERBS``.
"""

from .common import subject_from
from .demo import demo_report
from .finetune import finetune_report
from .optimize import optimize_report
from .prune import calibrated_schedule, prune_report
from .sample import sample_report

__all__ = ["subject_from", "sample_report", "optimize_report", "prune_report", "calibrated_schedule",
           "finetune_report", "demo_report"]
