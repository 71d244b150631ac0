"""EPEE Serve: early-exit serving of biomedical transformers.

Layers, each importing only the ones above it in this list (docs/design.md, "Layers"):

- `engine`: backbone adapters, exit heads, policies, the layer-wise runner, the model directory.
- `data`: labelled data sets (JSON Lines, MedMNIST `.npz`, image folders) and the embedded demo set.
- `evaluation`: task metrics and policies measured on labelled data.
- `training`: `epee train`.
- `calibration`: choosing a policy's thresholds from cached exit logits (`epee calibrate`).
- `serving`: request decoding and validation, batched engine calls, answers, the `epee:` serving configuration.
- `ops`: `.mar` packaging, the TorchServe launcher and management client, the demo.
- `measure`: benchmarks, reports, Locust load tests, soaks.
- `cli`: the `epee` command.

The public API below is what the TorchServe handlers and users' scripts import.
"""

from .engine.model import EarlyExitModel
from .engine.policies import Policy, PolicyError, make_policy
from .engine.runner import ExitResult, run_bucketed, run_early_exit
from .engine.spec import ConfigError, ModelSpec
from .serving.config import ServeConfig
from .serving.images import ImageService
from .serving.request_log import debug_input_line, request_line
from .serving.service import ARCHIVE_MODEL_DIR, Answer, EarlyExitService, TextService, failure_answer

__all__ = [
    "ARCHIVE_MODEL_DIR",
    "Answer",
    "ConfigError",
    "EarlyExitModel",
    "EarlyExitService",
    "ExitResult",
    "ImageService",
    "ModelSpec",
    "Policy",
    "PolicyError",
    "ServeConfig",
    "TextService",
    "debug_input_line",
    "failure_answer",
    "make_policy",
    "request_line",
    "run_bucketed",
    "run_early_exit",
]
