"""EPEE Serve: early-exit serving of biomedical transformers.

Layers, each importing only the ones above it in this list (docs/design.md, "Layers"; tests/test_layers.py
checks every import):

- `engine`: backbone adapters, exit heads, exit signals, policies, the layer-wise runner, the model directory.
- `serving`: request decoding and validation, batched engine calls, answers, the `epee:` serving configuration.
- `data`: labelled data sets (JSON Lines, MedMNIST `.npz`, image folders) and the embedded demo set.
- `evaluation`: task metrics and policies measured on labelled data.
- `training`: `epee train`.
- `calibration`: choosing a policy's thresholds from cached exit logits (`epee calibrate`).
- `ops`: `.mar` packaging, the TorchServe launcher and management client, the demo.
- `measure`: benchmarks, reports, Locust load tests, soaks.
- `cli`: the `epee` command.

The public API below is what the TorchServe handlers and users' scripts import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name → the module that defines it. Loaded on first use (PEP 562), so a light tool such as the container's
# health check (`python -m epee_core.ops.health`) can import a sub-package without torch.
_EXPORTS = {
    "ARCHIVE_MODEL_DIR": ".serving.service",
    "Answer": ".serving.service",
    "ConfigError": ".engine.spec",
    "ContinuousBatcher": ".serving.continuous",
    "EarlyExitModel": ".engine.model",
    "EarlyExitService": ".serving.service",
    "ExitResult": ".engine.runner",
    "ImageService": ".serving.images",
    "ModelSpec": ".engine.spec",
    "Policy": ".engine.policies",
    "PolicyError": ".engine.policies",
    "ServeConfig": ".serving.config",
    "TextService": ".serving.service",
    "debug_input_line": ".serving.request_log",
    "failure_answer": ".serving.service",
    "make_policy": ".engine.policies",
    "request_line": ".serving.request_log",
    "run_bucketed": ".engine.runner",
    "run_early_exit": ".engine.runner",
}
__all__ = [
    "ARCHIVE_MODEL_DIR",
    "Answer",
    "ConfigError",
    "ContinuousBatcher",
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


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'epee_core' has no attribute '{name}'")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:
    from .engine.model import EarlyExitModel
    from .engine.policies import Policy, PolicyError, make_policy
    from .engine.runner import ExitResult, run_bucketed, run_early_exit
    from .engine.spec import ConfigError, ModelSpec
    from .serving.config import ServeConfig
    from .serving.continuous import ContinuousBatcher
    from .serving.images import ImageService
    from .serving.request_log import debug_input_line, request_line
    from .serving.service import ARCHIVE_MODEL_DIR, Answer, EarlyExitService, TextService, failure_answer
