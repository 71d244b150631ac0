"""Calibration: cache every exit's logits once, replay every policy setting offline with the live
runner's `policy_step`, and pick the fastest setting within an accuracy budget (or a speed-up target).

cache.py      the logit cache file and its fingerprint
replay.py     a policy over cached logits
timing.py     per-layer time measured with the real model (the cost model)
search.py     search space, scoring, Pareto frontier, the choice and its held-back check
sweep.py      `calibrate`: all of the above on one cache
model_yaml.py the TorchServe model YAML
plot.py       the Pareto PNG
pipeline.py   `epee calibrate` end to end (files in, files out)
"""

from .cache import LogitCache, StaleCacheError, build_cache, fingerprint, load_fresh
from .model_yaml import ServingOptions, model_yaml
from .pipeline import CalibrationJob, run_calibration
from .replay import ReplayResult, replay_policy
from .search import Setting, pareto_frontier, search_space
from .sweep import METRICS, CalibrationOptions, CalibrationResult, calibrate
from .timing import LayerTimes, measure_layer_times

__all__ = [
    "METRICS",
    "CalibrationJob",
    "CalibrationOptions",
    "CalibrationResult",
    "LayerTimes",
    "LogitCache",
    "ReplayResult",
    "ServingOptions",
    "Setting",
    "StaleCacheError",
    "build_cache",
    "calibrate",
    "fingerprint",
    "load_fresh",
    "measure_layer_times",
    "model_yaml",
    "pareto_frontier",
    "replay_policy",
    "run_calibration",
    "search_space",
]
