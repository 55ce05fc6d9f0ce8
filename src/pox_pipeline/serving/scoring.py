"""The one door from offline code into the service's model path: score photos exactly as the
service does (the published backend, TTA, guard and monitoring columns from one pass).

Publishing (the monitoring reference), ``pox predict`` / ``pox validate`` and the benchmarks
import :class:`Predictor` from here, never the service's internals (the ``protected``
contract in pyproject.toml), so the serving code behind it can change freely.
"""

from pox_pipeline.serving.predictor import Predictor, split_ood_score

__all__ = ["Predictor", "split_ood_score"]
