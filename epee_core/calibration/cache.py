"""The logit cache: one full-depth pass records every exit's logits, so policies are replayed offline.

A cache is one safetensors file holding tensors only (`logits` [L, N, C], `labels` [N] or [N, C], `lengths` [N]
real tokens per row, which the learned gate reads) and string
metadata: a fingerprint of the model directory and of the data (file hash + `max_samples`), plus the per-layer
timing measured when it was built. A cache whose fingerprint no longer matches is stale and is never used.
Data without labels (`--guarantee consistency` only) is cached with full depth's predictions as its labels and
marked `labelled: false`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from tqdm.auto import tqdm

from ..engine.model import SPEC_FILE, EarlyExitModel
from ..engine.signals import layer_probs, predictions
from ..engine.spec import ConfigError, hash_files

CACHE_FORMAT = "epee-calibration-cache/1"
# Files of a model directory that decide its logits: weights, configs, tokenizer / image-processor files.
_MODEL_SUFFIXES = (".safetensors", ".bin", ".pt", ".json", ".txt", ".model")


class StaleCacheError(ConfigError):
    """A cache file built from another model, data file or sample count."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: stale calibration cache: {reason}")
        self.reason = reason


def model_fingerprint(model_dir: str | Path) -> str:
    """sha256 over the weight, config and tokenizer files of a model directory, and its `epee.yaml`."""
    root = Path(model_dir)
    files = sorted(
        path
        for path in root.iterdir()
        if path.is_file() and (path.suffix in _MODEL_SUFFIXES or path.name == SPEC_FILE)
    )
    if not any(path.name == SPEC_FILE for path in files):
        raise ConfigError(f"{root}: not an epee model directory (missing {SPEC_FILE})")
    return hash_files(files, root)


def data_fingerprint(data_path: str | Path, max_samples: int | None) -> dict[str, Any]:
    """What identifies the calibration data: the hash of the file (or of every file of an image folder) and
    how many examples were read."""
    path = Path(data_path)
    if path.is_file():
        digest = hash_files([path], path.parent)
    elif path.is_dir():
        digest = hash_files(sorted(p for p in path.rglob("*") if p.is_file()), path)
    else:
        raise ConfigError(f"{path}: data file not found")
    return {"data_sha256": digest, "max_samples": max_samples}


def fingerprint(model_dir: str | Path, data_path: str | Path, max_samples: int | None) -> dict[str, Any]:
    """The full fingerprint a cache must match to be reused."""
    return {"model_sha256": model_fingerprint(model_dir), **data_fingerprint(data_path, max_samples)}


@dataclass
class LogitCache:
    """Every exit's logits for every sample, the gold labels, and where they came from."""

    logits: torch.Tensor  # [L, N, C] float32
    labels: torch.Tensor  # [N] long, or multi-hot [N, C] float for multi-label
    fingerprint: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, Any] | None = None  # `LayerTimes.as_dict()` measured with the model that built it
    labelled: bool = True  # False: `labels` are full depth's predictions (the data had none)
    lengths: torch.Tensor | None = (
        None  # [N] float: each row's real tokens (None: a cache that predates them)
    )
    reference: torch.Tensor | None = None  # [N, C] float32 full depth's logits when `logits` come from int8

    @property
    def full_depth_logits(self) -> torch.Tensor:
        """The logits `full` is judged by: the cache's own, or with the float32 model's last exit when the cache
        holds a quantized model's exits (int8 is calibrated against float32 full depth)."""
        if self.reference is None:
            return self.logits
        return torch.cat([self.logits[:-1], self.reference[None]])

    @property
    def num_layers(self) -> int:
        return int(self.logits.shape[0])

    @property
    def num_samples(self) -> int:
        return int(self.logits.shape[1])

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {
            "format": CACHE_FORMAT,
            "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
            "timing": json.dumps(self.timing),
            "labelled": json.dumps(self.labelled),
        }
        tensors = {"logits": self.logits.contiguous(), "labels": self.labels.contiguous()}
        if self.reference is not None:
            tensors["reference"] = self.reference.contiguous()
        if self.lengths is not None:
            tensors["lengths"] = self.lengths.float().contiguous()
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> LogitCache:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: cache file not found")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise ConfigError(f"{path}: not a calibration cache ({error})") from None
        if metadata.get("format") != CACHE_FORMAT or not {"logits", "labels"} <= set(tensors) <= {
            "logits",
            "labels",
            "reference",
            "lengths",
        }:
            raise ConfigError(f"{path}: not a calibration cache (expected format {CACHE_FORMAT})")
        return cls(
            tensors["logits"],
            tensors["labels"],
            json.loads(metadata["fingerprint"]),
            json.loads(metadata.get("timing", "null")),
            json.loads(metadata.get("labelled", "true")),
            reference=tensors.get("reference"),
            lengths=tensors.get("lengths"),
        )

    def labelled_by_full_depth(self, multi_label: bool) -> LogitCache:
        """The same logits with full depth's predictions as labels (for data without labels): every metric then
        measures agreement with full depth."""
        predicted = predictions(layer_probs(self.logits[-1], multi_label), multi_label)
        labels = predicted.float() if multi_label else predicted.long()
        return LogitCache(
            self.logits,
            labels,
            self.fingerprint,
            self.timing,
            False,
            reference=self.reference,
            lengths=self.lengths,
        )


def stale_reason(cached: dict[str, Any], expected: dict[str, Any]) -> str | None:
    """Why a cache with fingerprint `cached` cannot stand for `expected`, or None when it matches."""
    reasons = {
        "model_sha256": "the model directory changed (weights, tokenizer or epee.yaml)",
        "data_sha256": "the data file changed",
        "max_samples": f"--max-samples was {cached.get('max_samples')}, now {expected.get('max_samples')}",
    }
    changed = [text for key, text in reasons.items() if cached.get(key) != expected.get(key)]
    return "; ".join(changed) if changed else None


def load_fresh(path: str | Path, expected: dict[str, Any]) -> LogitCache:
    """Load a cache and check it was built from the same model and data; raise `StaleCacheError` otherwise."""
    cache = LogitCache.load(path)
    reason = stale_reason(cache.fingerprint, expected)
    if reason is None and cache.lengths is None:
        reason = "the cache has no row lengths (the gate policy reads them)"
    if reason is not None:
        raise StaleCacheError(path, reason)
    return cache


@torch.inference_mode()
def build_cache(
    model: EarlyExitModel,
    batches: list[tuple[dict, torch.Tensor]],
    cache_fingerprint: dict[str, Any] | None = None,
) -> LogitCache:
    """One full-depth pass over prepared batches (no early exit): logits of every exit, in input order."""
    model.eval()
    all_logits, all_labels, all_lengths = [], [], []
    for inputs, labels in tqdm(batches, desc="caching exit logits", unit="batch"):
        all_logits.append(model.forward_all_exits(inputs).float())
        all_labels.append(labels)
        all_lengths.append(model.backbone.embed(inputs)[1].sum(1).float())  # the runner's padding mask
    return LogitCache(
        torch.cat(all_logits, dim=1),
        torch.cat(all_labels),
        dict(cache_fingerprint or {}),
        lengths=torch.cat(all_lengths),
    )
