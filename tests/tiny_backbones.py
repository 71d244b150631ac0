"""Tiny random ALBERT, GPT-2 and ViT early-exit models (4 layers, hidden 32) and image batches for fast tests."""

from __future__ import annotations

import torch
from transformers import AlbertConfig, AutoModel, GPT2Config, PretrainedConfig, ViTConfig

from epee_core.backbones import adapter_for
from epee_core.config import ModelSpec
from epee_core.images import default_image_processor
from epee_core.model import EarlyExitModel

NUM_LAYERS = 4
HIDDEN = 32
IMAGE_SIZE = 16
LABELS = ["a", "b", "c"]


def tiny_config(kind: str, vocab_size: int) -> PretrainedConfig:
    """A 4-layer, 32-wide config of `kind`; dropout is left on so that tests must call `.eval()`."""
    if kind == "albert":
        return AlbertConfig(
            vocab_size=vocab_size,
            embedding_size=16,
            hidden_size=HIDDEN,
            num_hidden_layers=NUM_LAYERS,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            hidden_dropout_prob=0.1,
        )
    if kind == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=HIDDEN,
            n_layer=NUM_LAYERS,
            n_head=2,
            n_positions=64,
            bos_token_id=101,
            eos_token_id=102,
            pad_token_id=0,
        )
    if kind == "vit":
        return ViTConfig(
            image_size=IMAGE_SIZE,
            patch_size=4,
            num_channels=3,
            hidden_size=HIDDEN,
            num_hidden_layers=NUM_LAYERS,
            num_attention_heads=2,
            intermediate_size=64,
            hidden_dropout_prob=0.1,
            # Larger random weights than the 0.02 default, so the CLS token differs between images and layers.
            initializer_range=0.3,
        )
    raise ValueError(kind)


def build_tiny_backbone_model(
    kind: str, tokenizer=None, pooling: str | None = None, seed: int = 0, head_scale: float = 10.0
) -> EarlyExitModel:
    """A random tiny early-exit model whose exit heads are scaled up so that exits are confident and vary by
    sample (as `conftest.build_tiny_model` does for BERT)."""
    torch.manual_seed(seed)
    vocab_size = len(tokenizer) if tokenizer is not None else 0
    backbone = adapter_for(AutoModel.from_config(tiny_config(kind, vocab_size), attn_implementation="sdpa"))
    image = backbone.modality == "image"
    spec = ModelSpec(
        task="image-classification" if image else "text-classification",
        labels=LABELS,
        backbone=kind,
        pooling=pooling or backbone.default_pooling,
        num_layers=NUM_LAYERS,
        hidden_size=HIDDEN,
        max_length=64,
        image_size=IMAGE_SIZE if image else None,
        num_channels=3 if image else None,
    )
    if image:
        model = EarlyExitModel(spec, backbone, image_processor=default_image_processor(IMAGE_SIZE))
    else:
        model = EarlyExitModel(spec, backbone, tokenizer)
    with torch.no_grad():
        for head in model.exits.heads:
            head.dense.weight.mul_(head_scale)
            head.classifier.weight.mul_(head_scale)
    return model.eval()


def random_pixels(batch_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random images at the tiny ViT's size, each with its own contrast and brightness so that rows differ."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    contrast = torch.rand(batch_size, 1, 1, 1, generator=generator) * 3
    brightness = torch.randn(batch_size, 1, 1, 1, generator=generator)
    return {"pixel_values": noise * contrast + brightness}
