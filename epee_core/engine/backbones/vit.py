"""ViT adapter: patch embeddings + CLS token → `layers[i]` → exits read the CLS token of `layernorm(h)`.

Images have no padding: the mask is all ones and no attention mask is passed. ViT is pre-LN, so every exit reads
the hidden states through the model's final `layernorm` (the last exit reads `ViTModel`'s `last_hidden_state`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .base import BackboneAdapter, layer_output


class ViTAdapter(BackboneAdapter):
    kind = "vit"
    default_pooling = "cls"
    modality = "image"
    stock_inputs = ("pixel_values",)

    @property
    def image_size(self) -> int:
        return int(self.config.image_size)

    @property
    def num_channels(self) -> int:
        return int(self.config.num_channels)

    def _layers(self) -> nn.ModuleList:
        # transformers v5 renamed `encoder.layer` to `layers`; accept both.
        if hasattr(self.model, "layers"):
            return self.model.layers
        return self.model.encoder.layer

    def embed(self, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        pixel_values = inputs["pixel_values"].to(
            self.model.embeddings.patch_embeddings.projection.weight.dtype
        )
        hidden = self.model.embeddings(pixel_values)
        mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        return hidden, mask

    def attention_bias(self, mask: torch.Tensor, dtype: torch.dtype) -> None:
        return None

    def layer(self, index: int, hidden: torch.Tensor, attention_bias: torch.Tensor | None) -> torch.Tensor:
        output = self._layers()[index](hidden, attention_bias)
        return layer_output(output)

    def exit_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.layernorm(hidden)
