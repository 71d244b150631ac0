"""Shared fixtures: tiny random BERT early-exit models (2–4 layers, hidden 32) so the suite stays fast."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from epee_core.backbones import adapter_for, minilm_path
from epee_core.config import ModelSpec
from epee_core.model import EarlyExitModel

DEMO_DATA = Path(__file__).resolve().parents[1] / "epee_core" / "data"
LABELS = {
    "text-classification": ["a", "b", "c"],
    "multi-label": ["x", "y", "z", "w"],
    "relation-extraction": ["None", "r1", "r2"],
}


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)


def tiny_bert_config(vocab_size: int, num_layers: int = 4, **extra) -> BertConfig:
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        **extra,
    )
    config._attn_implementation = "sdpa"
    return config


def build_tiny_model(
    tokenizer,
    task: str = "text-classification",
    num_layers: int = 4,
    pooling: str = "mean",
    seed: int = 0,
    head_scale: float = 10.0,
) -> EarlyExitModel:
    """A random tiny model whose exit heads are scaled up so that exits are confident and vary by sample
    (with default-sized random heads every exit is near-uniform and no early-exit rule ever fires)."""
    torch.manual_seed(seed)
    backbone = adapter_for(BertModel(tiny_bert_config(len(tokenizer), num_layers)))
    labels = LABELS[task]
    spec = ModelSpec(
        task=task,
        labels=labels,
        backbone="bert",
        pooling=pooling,
        num_layers=num_layers,
        hidden_size=32,
        max_length=64,
        negative_label="None" if task == "relation-extraction" else None,
    )
    model = EarlyExitModel(spec, backbone, tokenizer)
    with torch.no_grad():
        for head in model.exits.heads:
            head.dense.weight.mul_(head_scale)
            head.classifier.weight.mul_(head_scale)
    return model.eval()


@pytest.fixture
def tiny_model(tokenizer) -> EarlyExitModel:
    return build_tiny_model(tokenizer)


def random_batch(
    batch_size: int, vocab_size: int, max_len: int = 12, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Right-padded random token ids with mixed lengths (CLS first, SEP last) and the matching mask."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, max_len + 1, (batch_size,), generator=generator)
    lengths[0] = max_len  # at least one row of full length
    input_ids = torch.zeros(batch_size, max_len, dtype=torch.long)
    mask = torch.zeros(batch_size, max_len, dtype=torch.long)
    for row, length in enumerate(lengths.tolist()):
        input_ids[row, :length] = torch.randint(1000, vocab_size, (length,), generator=generator)
        input_ids[row, 0], input_ids[row, length - 1] = 101, 102
        mask[row, :length] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(input_ids)}


def single_row(batch: dict[str, torch.Tensor], row: int) -> dict[str, torch.Tensor]:
    """Row `row` of a batch alone, without its padding."""
    length = int(batch["attention_mask"][row].sum())
    return {key: value[row : row + 1, :length] for key, value in batch.items()}
