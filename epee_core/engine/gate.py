"""The learned exit gate: a logistic regression over per-layer signals that estimates the probability that this
layer's prediction equals full depth's. The `gate` policy exits once that probability reaches `gate_threshold`.

Its features per row (`GATE_FEATURES`) are computed by `signals.gate_features`, which the `gate` rule of
`policies.py` calls too.

The gate is saved as `gate.safetensors` in the model directory (`epee train-gate` writes it).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .signals import GATE_FEATURES, gate_features, layer_probs, same_prediction, stable_count
from .spec import ConfigError

GATE_FILE = "gate.safetensors"


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
