"""The runner's invariant (docs/design.md, "Runner"): batching and compaction never change a sample's result, and
they save work. The invariant runs over every policy of the registry on every backbone."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    build_tiny_model,
    mixed_gate,
    random_batch,
    random_pixels,
    single_row,
    tiny_bert_config,
    tiny_spec,
)
from transformers import BertForSequenceClassification

from epee_core.engine.backbones import adapter_for
from epee_core.engine.model import EarlyExitModel
from epee_core.engine.policies import POLICIES, POLICY_NAMES, Policy, first_exit_read, make_policy
from epee_core.engine.runner import length_buckets, run_bucketed, run_early_exit

# Backbone and task of each tiny model: every backbone, and BERT once more with multi-label exits.
MODELS = {
    "bert": ("bert", "text-classification"),
    "bert-multi-label": ("bert", "multi-label"),
    "albert": ("albert", "text-classification"),
    "gpt2": ("gpt2", "text-classification"),
    "vit": ("vit", "image-classification"),
}
# `full` and `static` send every row out at one layer by design; every other policy must give mixed exit layers.
VARYING_POLICIES = [name for name, rule in POLICIES.items() if rule.reads not in ("last", "layer")]


@pytest.fixture(scope="module")
def tiny_models(tokenizer) -> dict[str, EarlyExitModel]:
    """One tiny model per entry of MODELS, each with a learned exit gate so that the `gate` policy runs too."""
    models = {}
    for name, (kind, task) in MODELS.items():
        model = build_tiny_model(tokenizer, task=task, kind=kind)
        model.exit_gate = mixed_gate()
        models[name] = model
    return models


def make_batch(
    model: EarlyExitModel, batch_size: int, seed: int, max_len: int = 12
) -> dict[str, torch.Tensor]:
    """Mixed-length right-padded tokens for text backbones, random images for ViT."""
    if model.backbone.modality == "image":
        return random_pixels(batch_size, seed=seed)
    return random_batch(batch_size, len(model.tokenizer), max_len=max_len, seed=seed)


def row_alone(model: EarlyExitModel, batch: dict[str, torch.Tensor], row: int) -> dict[str, torch.Tensor]:
    if model.backbone.modality == "image":
        return {"pixel_values": batch["pixel_values"][row : row + 1]}
    return single_row(batch, row)


def random_labels(model: EarlyExitModel, batch_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    if model.multi_label:
        return (torch.rand(batch_size, len(model.spec.labels), generator=generator) > 0.5).float()
    return torch.randint(0, len(model.spec.labels), (batch_size,), generator=generator)


def distinct_exit_layers(model: EarlyExitModel, policy: Policy) -> int:
    batch, labels = make_batch(model, 16, seed=16, max_len=40), random_labels(model, 16)
    return len(set(run_early_exit(model, batch, policy, labels).exit_layer.tolist()))


@pytest.fixture(scope="module")
def varied_setting(tiny_models):
    """(model, policy name) → the policy's calibration-grid setting whose exit layers vary most on a fixed batch
    (its defaults when it has no grid): an invariant means something only when rows leave at different layers."""
    chosen: dict[tuple[str, str], Policy] = {}

    def setting(model_name: str, policy_name: str) -> Policy:
        if (model_name, policy_name) not in chosen:
            model = tiny_models[model_name]
            grid = POLICIES[policy_name].grid_settings(model.num_layers)
            candidates = [make_policy(policy_name, params) for params in grid] or [make_policy(policy_name)]
            with torch.inference_mode():
                best = max(candidates, key=lambda policy: distinct_exit_layers(model, policy))
            chosen[model_name, policy_name] = best
        return chosen[model_name, policy_name]

    return setting


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("policy_name", POLICY_NAMES)
@pytest.mark.parametrize("batch_size", [3, 16])
@pytest.mark.parametrize("bucketed", [False, True], ids=["one-batch", "bucketed"])
def test_batched_run_equals_each_row_alone(
    tiny_models, varied_setting, model_name, policy_name, batch_size, bucketed
):
    model, policy = tiny_models[model_name], varied_setting(model_name, policy_name)
    batch = make_batch(model, batch_size, seed=batch_size, max_len=40 if bucketed else 12)
    labels = random_labels(model, batch_size)  # `oracle` reads them, the others ignore them
    if bucketed:  # tiny sub-batch overhead, so even a small batch splits by length
        batched = run_bucketed(model, batch, policy, labels, overhead_tokens=4)
    else:
        batched = run_early_exit(model, batch, policy, labels)
    for row in range(batch_size):
        alone = run_early_exit(model, row_alone(model, batch, row), policy, labels[row : row + 1])
        assert batched.exit_layer[row] == alone.exit_layer[0], f"{policy.describe()}, row {row}"
        assert torch.equal(
            batched.predictions(model.multi_label)[row], alone.predictions(model.multi_label)[0]
        )
        torch.testing.assert_close(batched.probs[row], alone.probs[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(batched.logits[row], alone.logits[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("policy_name", VARYING_POLICIES)
def test_policies_give_mixed_exit_layers_on_the_test_models(
    tiny_models, varied_setting, model_name, policy_name
):
    """Guards the invariant test above: it only means something if rows leave at different layers."""
    assert distinct_exit_layers(tiny_models[model_name], varied_setting(model_name, policy_name)) >= 2


@pytest.mark.parametrize("model_name", ["bert", "bert-multi-label"])
@pytest.mark.parametrize("policy_name", POLICY_NAMES)
def test_bucketed_and_single_batch_runs_agree_and_count_their_work(
    tiny_models, varied_setting, model_name, policy_name
):
    model, policy = tiny_models[model_name], varied_setting(model_name, policy_name)
    batch = random_batch(16, len(model.tokenizer), seed=7)
    labels = random_labels(model, 16)
    single = run_early_exit(model, batch, policy, labels)
    bucketed = run_bucketed(model, batch, policy, labels)
    assert torch.equal(bucketed.exit_layer, single.exit_layer)
    torch.testing.assert_close(bucketed.probs, single.probs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(bucketed.entropy, single.entropy, atol=1e-5, rtol=1e-4)
    ran = [int((single.exit_layer > index).sum()) for index in range(model.num_layers)]
    expected_rows = [count for count in ran if count]
    assert single.rows_per_layer == bucketed.rows_per_layer == expected_rows
    assert len(single.tokens_per_layer) == len(expected_rows)
    assert all(tokens >= rows for tokens, rows in zip(bucketed.tokens_per_layer, expected_rows))


@pytest.mark.parametrize("model_name", MODELS)
def test_stock_forward_gives_the_full_policys_logits(tiny_models, model_name):
    """The `hf` benchmark baseline (the plain Hugging Face forward over the padded batch) answers as `full` does."""
    model = tiny_models[model_name]
    batch = make_batch(model, 6, seed=4, max_len=30)
    full = run_bucketed(model, batch, make_policy("full"))
    torch.testing.assert_close(model.stock_logits(batch), full.logits, atol=1e-4, rtol=1e-4)


def test_full_reproduces_bert_for_sequence_classification(tokenizer):
    torch.manual_seed(0)
    reference = BertForSequenceClassification(tiny_bert_config(len(tokenizer), num_labels=3)).eval()
    spec = tiny_spec(pooling="cls", head_dropout=0.0)
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


def count_head_calls(model: EarlyExitModel) -> list[int]:
    """Record which exit heads (0-based layer index) run."""
    calls: list[int] = []
    for index, head in enumerate(model.exits.heads):
        head.register_forward_pre_hook(lambda module, args, index=index: calls.append(index))
    return calls


def test_full_runs_only_the_last_exit_head(tokenizer):
    model = build_tiny_model(tokenizer)
    calls = count_head_calls(model)
    run_early_exit(model, random_batch(5, len(tokenizer)), make_policy("full"))
    assert calls == [3]


def test_static_runs_only_its_exit_head(tokenizer):
    model = build_tiny_model(tokenizer)
    calls = count_head_calls(model)
    result = run_early_exit(model, random_batch(5, len(tokenizer)), make_policy("static", {"layer": 2}))
    assert calls == [1] and result.exit_layer.tolist() == [2] * 5


def test_stateless_rules_skip_exit_heads_before_min_layer(tokenizer):
    model = build_tiny_model(tokenizer)
    calls = count_head_calls(model)
    run_early_exit(model, random_batch(5, len(tokenizer)), make_policy("entropy", {"min_layer": 3}))
    assert min(calls) == 2


@pytest.mark.parametrize("policy_name", [name for name, rule in POLICIES.items() if rule.reads == "every"])
def test_counting_rules_read_every_exit_even_with_min_layer(policy_name):
    assert first_exit_read(make_policy(policy_name, {"min_layer": 3}), 4) == 1


def test_static_below_min_layer_reads_only_the_last_exit():
    assert first_exit_read(make_policy("static", {"layer": 1, "min_layer": 2}), 4) == 4


def test_length_buckets_cover_every_row_once_shortest_first():
    lengths = [50, 8, 9, 48, 10, 52, 7, 49]
    buckets = length_buckets(lengths, overhead_tokens=16)
    assert sorted(row for bucket in buckets for row in bucket) == list(range(8))
    assert [sorted(lengths[row] for row in bucket) for bucket in buckets] == [[7, 8, 9, 10], [48, 49, 50, 52]]


def test_length_buckets_keep_one_batch_when_lengths_are_close():
    assert len(length_buckets([20, 21, 22, 20, 19], overhead_tokens=16)) == 1


def test_length_buckets_split_more_when_a_sub_batch_costs_less():
    lengths = [5, 10, 20, 40, 80]
    assert len(length_buckets(lengths, overhead_tokens=0)) == 5
    assert len(length_buckets(lengths, overhead_tokens=10_000)) == 1


def test_bucketed_sub_batches_carry_only_their_own_padding(tokenizer):
    model = build_tiny_model(tokenizer)
    batch = random_batch(6, len(tokenizer), max_len=40, seed=4)
    lengths = batch["attention_mask"].sum(1).tolist()
    buckets = length_buckets(lengths, overhead_tokens=4)
    assert len(buckets) > 1
    calls = count_rows_and_lengths(model)
    result = run_bucketed(model, batch, make_policy("full"), overhead_tokens=4)
    expected = [(len(rows), max(lengths[row] for row in rows)) for rows in buckets]
    assert (
        calls[: len(buckets)] == expected
    )  # layer 1 runs once per sub-batch, each as long as its longest row
    assert len(calls) == len(buckets) * model.num_layers
    assert result.rows_per_layer == [6] * model.num_layers


def batch_with_lengths(lengths: list[int], vocab_size: int) -> dict[str, torch.Tensor]:
    """A right-padded batch whose rows have exactly these token counts."""
    batch = random_batch(len(lengths), vocab_size, max_len=max(lengths), seed=9)
    mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
    return {**batch, "input_ids": batch["input_ids"] * mask, "attention_mask": mask}


def test_sub_batches_merge_when_rows_leave(tokenizer):
    model = build_tiny_model(tokenizer)
    batch = batch_with_lengths([18, 20, 28, 30], len(tokenizer))
    layer1 = model.forward_all_exits(batch)[0].argmax(-1)
    labels = torch.stack([layer1[0], (layer1[1] + 1) % 3, layer1[2], (layer1[3] + 1) % 3])
    calls = count_rows_and_lengths(model)
    result = run_bucketed(model, batch, make_policy("oracle"), labels, overhead_tokens=16)
    assert result.exit_layer[[0, 2]].tolist() == [1, 1]
    # layer 1: {18, 20} and {28, 30}; rows 0 and 2 leave; one sub-batch {20, 30} is cheaper than two
    assert calls[:3] == [(2, 20), (2, 30), (2, 30)]
    for row in range(4):
        alone = run_early_exit(model, single_row(batch, row), make_policy("oracle"), labels[row : row + 1])
        assert result.exit_layer[row] == alone.exit_layer[0]
        torch.testing.assert_close(result.probs[row], alone.probs[0], atol=1e-5, rtol=1e-4)


def test_bucketed_run_refuses_left_padding(tokenizer):
    model = build_tiny_model(tokenizer)
    batch = {key: value.flip(1) for key, value in random_batch(3, len(tokenizer), seed=1).items()}
    with pytest.raises(ValueError, match="right padding"):
        run_bucketed(model, batch, make_policy("full"))
