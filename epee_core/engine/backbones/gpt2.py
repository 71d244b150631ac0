"""GPT-2 adapter: `wte + wpe` → `h[i]` under a causal + padding mask → exits read `ln_f(h)` at the last real token.

Rows are right-padded like every other text backbone, so the runner's compaction and padding trim stay the same;
the causal mask is built by hand from the padding mask (`causal_padding_bias`). GPT-2 is pre-LN: its blocks'
outputs are un-normalised residual streams, so every exit reads them through the model's own final `ln_f`
(the last exit then reads exactly `GPT2Model`'s `last_hidden_state`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .base import BackboneAdapter, causal_padding_bias, layer_output


class GPT2Adapter(BackboneAdapter):
    kind = "gpt2"
    default_pooling = "last"
    stock_inputs = ("input_ids", "attention_mask")

    def embed(self, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        # `token_type_ids` (which a BERT tokenizer adds) are ignored: GPT-2 has no segments.
        input_ids = inputs["input_ids"]
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
        hidden = self.model.wte(input_ids) + self.model.wpe(positions)
        return self.model.drop(hidden), inputs["attention_mask"]

    def attention_bias(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return causal_padding_bias(mask, dtype)

    def layer(self, index: int, hidden: torch.Tensor, attention_bias: torch.Tensor | None) -> torch.Tensor:
        output = self.model.h[index](hidden, attention_mask=attention_bias)
        return layer_output(output)

    def exit_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.ln_f(hidden)
