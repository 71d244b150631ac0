"""The cost model: embedding, per-layer and per-exit-head time measured once with the real model.

A batch that runs layer i on a fraction a_i of its rows costs about embed + Σ_i a_i · (layer + head): layer
cost scales with the rows still active (the runner compacts the batch). Every layer of one backbone has the same
shape, so the estimate uses the median of the measured layer (and head) times: on a busy machine one layer's
timing can be inflated many times over (seen here: 148 ms for one ViT layer, 1.4–1.8 ms for its siblings).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from ..engine.model import EarlyExitModel


@dataclass
class LayerTimes:
    """Milliseconds for one batch of `batch_size` rows of `seq_len` tokens (or the model's input size)."""

    batch_size: int
    seq_len: int
    embed_ms: float
    layer_ms: list[float]  # per layer
    head_ms: list[float]  # per exit head

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LayerTimes:
        return cls(**data)

    @property
    def step_ms(self) -> float:
        """One layer plus its exit head: the median over layers (they all have the same shape)."""
        return statistics.median(self.layer_ms) + statistics.median(self.head_ms)

    @property
    def full_ms(self) -> float:
        return self.embed_ms + len(self.layer_ms) * self.step_ms

    def batch_ms(self, exit_layer: torch.Tensor) -> float:
        """Estimated time of a batch whose rows exit at `exit_layer` (1-based) under the linear-in-rows model:
        the rows still active summed over layers is the number of rows times the average exit layer."""
        return self.embed_ms + float(exit_layer.float().mean()) * self.step_ms


@torch.inference_mode()
def measure_layer_times(
    model: EarlyExitModel,
    inputs: dict[str, torch.Tensor],
    min_repeats: int = 5,
    max_repeats: int = 100,
    budget_seconds: float = 3.0,
) -> LayerTimes:
    """Time embed, every layer and every exit head on one real batch, after one warm-up pass. Each figure is the
    fastest of its runs (other processes on a shared machine only ever add time); a small model gets more runs,
    as many as fit in `budget_seconds`, within [min_repeats, max_repeats]."""
    model.eval()
    backbone = model.backbone
    model.forward_all_exits(inputs)  # warm-up: allocator, kernels
    embed_runs: list[float] = []
    layer_runs: list[list[float]] = [[] for _ in range(model.num_layers)]
    head_runs: list[list[float]] = [[] for _ in range(model.num_layers)]
    deadline = time.perf_counter() + budget_seconds
    for repeat in range(max_repeats):
        if repeat >= min_repeats and time.perf_counter() > deadline:
            break
        started = time.perf_counter()
        hidden, mask = backbone.embed(inputs)
        bias = backbone.attention_bias(mask, hidden.dtype)
        embed_runs.append(time.perf_counter() - started)
        for index in range(model.num_layers):
            started = time.perf_counter()
            hidden = backbone.run_layer(index, hidden, bias)
            layer_done = time.perf_counter()
            model.exits(index, hidden, mask)
            head_runs[index].append(time.perf_counter() - layer_done)
            layer_runs[index].append(layer_done - started)

    def fastest_ms(runs: list[float]) -> float:
        return round(min(runs) * 1000.0, 4)

    return LayerTimes(
        batch_size=int(mask.shape[0]),
        seq_len=int(mask.shape[1]) if mask.dim() > 1 else 0,
        embed_ms=fastest_ms(embed_runs),
        layer_ms=[fastest_ms(runs) for runs in layer_runs],
        head_ms=[fastest_ms(runs) for runs in head_runs],
    )


def representative_batch(
    batches: list[tuple[dict, torch.Tensor]], batch_size: int
) -> dict[str, torch.Tensor]:
    """The full-size batch of median padded length (the cost model's reference input)."""
    full_size = [inputs for inputs, labels in batches if int(labels.shape[0]) == batch_size] or [
        batches[0][0]
    ]

    def padded_length(inputs: dict[str, torch.Tensor]) -> int:
        mask = inputs.get("attention_mask")
        return int(mask.shape[1]) if mask is not None else 0

    return sorted(full_size, key=padded_length)[len(full_size) // 2]
