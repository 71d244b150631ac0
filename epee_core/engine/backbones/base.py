"""The narrow interface every backbone adapter implements: embed → layer i (one at a time)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from transformers import PreTrainedModel


class BackboneAdapter(nn.Module):
    """A layer-by-layer view of a Hugging Face backbone, so the runner can stop rows between layers.

    Subclasses call the real `transformers` modules; they never re-implement attention.
    """

    kind: str = ""
    default_pooling: str = "mean"
    modality: str = "text"  # "text": tokenizer inputs; "image": `pixel_values`
    stock_inputs: tuple[str, ...] = (
        "input_ids",
        "attention_mask",
        "token_type_ids",
    )  # what `model(...)` takes

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model
        self.layer_runtime = None  # set by `onnx_layers.use_runtime`: runs `run_layer` outside torch

    @property
    def config(self):
        return self.model.config

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def embed(self, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states before layer 1 [B, T, H] and the padding mask [B, T] (1 = real token)."""
        raise NotImplementedError

    def attention_bias(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """The 4-D attention mask the layers take, built from the padding mask; rebuilt after each compaction."""
        raise NotImplementedError

    def layer(self, index: int, hidden: torch.Tensor, attention_bias: torch.Tensor | None) -> torch.Tensor:
        """Run layer `index` (0-based) on the rows given, in torch (what training differentiates)."""
        raise NotImplementedError

    def run_layer(
        self, index: int, hidden: torch.Tensor, attention_bias: torch.Tensor | None
    ) -> torch.Tensor:
        """Layer `index` as inference runs it: in the attached runtime (`onnx_layers.py`), else `layer`."""
        if self.layer_runtime is not None:
            return self.layer_runtime(index, hidden, attention_bias)
        return self.layer(index, hidden, attention_bias)

    def stock_forward(self, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The plain `transformers` forward over the whole padded batch, all layers: `last_hidden_state` and the
        padding mask. What a stock TorchServe handler runs; benchmarks time early exit against it."""
        hidden = self.model(
            **{name: inputs[name] for name in self.stock_inputs if name in inputs}
        ).last_hidden_state
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        return hidden, mask

    def exit_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the exit heads read after a layer. Post-LN models (BERT, ALBERT) read the layer output as is;
        pre-LN models (GPT-2, ViT) override this with their final layer norm, so the last exit reads exactly the
        plain model's `last_hidden_state`."""
        return hidden

    def resize_token_embeddings(self, vocab_size: int) -> None:
        self.model.resize_token_embeddings(vocab_size)

    def save_pretrained(self, directory: str) -> None:
        self.model.save_pretrained(directory)


def layer_output(output: torch.Tensor | tuple) -> torch.Tensor:
    """The hidden states of a `transformers` layer call (some layers return a tuple, some a tensor)."""
    return output[0] if isinstance(output, tuple) else output


def padding_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive [B, 1, 1, T] mask: 0 for real tokens, the dtype's minimum for padding (works for SDPA and eager)."""
    return _additive(mask[:, None, None, :].to(torch.bool), dtype)


def causal_padding_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive [B, 1, T, T] mask for causal models: position q sees keys k <= q that are real tokens.

    With right padding every query sees at least token 0, so no softmax row is fully masked.
    """
    length = mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    return _additive(causal[None, None, :, :] & mask[:, None, None, :].to(torch.bool), dtype)


def _additive(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean keep-mask as an additive float mask: 0 where kept, the dtype's minimum where dropped."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)
