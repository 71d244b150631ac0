"""The runner's invariant (DESIGN §4): batching and compaction never change a sample's result, and they save work."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model, random_batch, single_row, tiny_bert_config
from transformers import BertForSequenceClassification

from epee_core.backbones import adapter_for
from epee_core.config import ModelSpec
from epee_core.model import EarlyExitModel
from epee_core.policies import make_policy
from epee_core.runner import run_early_exit

POLICIES = [
    ("full", {}),
    ("static", {"layer": 2}),
    ("max_prob", {"threshold": 0.9}),
    ("entropy", {"entropy_threshold": 0.2}),
    ("patience", {"patience": 1}),
    ("epee", {"entropy_threshold": 0.3, "patience": 2, "fast_ratio": 0.25}),
    ("epee", {"entropy_threshold": 0.4, "patience": 1, "ensemble": "window_mean"}),
    ("fpabee", {"similarity": "jsd", "similarity_threshold": 0.2, "patience": 1}),
    ("fpabee", {"similarity": "kl", "similarity_threshold": 0.5, "patience": 1}),
    ("oracle", {}),
]


@pytest.fixture(scope="module")
def tiny_models(tokenizer) -> dict[str, EarlyExitModel]:
    return {task: build_tiny_model(tokenizer, task=task) for task in ("text-classification", "multi-label")}


def random_labels(model: EarlyExitModel, batch_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    if model.multi_label:
        return (torch.rand(batch_size, len(model.spec.labels), generator=generator) > 0.5).float()
    return torch.randint(0, len(model.spec.labels), (batch_size,), generator=generator)


@pytest.mark.parametrize("task", ["text-classification", "multi-label"])
@pytest.mark.parametrize("batch_size", [1, 3, 16])
@pytest.mark.parametrize(("name", "params"), POLICIES)
def test_batched_run_equals_each_sample_alone(tiny_models, task, batch_size, name, params):
    model = tiny_models[task]
    policy = make_policy(name, params)
    batch = random_batch(batch_size, len(model.tokenizer), seed=batch_size)
    labels = random_labels(model, batch_size)
    batched = run_early_exit(model, batch, policy, labels)
    for row in range(batch_size):
        alone = run_early_exit(model, single_row(batch, row), policy, labels[row : row + 1])
        assert batched.exit_layer[row] == alone.exit_layer[0], f"row {row}"
        assert torch.equal(
            batched.predictions(model.multi_label)[row], alone.predictions(model.multi_label)[0]
        )
        torch.testing.assert_close(batched.probs[row], alone.probs[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("name", "params"), [p for p in POLICIES if p[0] not in ("full", "static")])
def test_policies_give_mixed_exit_layers_on_the_test_models(tokenizer, name, params):
    """Guards the invariant test above: it only means something if rows leave at different layers."""
    model = build_tiny_model(tokenizer)
    batch = random_batch(16, len(tokenizer), seed=16)
    result = run_early_exit(model, batch, make_policy(name, params), random_labels(model, 16))
    assert len(set(result.exit_layer.tolist())) >= 2


def test_full_reproduces_bert_for_sequence_classification(tokenizer):
    torch.manual_seed(0)
    reference = BertForSequenceClassification(tiny_bert_config(len(tokenizer), num_labels=3)).eval()
    spec = ModelSpec(
        task="text-classification",
        labels=["a", "b", "c"],
        backbone="bert",
        pooling="cls",
        num_layers=4,
        hidden_size=32,
        head_dropout=0.0,
    )
    model = EarlyExitModel(spec, adapter_for(reference.bert), tokenizer).eval()
    last = model.exits.heads[-1]
    last.dense.load_state_dict(reference.bert.pooler.dense.state_dict())
    last.classifier.load_state_dict(reference.classifier.state_dict())

    batch = random_batch(6, len(tokenizer), seed=3)
    expected = reference(**batch).logits
    result = run_early_exit(model, batch, make_policy("full"))
    assert result.exit_layer.tolist() == [4] * 6
    torch.testing.assert_close(result.logits, expected, atol=1e-5, rtol=0)


def count_rows_and_lengths(model: EarlyExitModel) -> list[tuple[int, int]]:
    """Record (rows, sequence length) of the hidden states every BertLayer really receives."""
    calls: list[tuple[int, int]] = []
    for layer in model.backbone.model.encoder.layer:
        layer.register_forward_pre_hook(
            lambda module, args, kwargs: calls.append(tuple(args[0].shape[:2])), with_kwargs=True
        )
    return calls


def test_compaction_runs_later_layers_on_remaining_rows_only(tokenizer):
    model = build_tiny_model(tokenizer)
    batch = random_batch(8, len(tokenizer), seed=5)
    first_exit = model.forward_all_exits(batch)[0].argmax(-1)
    # oracle: rows 0..3 are correct at layer 1 and leave; rows 4..7 get a label layer 1 does not predict
    labels = torch.cat([first_exit[:4], (first_exit[4:] + 1) % 3])
    calls = count_rows_and_lengths(model)
    result = run_early_exit(model, batch, make_policy("oracle"), labels)
    assert result.exit_layer[:4].tolist() == [1, 1, 1, 1]
    assert (result.exit_layer[4:] > 1).all()
    assert calls[0][0] == 8 and calls[1][0] == 4  # the real layer 2 saw half the batch
    assert [rows for rows, _ in calls] == result.rows_per_layer


def test_padding_no_remaining_row_needs_is_trimmed(tokenizer):
    model = build_tiny_model(tokenizer)
    batch = random_batch(4, len(tokenizer), max_len=12, seed=2)
    lengths = batch["attention_mask"].sum(1)
    layer1 = model.forward_all_exits(batch)[0].argmax(-1)
    labels = (layer1 + 1) % 3
    labels[0] = layer1[0]  # only the longest row (row 0, 12 tokens) leaves at layer 1
    calls = count_rows_and_lengths(model)
    run_early_exit(model, batch, make_policy("oracle"), labels)
    assert calls[0] == (4, 12)
    assert calls[1] == (3, int(lengths[1:].max()))


def test_left_padding_is_refused(tiny_model, tokenizer):
    batch = random_batch(3, len(tokenizer), seed=1)
    batch = {key: value.flip(1) for key, value in batch.items()}
    with pytest.raises(ValueError, match="right padding"):
        run_early_exit(tiny_model, batch, make_policy("full"))


def test_runner_works_inside_inference_mode(tiny_model, tokenizer):
    with torch.inference_mode():
        result = run_early_exit(tiny_model, random_batch(5, len(tokenizer)), make_policy("epee"))
    assert result.exit_layer.shape == (5,)
