"""ALBERT, GPT-2 and ViT adapters reproduce the plain Hugging Face models (the runner's invariant on every
backbone: tests/test_runner.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import NUM_LAYERS, build_tiny_model, random_batch, random_pixels, tiny_config
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import AutoModel, PreTrainedTokenizerFast

from epee_core.engine.backbones import SMALL_CONFIGS, build_backbone
from epee_core.engine.heads import pool
from epee_core.engine.inputs import encode_texts
from epee_core.engine.model import EarlyExitModel
from epee_core.engine.policies import make_policy
from epee_core.engine.runner import run_early_exit

KINDS = ["albert", "gpt2", "vit"]


@pytest.fixture(scope="module")
def tiny_models(tokenizer) -> dict[str, EarlyExitModel]:
    return {kind: build_tiny_model(tokenizer, kind=kind) for kind in KINDS}


def make_batch(model: EarlyExitModel, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
    """Mixed-length right-padded tokens for text backbones, random images for ViT."""
    if model.backbone.modality == "image":
        return random_pixels(batch_size, seed=seed)
    return random_batch(batch_size, len(model.tokenizer), seed=seed)


def hf_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the plain Hugging Face model is called with (GPT-2 takes no BERT segment ids)."""
    return {key: value for key, value in batch.items() if key != "token_type_ids"}


def real_tokens(batch: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
    mask = batch.get("attention_mask", torch.ones(hidden.shape[:2], dtype=torch.long))
    return hidden * mask[..., None]


@pytest.mark.parametrize("kind", KINDS)
def test_every_layer_matches_the_hf_model(tiny_models, kind):
    """Layer i of the adapter gives HF's hidden_states[i + 1]; after the last layer the exits read exactly HF's
    `last_hidden_state` (GPT-2's `ln_f` and ViT's `layernorm` included)."""
    model = tiny_models[kind]
    batch = make_batch(model, 5, seed=3)
    reference = model.backbone.model(**hf_inputs(batch), output_hidden_states=True)
    with torch.no_grad():
        hidden, mask = model.backbone.embed(batch)
        bias = model.backbone.attention_bias(mask, hidden.dtype)
        for index in range(NUM_LAYERS):
            hidden = model.backbone.layer(index, hidden, bias)
            if index < NUM_LAYERS - 1:  # GPT-2 reports its last layer after ln_f
                torch.testing.assert_close(
                    real_tokens(batch, hidden),
                    real_tokens(batch, reference.hidden_states[index + 1]),
                    atol=1e-5,
                    rtol=0,
                )
        final = model.backbone.exit_hidden(hidden)
    torch.testing.assert_close(
        real_tokens(batch, final), real_tokens(batch, reference.last_hidden_state), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("kind", KINDS)
def test_full_policy_equals_last_exit_on_the_hf_output(tiny_models, kind):
    model = tiny_models[kind]
    batch = make_batch(model, 6, seed=4)
    last_hidden = model.backbone.model(**hf_inputs(batch)).last_hidden_state
    mask = batch.get("attention_mask", torch.ones(last_hidden.shape[:2], dtype=torch.long))
    with torch.no_grad():
        expected = model.exits.heads[-1](pool(last_hidden, mask, model.spec.pooling))
    result = run_early_exit(model, batch, make_policy("full"))
    assert result.exit_layer.tolist() == [NUM_LAYERS] * 6
    torch.testing.assert_close(result.logits, expected, atol=1e-5, rtol=0)


def test_default_pooling_is_mean_for_albert_last_token_for_gpt2_cls_for_vit(tiny_models):
    assert {kind: tiny_models[kind].spec.pooling for kind in KINDS} == {
        "albert": "mean",
        "gpt2": "last",
        "vit": "cls",
    }


def test_gpt2_exit_depends_only_on_tokens_up_to_the_last_real_one(tiny_models):
    """Causal attention + last-token pooling: whatever sits in the padding never changes a row's logits."""
    model = tiny_models["gpt2"]
    batch = random_batch(4, len(model.tokenizer), seed=7)
    other_padding = {**batch, "input_ids": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 4242)}
    assert bool((batch["attention_mask"] == 0).any())
    torch.testing.assert_close(model.forward_all_exits(batch), model.forward_all_exits(other_padding))


def test_albert_applies_one_shared_layer_group_at_every_layer(tiny_models):
    backbone = tiny_models["albert"].backbone
    assert len(backbone.model.encoder.albert_layer_groups) == 1
    batch = random_batch(2, len(tiny_models["albert"].tokenizer), seed=1)
    hidden, mask = backbone.embed(batch)
    bias = backbone.attention_bias(mask, hidden.dtype)
    with torch.no_grad():
        outputs = [backbone.layer(index, hidden, bias) for index in range(NUM_LAYERS)]
    for output in outputs[1:]:
        torch.testing.assert_close(output, outputs[0], atol=0, rtol=0)


def test_gpt2_checkpoint_without_pad_token_pads_with_eos_on_the_right(tmp_path):
    """A local GPT-2 checkpoint with its own tokenizer (which, like GPT-2's, has no pad token) trains as is."""
    words = ["<unk>", "<eos>", "aspirin", "caused", "rash", "no", "effect"]
    vocabulary = {word: index for index, word in enumerate(words)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocabulary, unk_token="<unk>")),
        unk_token="<unk>",
        eos_token="<eos>",
    )
    tokenizer.backend_tokenizer.pre_tokenizer = Whitespace()
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(tmp_path)
    AutoModel.from_config(tiny_config("gpt2", len(words))).save_pretrained(tmp_path)

    backbone, loaded = build_backbone(str(tmp_path))
    assert backbone.kind == "gpt2"
    assert loaded.pad_token == "<eos>" and loaded.padding_side == "right"
    inputs = encode_texts(loaded, ["aspirin caused rash", "no effect"], max_length=16)
    assert inputs["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert inputs["input_ids"][1, 2] == vocabulary["<eos>"]


@pytest.mark.parametrize("name", ["albert-small", "gpt2-small", "vit-small"])
def test_small_backbones_build_with_their_preprocessor(name):
    backbone, preprocessor = build_backbone(name)
    assert name in SMALL_CONFIGS
    assert backbone.kind == name.removesuffix("-small")
    if backbone.modality == "image":
        assert dict(preprocessor.size) == {"height": backbone.image_size, "width": backbone.image_size}
    else:
        assert preprocessor.pad_token is not None and len(preprocessor) == backbone.config.vocab_size
