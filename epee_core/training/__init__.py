"""Training a backbone and its exit heads (`epee train`).

The names below load on first use (PEP 562): `epee --help` reads `training.recipes` without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["TrainConfig", "build_model", "train"]

if TYPE_CHECKING:
    from .trainer import TrainConfig, build_model, train


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(".trainer", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
