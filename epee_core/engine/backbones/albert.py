"""ALBERT adapter: factorised embeddings → `embedding_hidden_mapping_in` → one shared layer group applied L times.

Each application of the shared group counts as one layer, so there is an exit after every application.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .base import layer_output
from .bert import BertAdapter


class AlbertAdapter(BertAdapter):
    """BERT's bidirectional padding bias; factorised embeddings and shared layer groups."""

    kind = "albert"

    def embed(self, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        embedded, mask = super().embed(inputs)
        return self.model.encoder.embedding_hidden_mapping_in(embedded), mask

    def layer(self, index: int, hidden: torch.Tensor, attention_bias: torch.Tensor | None) -> torch.Tensor:
        # Which group serves layer `index`, as in `AlbertTransformer.forward` (ALBERT checkpoints use 1 group).
        config = self.config
        group_index = int(index / (config.num_hidden_layers / config.num_hidden_groups))
        output = self.model.encoder.albert_layer_groups[group_index](hidden, attention_mask=attention_bias)
        return layer_output(output)
