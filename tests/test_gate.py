"""The learned exit gate: features, the `gate` rule, save/load, replay, training, calibration and serving checks
(the runner invariant covers `gate` with every other policy: tests/test_runner.py)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from helpers import DEMO_DATA, LABELS, build_tiny_model, mixed_gate, random_batch

from epee_core.calibration.cache import LogitCache, build_cache
from epee_core.calibration.replay import replay_policy
from epee_core.calibration.search import search_space
from epee_core.calibration.sweep import CalibrationOptions, calibrate
from epee_core.cli import main
from epee_core.engine.gate import GATE_FILE, ExitGate, all_layer_features
from epee_core.engine.model import EarlyExitModel
from epee_core.engine.policies import PolicyError, init_state, make_policy, policy_step
from epee_core.engine.runner import run_early_exit
from epee_core.engine.signals import GATE_FEATURES, gate_features
from epee_core.engine.spec import ConfigError
from epee_core.evaluation.evaluate import prepare_batches
from epee_core.serving.config import ServeConfig
from epee_core.serving.service import TextService

F = len(GATE_FEATURES)


def confidence_gate(weight: float = 8.0, bias: float = -6.0) -> ExitGate:
    """A gate that trusts confidence (feature 0) only: p = sigmoid(weight · max p + bias)."""
    weights = torch.zeros(F)
    weights[0] = weight
    return ExitGate.from_params(torch.zeros(F), torch.ones(F), weights, bias)


# --- features --------------------------------------------------------------------------------------------------


def test_features_on_hand_built_probabilities():
    prev = torch.tensor([[0.5, 0.5], [0.2, 0.8]])
    probs = torch.tensor([[0.9, 0.1], [0.3, 0.7]])
    stable = torch.tensor([0, 2])
    features = gate_features(prev_probs=prev, probs=probs, stable=stable, layer=3, num_layers=6,
                             length=torch.tensor([511.0, 0.0]), multi_label=False)  # fmt: skip
    assert features.shape == (2, F)
    confidence, margin, entropy, depth, stable_f, jsd, length = features.T
    assert confidence.tolist() == pytest.approx([0.9, 0.7])
    assert margin.tolist() == pytest.approx([0.8, 0.4])
    h = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(2)
    assert entropy[0].item() == pytest.approx(h, abs=1e-5)
    assert depth.tolist() == pytest.approx([0.5, 0.5])
    assert stable_f.tolist() == pytest.approx([0.0, 2 / 6])
    assert jsd[0].item() == pytest.approx(
        0.101750, abs=1e-5
    )  # JSD((.5,.5), (.9,.1)), worked in test_policies
    assert length.tolist() == pytest.approx([math.log1p(511) / math.log1p(512), 0.0])


def test_multilabel_features_take_the_least_confident_label():
    probs = torch.tensor([[0.9, 0.3, 0.55]])
    features = gate_features(
        probs, torch.zeros_like(probs), torch.tensor([0]), 1, 4, torch.tensor([10.0]), True
    )
    assert features[0, 0].item() == pytest.approx(0.55)  # min of max(p, 1-p)
    assert features[0, 1].item() == pytest.approx(0.1)  # min |2p - 1|
    assert features[0, 5].item() == 0.0  # no divergence at layer 1


def test_all_layer_features_count_stable_layers_and_target_agreement_with_the_last():
    # one row: predictions 0, 1, 1, 1 over four layers
    probs = torch.tensor([[[0.8, 0.2]], [[0.4, 0.6]], [[0.3, 0.7]], [[0.1, 0.9]]])
    features, targets = all_layer_features(torch.log(probs), torch.tensor([5.0]), multi_label=False)
    assert features.shape == (4, 1, F)
    assert (features[:, 0, 4] * 4).round().tolist() == [0, 0, 1, 2]
    assert targets[:, 0].tolist() == [False, True, True, True]


# --- the rule --------------------------------------------------------------------------------------------------


def step_all(policy, probs_per_layer, gate, lengths):
    num_layers, batch = len(probs_per_layer), len(probs_per_layer[0])
    state = init_state(batch, len(probs_per_layer[0][0]), lengths=torch.tensor(lengths))
    exit_layer = torch.zeros(batch, dtype=torch.long)
    for index, probs in enumerate(probs_per_layer):
        step = policy_step(policy, torch.log(torch.tensor(probs)), state, index + 1, num_layers, gate=gate)
        state = step.state
        exit_layer[step.exit_mask & (exit_layer == 0)] = index + 1
    return exit_layer.tolist()


def test_gate_rule_fires_when_the_gate_probability_reaches_the_threshold():
    gate = confidence_gate()  # p(0.9) = sigmoid(1.2) = 0.77, p(0.6) = sigmoid(-1.2) = 0.23, p(0.99) = 0.86
    layers = [[[0.6, 0.4], [0.9, 0.1]], [[0.99, 0.01], [0.6, 0.4]], [[0.6, 0.4], [0.6, 0.4]]]
    assert step_all(make_policy("gate", {"gate_threshold": 0.7}), layers, gate, [4.0, 4.0]) == [2, 1]
    assert step_all(make_policy("gate", {"gate_threshold": 0.8}), layers, gate, [4.0, 4.0]) == [2, 3]
    assert step_all(
        make_policy("gate", {"gate_threshold": 0.7, "min_layer": 2}), layers, gate, [4.0, 4.0]
    ) == [
        2,
        3,
    ]


def test_gate_policy_without_a_gate_names_the_missing_file():
    with pytest.raises(PolicyError, match=GATE_FILE):
        step_all(make_policy("gate"), [[[0.9, 0.1]]], None, [3.0])
    with pytest.raises(PolicyError):
        make_policy("gate", {"gate_threshold": 0.0})


# --- save / load -----------------------------------------------------------------------------------------------


def test_gate_round_trips_through_the_model_directory(tokenizer, tmp_path):
    model = build_tiny_model(tokenizer)
    model.save_pretrained(tmp_path)
    assert EarlyExitModel.from_pretrained(tmp_path).exit_gate is None
    gate = mixed_gate()
    gate.save(tmp_path)
    loaded = EarlyExitModel.from_pretrained(tmp_path).exit_gate
    features = torch.rand(5, F)
    torch.testing.assert_close(loaded(features), gate(features))
    (tmp_path / GATE_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match=GATE_FILE):
        EarlyExitModel.from_pretrained(tmp_path)


# --- replay (the runner invariant over every policy: tests/test_runner.py) ----------------------------------


@pytest.fixture(scope="module")
def gated_models(tokenizer):
    models = {}
    for task in ("text-classification", "multi-label"):
        model = build_tiny_model(tokenizer, task=task)
        model.exit_gate = mixed_gate()
        models[task] = model
    return models


@pytest.mark.parametrize("task", ["text-classification", "multi-label"])
def test_replay_equals_the_live_runner_for_gate(gated_models, task):
    model = gated_models[task]
    batch = random_batch(16, len(model.tokenizer), max_len=30, seed=5)
    labels = torch.zeros(16, len(model.spec.labels)) if model.multi_label else torch.zeros(16).long()
    cache = build_cache(model, [(batch, labels)])
    assert cache.lengths.tolist() == batch["attention_mask"].sum(1).float().tolist()
    for threshold in (0.5, 0.6, 0.8):
        policy = make_policy("gate", {"gate_threshold": threshold})
        live = run_early_exit(model, batch, policy)
        replayed = replay_policy(
            policy, cache.logits, model.multi_label, gate=model.exit_gate, lengths=cache.lengths
        )
        assert replayed.exit_layer.tolist() == live.exit_layer.tolist()
    with pytest.raises(PolicyError, match="lengths"):
        replay_policy(policy, cache.logits, model.multi_label, gate=model.exit_gate)


def test_cache_keeps_row_lengths_and_an_old_cache_without_them_is_stale(tmp_path):
    from epee_core.calibration.cache import StaleCacheError, load_fresh

    cache = LogitCache(
        torch.zeros(2, 3, 2), torch.zeros(3).long(), {"model_sha256": "m"}, lengths=torch.ones(3)
    )
    cache.save(tmp_path / "c")
    assert LogitCache.load(tmp_path / "c").lengths.tolist() == [1.0, 1.0, 1.0]
    LogitCache(cache.logits, cache.labels, cache.fingerprint).save(tmp_path / "old")
    with pytest.raises(StaleCacheError, match="lengths"):
        load_fresh(tmp_path / "old", {"model_sha256": "m"})


# --- training and calibration ----------------------------------------------------------------------------------


def write_data(path, num_samples: int, seed: int, source: str = "ade_demo_train.jsonl"):
    """Demo sentences with random labels from the tiny model's label set."""
    rng = random.Random(seed)
    with (DEMO_DATA / source).open() as lines, path.open("w") as out:
        for _, line in zip(range(num_samples), lines):
            out.write(
                json.dumps(
                    {"text": json.loads(line)["text"], "label": rng.choice(LABELS["text-classification"])}
                )
                + "\n"
            )
    return path


