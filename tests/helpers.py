"""Shared test builders: tiny random early-exit models of every backbone (4 layers, hidden 32), random token and
pixel batches, and the embedded demo data. Fixtures live in conftest.py and call these."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import torch
from transformers import (
    AlbertConfig,
    AutoModel,
    BertConfig,
    BertModel,
    GPT2Config,
    PretrainedConfig,
    ViTConfig,
)

from epee_core.engine.backbones import adapter_for
from epee_core.engine.gate import ExitGate
from epee_core.engine.inputs import default_image_processor
from epee_core.engine.model import EarlyExitModel
from epee_core.engine.signals import GATE_FEATURES
from epee_core.engine.spec import ModelSpec

DEMO_DATA = Path(__file__).resolve().parents[1] / "epee_core" / "data"
# Relation rows: entities the model can mark, and a tail that occurs only inside the head (GIT has such rows).
MARKABLE_RELATION_ROW = {
    "text": "aspirin raises warfarin levels",
    "head": "aspirin",
    "tail": "warfarin",
    "relation": "effect",
}
UNMARKABLE_RELATION_ROW = {
    "text": "mpa treatment raised lipids",
    "head": "mpa treatment",
    "tail": "mpa",
    "relation": "effect",
}
NUM_LAYERS = 4
HIDDEN = 32
IMAGE_SIZE = 16
LABELS = {
    "text-classification": ["a", "b", "c"],
    "multi-label": ["x", "y", "z", "w"],
    "relation-extraction": ["None", "r1", "r2"],
    "image-classification": ["a", "b", "c"],
}


def tiny_spec(**overrides) -> ModelSpec:
    """A 4-layer text-classification spec over labels a, b, c (fields overridable)."""
    fields = dict(task="text-classification", labels=LABELS["text-classification"], backbone="bert",
                  pooling="mean", num_layers=NUM_LAYERS, hidden_size=HIDDEN)  # fmt: skip
    return ModelSpec(**{**fields, **overrides})


TINY_SIZE = {"hidden_size": HIDDEN, "num_attention_heads": 2, "intermediate_size": 64}


def tiny_bert_config(vocab_size: int, num_layers: int = NUM_LAYERS, **extra) -> BertConfig:
    config = BertConfig(
        vocab_size=vocab_size, num_hidden_layers=num_layers, max_position_embeddings=128, **TINY_SIZE, **extra
    )
    config._attn_implementation = "sdpa"
    return config


def save_tiny_backbone(directory: Path, tokenizer, num_layers: int) -> Path:
    """`directory` as a local Hugging Face checkpoint (tiny random BERT + `tokenizer`), as a user would point at."""
    BertModel(tiny_bert_config(len(tokenizer), num_layers=num_layers)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_config(kind: str, vocab_size: int) -> PretrainedConfig:
    """A 4-layer, 32-wide config of `kind`; dropout is left on so that tests must call `.eval()`."""
    if kind == "albert":
        return AlbertConfig(
            vocab_size=vocab_size,
            embedding_size=16,
            num_hidden_layers=NUM_LAYERS,
            max_position_embeddings=64,
            hidden_dropout_prob=0.1,
            **TINY_SIZE,
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
            num_hidden_layers=NUM_LAYERS,
            hidden_dropout_prob=0.1,
            # Larger random weights than the 0.02 default, so the CLS token differs between images and layers.
            initializer_range=0.3,
            **TINY_SIZE,
        )
    raise ValueError(kind)


def build_tiny_model(
    tokenizer=None,
    task: str = "text-classification",
    kind: str = "bert",
    num_layers: int = NUM_LAYERS,
    pooling: str | None = None,
    seed: int = 0,
    head_scale: float = 10.0,
) -> EarlyExitModel:
    """A random tiny early-exit model of backbone `kind` whose exit heads are scaled up so that exits are
    confident and vary by sample (with default-sized random heads every exit is near-uniform and no early-exit
    rule ever fires). BERT models take `num_layers` and `pooling` (default mean); the others have 4 layers."""
    torch.manual_seed(seed)
    if kind == "bert":
        backbone = adapter_for(BertModel(tiny_bert_config(len(tokenizer), num_layers)))
        pooling = pooling or "mean"
    else:
        vocab_size = len(tokenizer) if tokenizer is not None else 0
        config = tiny_config(kind, vocab_size)
        backbone = adapter_for(AutoModel.from_config(config, attn_implementation="sdpa"))
    image = backbone.modality == "image"
    task = "image-classification" if image else task
    spec = ModelSpec(
        task=task,
        labels=LABELS[task],
        backbone=kind,
        pooling=pooling or backbone.default_pooling,
        num_layers=backbone.num_layers,
        hidden_size=HIDDEN,
        max_length=64,
        negative_label="None" if task == "relation-extraction" else None,
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


def mixed_gate() -> ExitGate:
    """A learned exit gate over confidence, depth, stability and length that gives the tiny models mixed exit
    layers."""
    features = len(GATE_FEATURES)
    weights = torch.tensor([3.0, 1.0, -1.0, 8.0, 2.0, 0.0, 4.0])
    return ExitGate.from_params(torch.full((features,), 0.1), torch.full((features,), 1.2), weights, -6.0)


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


def random_pixels(batch_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random images at the tiny ViT's size, each with its own contrast and brightness so that rows differ."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    contrast = torch.rand(batch_size, 1, 1, 1, generator=generator) * 3
    brightness = torch.randn(batch_size, 1, 1, 1, generator=generator)
    return {"pixel_values": noise * contrast + brightness}


class StubHandler(BaseHTTPRequestHandler):
    """A stub HTTP server's request handler: answers JSON bytes with `send_json` and logs nothing."""

    def send_json(self, status: int, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def labelled_rows(path: Path, count: int) -> Path:
    """`count` embedded demo sentences labelled a, b, c in turn (the tiny models' labels), as JSON Lines."""
    rows = [json.loads(line) for line in (DEMO_DATA / "ade_demo_dev.jsonl").open()][:count]
    path.write_text(
        "".join(json.dumps({"text": r["text"], "label": "abc"[i % 3]}) + "\n" for i, r in enumerate(rows))
    )
    return path


def calibrate_tiny(model_dir: Path, tmp_path: Path, *flags: str) -> tuple[Path, Path]:
    """`epee calibrate --guarantee none` of a tiny model on 60 labelled rows, with `flags`; returns the written
    model YAML and logit cache."""
    from epee_core.cli import main

    data = labelled_rows(tmp_path / "dev.jsonl", 60)
    output, cache = tmp_path / "tiny.yaml", tmp_path / "cache.safetensors"
    argv = ["calibrate", "--model", str(model_dir), "--data", str(data), "--output", str(output),
            "--guarantee", "none", "--cache", str(cache), "--json", *flags]  # fmt: skip
    assert main(argv) == 0
    return output, cache
