"""Exit heads: one small classifier after every layer, reading a pooled vector (docs/design.md, "Runner")."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

POOLINGS = ("mean", "cls", "last")


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per row from hidden states [B, T, H] and the padding mask [B, T] (1 = real token, right-padded).

    `mean`: masked mean over real tokens (text default); `cls`: the first token (BERT CLS, ViT);
    `last`: the last real token (GPT-2, causal models).
    """
    if pooling == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        last_index = mask.sum(1).long() - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_index]
    raise ValueError(f"unknown pooling '{pooling}': expected one of {', '.join(POOLINGS)}")


class ExitHead(nn.Module):
    """pooled → dense + tanh → dropout → linear: the shape of BERT's pooler + classification head."""

    def __init__(self, hidden_size: int, num_outputs: int, dropout: float = 0.1):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_outputs)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(torch.tanh(self.dense(pooled))))


class ExitHeads(nn.Module):
    """The exit head of every layer; `heads[i]` reads the output of layer i + 1.

    `read_hidden` maps a layer's output to what the heads see: the backbone's `exit_hidden` (its final layer norm
    for pre-LN models such as GPT-2 and ViT). It is a plain callable, not a sub-module, so the backbone's weights
    never enter `exits.safetensors`.
    """

    def __init__(
        self,
        num_layers: int,
        hidden_size: int,
        num_outputs: int,
        pooling: str,
        dropout: float = 0.1,
        read_hidden: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling '{pooling}': expected one of {', '.join(POOLINGS)}")
        self.pooling = pooling
        self.read_hidden = read_hidden
        self.heads = nn.ModuleList(ExitHead(hidden_size, num_outputs, dropout) for _ in range(num_layers))

    def forward(self, layer_index: int, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] of the exit after layer `layer_index` (0-based)."""
        if self.read_hidden is not None:
            hidden = self.read_hidden(hidden)
        return self.heads[layer_index](pool(hidden, mask, self.pooling))
