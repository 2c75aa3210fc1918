"""MQAR (multi-query associative recall, Zoology) data generator, sweep runner and report.

`lm.mqar.generator.multiquery_ar` builds the task exactly as Zoology does (vectorised NumPy);
`lm.mqar.runner` is the ``longconv mqar`` command (a resumable grid sweep);
`lm.mqar.report` renders the markdown table and the Figure-2-style plot.
"""

from lm.mqar.generator import MQARError, multiquery_ar, scored_positions

__all__ = ["MQARError", "multiquery_ar", "scored_positions"]