def test_train_gate_cli_writes_the_gate_and_records_it(tokenizer, tmp_path, capsys):
    model_dir = tmp_path / "model"
    build_tiny_model(tokenizer).save_pretrained(model_dir)
    data = write_data(tmp_path / "train.jsonl", 40, seed=0)
    assert (
        main(["train-gate", "--model", str(model_dir), "--data", str(data), "--max-samples", "30", "--json"])
        == 0
    )
    record = json.loads(capsys.readouterr().out)
    assert (model_dir / GATE_FILE).is_file()
    assert record["rows"] == 30 and record["fit_rows"] + record["held_out_rows"] == 30
    assert 0.0 <= record["held_out"]["accuracy"] <= 1.0
    model = EarlyExitModel.from_pretrained(model_dir)
    assert model.exit_gate is not None
    assert model.spec.training["gate"]["data"] == str(data)
    assert model.spec.training["gate"]["rows"] == 30


def test_calibrate_with_a_gate_searches_and_certifies_gate_settings(gated_models):
    model = gated_models["text-classification"]
    examples = [json.loads(line) for line in (DEMO_DATA / "ade_demo_dev.jsonl").open()][:60]
    from epee_core.engine.inputs import Example

    rng = random.Random(0)
    labelled = [Example(e["text"], label=rng.choice(LABELS["text-classification"])) for e in examples]
    batches = prepare_batches(model, labelled, 16)
    cache = build_cache(model, batches)
    assert not any(p.name == "gate" for p in search_space(model.num_layers))
    result = calibrate(
        cache,
        model.spec,
        CalibrationOptions(guarantee="accuracy", held_back_fraction=0.6, max_accuracy_drop=0.2),
        gate=model.exit_gate,
    )
    assert {s.policy.name for s in result.settings} >= {"gate", "max_prob", "epee"}
    only_gate = calibrate(cache, model.spec, CalibrationOptions(policies=("gate",)), gate=model.exit_gate)
    assert {s.policy.name for s in only_gate.settings} == {"gate"}
    with pytest.raises(ConfigError, match=GATE_FILE):
        calibrate(cache, model.spec, CalibrationOptions(policies=("gate",)))


# --- serving ---------------------------------------------------------------------------------------------------


def test_serving_gate_needs_the_gate_file(tokenizer, gated_models):
    config = ServeConfig.from_section(
        {"task": "text-classification", "policy": "gate", "gate_threshold": 0.8}
    )
    with pytest.raises(PolicyError, match=GATE_FILE):
        TextService(build_tiny_model(tokenizer), config)
    service = TextService(gated_models["text-classification"], config)
    assert service.config.policy.name == "gate"


def test_packaging_refuses_policy_gate_without_the_gate_file(tokenizer, tmp_path):
    from epee_core.ops.packaging import check_inputs

    build_tiny_model(tokenizer).save_pretrained(tmp_path / "model")
    config = tmp_path / "model.yaml"
    config.write_text("epee:\n  task: text-classification\n  policy: gate\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=GATE_FILE):
        check_inputs(tmp_path / "model", config, "tiny")
    mixed_gate().save(tmp_path / "model")
    check_inputs(tmp_path / "model", config, "tiny")
