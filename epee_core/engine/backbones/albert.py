"""ALBERT adapter: factorised embeddings → `embedding_hidden_mapping_in` → one shared layer group applied L times.

Each application of the shared group counts as one layer, so there is an exit after every application.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .base import BackboneAdapter, layer_output, padding_bias


class AlbertAdapter(BackboneAdapter):
    kind = "albert"
    default_pooling = "mean"

    def embed(self, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        embedded = self.model.embeddings(
            input_ids=inputs["input_ids"], token_type_ids=inputs.get("token_type_ids")
        )
        return self.model.encoder.embedding_hidden_mapping_in(embedded), inputs["attention_mask"]

    def attention_bias(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return padding_bias(mask, dtype)

    def layer(self, index: int, hidden: torch.Tensor, attention_bias: torch.Tensor | None) -> torch.Tensor:
        # Which group serves layer `index`, as in `AlbertTransformer.forward` (ALBERT checkpoints use 1 group).
        config = self.config
        group_index = int(index / (config.num_hidden_layers / config.num_hidden_groups))
        output = self.model.encoder.albert_layer_groups[group_index](hidden, attention_mask=attention_bias)
        return layer_output(output)
