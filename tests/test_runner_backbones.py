"""Length bucketing (`run_bucketed`) keeps the runner's invariant on every backbone: ALBERT (shared layer), GPT-2
(causal mask rebuilt per sub-batch) and ViT (no padding: one batch)."""

from __future__ import annotations

import pytest
import torch
from helpers import build_tiny_model, random_batch, random_pixels, single_row

from epee_core.engine.model import EarlyExitModel
from epee_core.engine.policies import make_policy
from epee_core.engine.runner import run_bucketed, run_early_exit

KINDS = ["albert", "gpt2", "vit"]
POLICIES = [
    ("full", {}),
    ("entropy", {"entropy_threshold": 0.2}),
    ("patience", {"patience": 1}),
    ("epee", {"entropy_threshold": 0.4, "patience": 1, "ensemble": "window_mean"}),
    ("fpabee", {"similarity": "kl", "similarity_threshold": 0.5, "patience": 1}),
]


@pytest.fixture(scope="module")
def tiny_models(tokenizer) -> dict[str, EarlyExitModel]:
    return {kind: build_tiny_model(tokenizer, kind=kind) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("name", "params"), POLICIES)
def test_bucketed_run_equals_each_sample_alone(tiny_models, kind, name, params):
    model = tiny_models[kind]
    policy = make_policy(name, params)
    image = model.backbone.modality == "image"
    batch = random_pixels(12, seed=3) if image else random_batch(12, len(model.tokenizer), max_len=40, seed=3)
    bucketed = run_bucketed(model, batch, policy, overhead_tokens=4)
    for row in range(12):
        alone_inputs = (
            {"pixel_values": batch["pixel_values"][row : row + 1]} if image else single_row(batch, row)
        )
        alone = run_early_exit(model, alone_inputs, policy)
        assert bucketed.exit_layer[row] == alone.exit_layer[0], f"row {row}"
        assert bucketed.predictions(False)[row] == alone.predictions(False)[0], f"row {row}"
        torch.testing.assert_close(bucketed.probs[row], alone.probs[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["bert", *KINDS])
def test_stock_forward_gives_the_full_policys_logits(tokenizer, tiny_models, kind):
    """The `hf` benchmark baseline (the plain Hugging Face forward over the padded batch) answers as `full` does."""
    model = tiny_models.get(kind) or build_tiny_model(tokenizer, kind=kind)
    image = model.backbone.modality == "image"
    batch = random_pixels(6, seed=4) if image else random_batch(6, len(model.tokenizer), max_len=30, seed=4)
    full = run_bucketed(model, batch, make_policy("full"))
    torch.testing.assert_close(model.stock_logits(batch), full.logits, atol=1e-4, rtol=1e-4)
