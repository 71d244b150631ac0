"""BERT-family adapter (BERT, MiniLM): embeddings → `encoder.layer[i]`, bidirectional attention."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .base import BackboneAdapter, layer_output, padding_bias


class BertAdapter(BackboneAdapter):
    kind = "bert"
    default_pooling = "mean"

    def embed(self, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model.embeddings(
            input_ids=inputs["input_ids"], token_type_ids=inputs.get("token_type_ids")
        )
        return hidden, inputs["attention_mask"]

    def attention_bias(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return padding_bias(mask, dtype)

    def layer(self, index: int, hidden: torch.Tensor, attention_bias: torch.Tensor | None) -> torch.Tensor:
        return layer_output(self.model.encoder.layer[index](hidden, attention_mask=attention_bias))
