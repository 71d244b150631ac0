"""The learned exit gate: a logistic regression over per-layer signals that estimates the probability that this
layer's prediction equals full depth's. The `gate` policy exits once that probability reaches `gate_threshold`.

Features per row at layer i (all in [0, 1]; `GATE_FEATURES` names them in order):
  confidence   max p (multi-label: min over labels of max(p, 1 − p))
  margin       top1 − top2 (multi-label: min over labels of |2p − 1|)
  entropy      normalised entropy H_i
  depth        i / L
  stable       consecutive earlier layers with the same prediction, / L
  jsd          Jensen–Shannon divergence from layer i − 1 (0 at layer 1)
  length       log1p(tokens) / log1p(512)

The gate is saved as `gate.safetensors` in the model directory (`epee train-gate` writes it).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .policies import divergence, layer_probs, normalised_entropy, predictions
from .spec import ConfigError

GATE_FILE = "gate.safetensors"
GATE_FEATURES = ("confidence", "margin", "entropy", "depth", "stable", "jsd", "length")
_LENGTH_SCALE = math.log1p(512.0)


def same_prediction(a: torch.Tensor, b: torch.Tensor, multi_label: bool) -> torch.Tensor:
    equal = predictions(a, multi_label) == predictions(b, multi_label)
    return equal.all(-1) if multi_label else equal


def stable_count(
    probs: torch.Tensor, prev_probs: torch.Tensor, counter: torch.Tensor, layer: int, multi_label: bool
) -> torch.Tensor:
    """How many consecutive earlier layers gave the same prediction as this one (0 at layer 1)."""
    unchanged = same_prediction(probs, prev_probs, multi_label) & (layer > 1)
    return torch.where(unchanged, counter + 1, torch.zeros_like(counter))


def gate_features(
    probs: torch.Tensor,
    prev_probs: torch.Tensor,
    stable: torch.Tensor,
    layer: int,
    num_layers: int,
    length: torch.Tensor,
    multi_label: bool,
) -> torch.Tensor:
    """The gate's features [B, F] at one layer (1-based) from this layer's and the previous layer's
    probabilities [B, C], the stable counter [B] (`stable_count`, already updated for this layer) and the row
    lengths in tokens [B]."""
    probs = probs.float()
    if multi_label:
        confidence = torch.maximum(probs, 1 - probs).amin(-1)
        margin = (2 * probs - 1).abs().amin(-1)
    else:
        top = probs.topk(min(2, probs.shape[-1]), dim=-1).values
        confidence = top[:, 0]
        margin = top[:, 0] - top[:, 1] if top.shape[-1] > 1 else top[:, 0]
    entropy = normalised_entropy(probs, multi_label)
    depth = torch.full_like(confidence, layer / num_layers)
    if layer > 1:
        jsd = divergence(prev_probs.float(), probs, "jsd", multi_label)
    else:
        jsd = torch.zeros_like(confidence)
    stable_fraction = stable.to(confidence.dtype) / num_layers
    length_feature = torch.log1p(length.to(confidence.dtype)) / _LENGTH_SCALE
    return torch.stack((confidence, margin, entropy, depth, stable_fraction, jsd, length_feature), dim=-1)


def all_layer_features(
    logits: torch.Tensor, lengths: torch.Tensor, multi_label: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [L, N, F] at every layer of cached logits [L, N, C], and the target [L, N] bool: does layer i
    predict what the last layer predicts. The same updates as the `gate` rule, layer by layer."""
    num_layers = logits.shape[0]
    probs = [layer_probs(z, multi_label) for z in logits]
    final = probs[-1]
    counter = torch.zeros(logits.shape[1], dtype=torch.long)
    prev = torch.zeros_like(final)
    features, targets = [], []
    for index, current in enumerate(probs):
        counter = stable_count(current, prev, counter, index + 1, multi_label)
        features.append(gate_features(current, prev, counter, index + 1, num_layers, lengths, multi_label))
        targets.append(same_prediction(current, final, multi_label))
        prev = current
    return torch.stack(features), torch.stack(targets)


class ExitGate(nn.Module):
    """Standardisation (mean, std) then logistic regression (weight, bias): features [B, F] → probability [B]."""

    def __init__(self, num_features: int = len(GATE_FEATURES)):
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))
        self.register_buffer("weight", torch.zeros(num_features))
        self.register_buffer("bias", torch.zeros(()))

    @classmethod
    def from_params(cls, mean, std, weight, bias) -> ExitGate:
        gate = cls(len(weight))
        for name, value in (("mean", mean), ("std", std), ("weight", weight), ("bias", bias)):
            getattr(gate, name).copy_(torch.as_tensor(value, dtype=torch.float32))
        return gate

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        standard = (features.float() - self.mean) / self.std
        # an elementwise sum per row (not a matmul): a row's probability never depends on its batch-mates
        return torch.sigmoid((standard * self.weight).sum(-1) + self.bias)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / GATE_FILE
        tensors = {name: tensor.detach().float().contiguous() for name, tensor in self.state_dict().items()}
        save_file(tensors, str(path), metadata={"features": ",".join(GATE_FEATURES)})
        return path

    @classmethod
    def load(cls, directory: str | Path) -> ExitGate | None:
        """The gate of a model directory, or None when it has no `gate.safetensors`."""
        path = Path(directory) / GATE_FILE
        if not path.is_file():
            return None
        try:
            tensors = load_file(str(path))
            gate = cls(int(tensors["weight"].numel()))
            gate.load_state_dict(tensors)
        except Exception as error:  # a truncated or foreign file: name it
            raise ConfigError(f"{path}: not an exit gate ({error})") from None
        if gate.weight.numel() != len(GATE_FEATURES):
            raise ConfigError(
                f"{path}: {gate.weight.numel()} features, this epee computes {len(GATE_FEATURES)}"
            )
        return gate.eval()
