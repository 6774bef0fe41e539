"""Evaluation of samples and of a run's network: the metric registry, the evaluator, and
the in-training evaluation hook.

`Evaluator(samples, ...)` (`evaluator.py`) computes what the requested metrics need once
and lazily (the Inception network, sample features, reference features and statistics, the
held-out split); a metric is an entry of `METRICS`, `fn(ev) -> dict of numbers` (adding one
is one function and one entry in its module's part of the registry): metrics of samples in
`sample_metrics.py`, metrics of the run's network on held-out data (`HELDOUT_METRICS`) in
`heldout.py`. `hook.py`: `make_eval_hook`, the evaluation during training. Reference data
and its cached features / statistics: `core.reference`.
"""

from core.evaluation.evaluator import Evaluator, Options, RunNetwork
from core.evaluation.heldout import HELDOUT, heldout_log_likelihood
from core.evaluation.hook import make_eval_hook
from core.evaluation.sample_metrics import SAMPLE_METRICS

METRICS = {**SAMPLE_METRICS, **HELDOUT}  # name -> fn(Evaluator) -> dict of numbers
HELDOUT_METRICS = tuple(HELDOUT)  # need the run's network and data, not samples

__all__ = [
    "HELDOUT_METRICS",
    "METRICS",
    "Evaluator",
    "Options",
    "RunNetwork",
    "heldout_log_likelihood",
    "make_eval_hook",
]
