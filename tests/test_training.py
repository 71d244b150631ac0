"""`epee train` exit-training options: layer weights, self-distillation, early stopping on dev, two-stage
training, and the flags that set them. Tiny random BERT (3 layers, hidden 32) on the embedded ADE demo rows."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import DEMO_DATA, save_tiny_backbone

from epee_core.cli import build_parser, main
from epee_core.cli.train import train_config_from_args
from epee_core.engine.model import EarlyExitModel
from epee_core.engine.spec import ConfigError
from epee_core.training import trainer as training
from epee_core.training.trainer import (
    TrainConfig,
    distillation_loss,
    joint_loss,
    layer_weights,
    ranking_loss,
    train,
)

NUM_LAYERS = 3


@pytest.fixture(scope="module")
def tiny_backbone_dir(tmp_path_factory, tokenizer):
    return save_tiny_backbone(tmp_path_factory.mktemp("tiny-bert"), tokenizer, num_layers=NUM_LAYERS)


def tiny_config(backbone_dir, output, **options) -> TrainConfig:
    return TrainConfig(
        task="text-classification",
        backbone=str(backbone_dir),
        train_path=str(DEMO_DATA / "ade_demo_train.jsonl"),
        dev_path=str(DEMO_DATA / "ade_demo_dev.jsonl"),
        output=str(output),
        max_samples=32,
        max_dev_samples=16,
        batch_size=8,
        learning_rate=1e-3,
        max_length=32,
        **{"epochs": 1, **options},
    )


def snapshot(model: EarlyExitModel) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def scripted_dev(monkeypatch, scores: list[float]) -> list[dict[str, torch.Tensor]]:
    """Replace the per-epoch dev evaluation: epoch k reports `scores[k - 1]` at every exit. Returns the list of
    model states seen at each evaluation, so a test can tell which epoch's weights were saved."""
    states = []

    def fake_metrics(model, examples, batch_size=64):
        states.append(snapshot(model))
        score = scores[len(states) - 1]
        return [{"accuracy": score, "macro_f1": score} for _ in range(model.num_layers)]

    monkeypatch.setattr(training, "per_layer_metrics", fake_metrics)
    return states


def assert_same(first: dict, second: dict, prefix: str) -> None:
    names = [name for name in first if name.startswith(prefix)]
    assert names, prefix
    for name in names:
        assert torch.equal(first[name], second[name]), name


def assert_changed(first: dict, second: dict, prefix: str) -> None:
    names = [name for name in first if name.startswith(prefix)]
    assert names, prefix
    assert any(not torch.equal(first[name], second[name]) for name in names), prefix


# --- layer weights ---------------------------------------------------------------------------------------------


def test_pabee_weights_count_exit_i_i_times():
    assert layer_weights(3, "pabee").tolist() == pytest.approx([1 / 6, 2 / 6, 3 / 6])


def test_uniform_weights_are_equal():
    assert layer_weights(4, "uniform").tolist() == pytest.approx([0.25] * 4)


def test_explicit_weights_are_normalised():
    assert layer_weights(3, "1,1,2").tolist() == pytest.approx([0.25, 0.25, 0.5])


@pytest.mark.parametrize("scheme", ["deebert", "1,-1,2", "0,0,0", ""])
def test_unknown_layer_weights_name_the_flag(scheme):
    with pytest.raises(ConfigError, match="--layer-weights"):
        layer_weights(3, scheme)


def test_explicit_weights_must_match_the_layer_count():
    with pytest.raises(ConfigError, match="2 weights for a 3-layer model"):
        layer_weights(3, "1,2")


def test_uniform_weights_change_the_joint_loss():
    logits = torch.tensor([[[2.0, 0.0]], [[0.0, 0.0]]])  # exit 1 confident and right, exit 2 uniform
    targets = torch.tensor([0])
    right, uniform = -math.log(1 / (1 + math.exp(-2))), math.log(2)
    pabee = joint_loss(logits, targets, False, layer_weights(2, "pabee"))
    equal = joint_loss(logits, targets, False, layer_weights(2, "uniform"))
    assert pabee.item() == pytest.approx(right / 3 + 2 * uniform / 3, abs=1e-6)
    assert equal.item() == pytest.approx((right + uniform) / 2, abs=1e-6)


# --- self-distillation -----------------------------------------------------------------------------------------


def test_distillation_loss_is_t_squared_kl_from_the_teacher():
    """Teacher logits (2 ln 3, 0) at T = 2 give p = (3/4, 1/4); a uniform student: KL = 3/4 ln 1.5 + 1/4 ln 0.5."""
    teacher = torch.tensor([[2 * math.log(3), 0.0]])
    student = torch.zeros(1, 2)
    expected = 4 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert distillation_loss(student, teacher, 2.0, False).item() == pytest.approx(expected, abs=1e-6)


def test_distillation_loss_is_zero_when_the_exit_agrees_with_the_final_exit():
    logits = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]])
    assert distillation_loss(logits, logits.clone(), 2.0, False).item() == pytest.approx(0.0, abs=1e-7)


def test_multi_label_distillation_is_bce_against_the_final_sigmoid():
    """Teacher logit ln 3 at T = 1 → target 3/4; student logit 0 → p = 1/2: BCE = −(3/4 ln ½ + 1/4 ln ½) = ln 2."""
    teacher = torch.tensor([[math.log(3)]])
    student = torch.zeros(1, 1)
    assert distillation_loss(student, teacher, 1.0, True).item() == pytest.approx(math.log(2), abs=1e-6)


def test_joint_loss_mixes_label_and_soft_loss_for_early_exits_only():
    logits = torch.tensor([[[0.0, 0.0]], [[2 * math.log(3), 0.0]]], requires_grad=True)
    targets = torch.tensor([1])
    alpha = 0.25
    loss = joint_loss(logits, targets, False, layer_weights(2, "uniform"), alpha, 2.0)
    exit_one = (1 - alpha) * math.log(2) + alpha * 4 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    exit_two = -math.log(0.1)  # softmax(2 ln 3, 0) gives class 1 p = 1/10
    assert loss.item() == pytest.approx((exit_one + exit_two) / 2, abs=1e-6)


def test_the_final_exit_gets_no_gradient_from_distillation():
    """The final exit's soft labels are detached: its gradient is that of its own label loss alone."""
    logits = torch.randn(3, 4, 5, requires_grad=True)
    targets = torch.tensor([0, 1, 2, 3])
    joint_loss(logits, targets, False, layer_weights(3), distill_weight=0.9).backward()
    with_distill = logits.grad[-1].clone()
    logits.grad = None
    joint_loss(logits, targets, False, layer_weights(3), distill_weight=0.0).backward()
    assert torch.allclose(with_distill, logits.grad[-1])


# --- certainty ranking -----------------------------------------------------------------------------------------


def _binary_entropy(p: float) -> float:
    return -(p * math.log(p) + (1 - p) * math.log(1 - p)) / math.log(2)


def test_ranking_loss_charges_a_wrong_row_that_is_more_certain_than_a_right_one():
    """Row 0 is right at p = 0.6, row 1 wrong at p = 0.9: the pair costs margin − (H_wrong − H_right)."""
    logits = torch.tensor([[math.log(0.6 / 0.4), 0.0], [math.log(0.9 / 0.1), 0.0]], requires_grad=True)
    targets = torch.tensor([0, 1])
    loss = ranking_loss(logits, targets, False, margin=0.3)
    expected = 0.3 - (_binary_entropy(0.9) - _binary_entropy(0.6))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    # it makes the wrong row less sure of its wrong class and the right row surer of its right one
    assert logits.grad[1, 0] > 0 and logits.grad[0, 0] < 0


def test_ranking_loss_is_zero_once_right_rows_are_more_certain_by_the_margin():
    logits = torch.tensor([[5.0, 0.0], [0.1, 0.0]])  # right and sure; wrong and unsure
    assert ranking_loss(logits, torch.tensor([0, 1]), False, margin=0.3).item() == 0.0


def test_ranking_loss_without_a_right_wrong_pair_is_zero_and_keeps_the_graph():
    logits = torch.tensor([[2.0, 0.0], [3.0, 0.0]], requires_grad=True)
    loss = ranking_loss(logits, torch.tensor([0, 0]), False, margin=0.3)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0


def test_multi_label_ranking_counts_a_row_right_only_when_its_whole_label_set_is():
    logits = torch.tensor([[4.0, 4.0], [4.0, -4.0]])  # both rows predict label 0; row 0 also label 1
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # row 0 has one label wrong: a wrong row
    loss = ranking_loss(logits, targets, True, margin=0.3)
    assert loss.item() == pytest.approx(0.3, abs=1e-3)  # equal certainty: the whole margin


def test_joint_loss_adds_ranking_to_early_exits_only():
    logits = torch.randn(3, 8, 2, requires_grad=True)
    targets = torch.tensor([0, 1] * 4)
    weights = layer_weights(3)
    joint_loss(logits, targets, False, weights, rank_weight=2.0).backward()
    ranked = logits.grad.clone()
    logits.grad = None
    joint_loss(logits, targets, False, weights).backward()
    assert torch.allclose(ranked[-1], logits.grad[-1])  # the final exit: its label loss alone
    extra = sum(weights[i] * 2.0 * ranking_loss(logits[i], targets, False, 0.3).item() for i in range(2))
    with torch.no_grad():
        difference = joint_loss(logits, targets, False, weights, rank_weight=2.0) - joint_loss(
            logits, targets, False, weights
        )
    assert difference.item() == pytest.approx(float(extra), abs=1e-5)


def test_zero_distill_weight_is_the_plain_pabee_loss():
    logits, targets = torch.randn(3, 4, 2), torch.tensor([0, 1, 1, 0])
    plain = sum(
        (i + 1) / 6 * torch.nn.functional.cross_entropy(logits[i], targets) for i in range(NUM_LAYERS)
    )
    assert joint_loss(logits, targets, False).item() == pytest.approx(plain.item(), abs=1e-6)


# --- early stopping --------------------------------------------------------------------------------------------


def test_early_stopping_stops_after_patience_and_saves_the_best_epoch(
    tiny_backbone_dir, tmp_path, monkeypatch
):
    states = scripted_dev(monkeypatch, [0.5, 0.8, 0.6, 0.7, 0.9])
    output = tmp_path / "model"
    summary = train(tiny_config(tiny_backbone_dir, output, epochs=5, early_stopping=2))
    assert [record["epoch"] for record in summary["history"]] == [1, 2, 3, 4]  # epoch 5 never ran
    assert [record["dev_score"] for record in summary["history"]] == [0.5, 0.8, 0.6, 0.7]
    assert summary["kept_epochs"] == {"joint": 2} and summary["dev_accuracy_per_exit"] == [0.8] * NUM_LAYERS
    saved = snapshot(EarlyExitModel.from_pretrained(output))
    assert_same(saved, states[1], "exits.")  # the weights seen at epoch 2's evaluation
    assert_same(saved, states[1], "backbone.")
    assert_changed(saved, states[3], "exits.")


def test_without_early_stopping_the_last_epoch_is_saved(tiny_backbone_dir, tmp_path, monkeypatch):
    states = scripted_dev(monkeypatch, [0.5, 0.8, 0.6])
    output = tmp_path / "model"
    summary = train(tiny_config(tiny_backbone_dir, output, epochs=3))
    assert len(summary["history"]) == 3 and summary["kept_epochs"] == {"joint": 3}
    assert_same(snapshot(EarlyExitModel.from_pretrained(output)), states[2], "exits.")


def test_per_epoch_dev_numbers_are_recorded_in_the_model_directory(tiny_backbone_dir, tmp_path):
    output = tmp_path / "model"
    train(tiny_config(tiny_backbone_dir, output, epochs=2, distill_weight=0.5, layer_weights="uniform"))
    record = EarlyExitModel.from_pretrained(output).spec.training
    assert record["selection_metric"] == "accuracy"
    assert record["distill_weight"] == 0.5 and record["layer_weights"] == "uniform"
    for entry in record["history"]:
        assert len(entry["dev_accuracy_per_exit"]) == NUM_LAYERS
        mean = sum(entry["dev_accuracy_per_exit"]) / NUM_LAYERS
        assert entry["dev_score"] == pytest.approx(mean, abs=1e-3)


# --- two-stage -------------------------------------------------------------------------------------------------


def test_two_stage_freezes_the_backbone_and_final_head_in_stage_two(tiny_backbone_dir, tmp_path, monkeypatch):
    initial = {}
    build = training.build_model

    def recording_build(config, labels):
        model = build(config, labels)
        initial.update(snapshot(model))
        return model

    monkeypatch.setattr(training, "build_model", recording_build)
    states = scripted_dev(monkeypatch, [0.7, 0.6])
    output = tmp_path / "model"
    summary = train(tiny_config(tiny_backbone_dir, output, two_stage=True, distill_weight=0.5))
    assert [record["stage"] for record in summary["history"]] == ["backbone", "heads"]
    after_stage_one, saved = states[0], snapshot(EarlyExitModel.from_pretrained(output))
    last = f"exits.heads.{NUM_LAYERS - 1}."
    # Stage 1 trains the backbone and the final head only.
    assert_changed(initial, after_stage_one, "backbone.")
    assert_changed(initial, after_stage_one, last)
    assert_same(initial, after_stage_one, "exits.heads.0.")
    # Stage 2 trains the other heads; the backbone and the final head keep stage 1's weights.
    assert_same(after_stage_one, saved, "backbone.")
    assert_same(after_stage_one, saved, last)
    for index in range(NUM_LAYERS - 1):
        assert_changed(after_stage_one, saved, f"exits.heads.{index}.")


def test_two_stage_runs_stage2_epochs(tiny_backbone_dir, tmp_path, monkeypatch):
    scripted_dev(monkeypatch, [0.7, 0.6, 0.65, 0.62])
    summary = train(tiny_config(tiny_backbone_dir, tmp_path / "m", two_stage=True, stage2_epochs=3))
    assert [(r["stage"], r["epoch"]) for r in summary["history"]] == [
        ("backbone", 1),
        ("heads", 1),
        ("heads", 2),
        ("heads", 3),
    ]
    assert summary["stage2_epochs"] == 3


# --- command line ----------------------------------------------------------------------------------------------

REQUIRED = ["train", "--task", "text-classification", "--backbone", "minilm", "--train", "t.jsonl"]
REQUIRED += ["--dev", "d.jsonl", "--output", "out"]


def test_train_flags_map_to_the_train_config():
    args = build_parser().parse_args(
        REQUIRED
        + ["--layer-weights", "uniform", "--distill-weight", "0.5", "--distill-temperature", "3"]
        + ["--rank-weight", "1.5", "--rank-margin", "0.2"]
        + [
            "--early-stopping",
            "2",
            "--two-stage",
            "--stage2-epochs",
            "4",
            "--lr",
            "2e-5",
            "--head-lr",
            "5e-3",
        ]
    )
    config = train_config_from_args(args)
    assert (config.layer_weights, config.distill_weight, config.distill_temperature) == ("uniform", 0.5, 3.0)
    assert (config.rank_weight, config.rank_margin) == (1.5, 0.2)
    assert (config.early_stopping, config.two_stage, config.stage2_epochs) == (2, True, 4)
    assert (config.learning_rate, config.head_learning_rate) == (2e-5, 5e-3)


def test_train_flag_defaults_are_the_train_config_defaults():
    config = train_config_from_args(build_parser().parse_args(REQUIRED))
    plain = TrainConfig(
        task="text-classification", backbone="minilm", train_path="t", dev_path="d", output="o"
    )
    same = ("layer_weights", "distill_weight", "distill_temperature", "rank_weight", "rank_margin")
    for field in (*same, "early_stopping", "two_stage"):
        assert getattr(config, field) == getattr(plain, field), field
    for field in training.RECIPE_FIELDS:  # unset: the recipe fills them in
        assert getattr(config, field) is None and getattr(plain, field) is None, field
    assert config.with_recipe()[1] == plain.with_recipe()[1]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--distill-weight", "1.5"], "--distill-weight must be in [0, 1], got 1.5"),
        (["--distill-temperature", "0"], "--distill-temperature must be > 0"),
        (["--rank-weight", "-1"], "--rank-weight must be >= 0, got -1.0"),
        (["--rank-margin", "0"], "--rank-margin must be in (0, 1], got 0.0"),
        (["--early-stopping", "0"], "--early-stopping must be a patience of at least 1 epoch"),
        (["--layer-weights", "deebert"], "--layer-weights 'deebert': expected pabee, uniform"),
        (["--two-stage", "--freeze-backbone"], "--two-stage fine-tunes the backbone"),
        (["--stage2-epochs", "2"], "--stage2-epochs needs --two-stage"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--threads", "0"], "--threads must be at least 1"),
        (["--max-samples", "0"], "--max-samples must be at least 1"),
        (["--balance-power", "2"], "--balance-power must be in [0, 1]"),
        (["--augment", "mild"], "--augment mild is for image-classification"),
        (["--max-length", "4"], "--max-length must be at least 8"),
    ],
)
def test_bad_train_flags_are_one_line_errors(capsys, flags, message):
    assert main(REQUIRED + flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("epee: error: ") and message in err and "\n" not in err


def test_multi_label_trains_with_distillation_and_ranking_and_scores_example_f1(tiny_backbone_dir, tmp_path):
    rows = [
        {"text": "drug A activates receptor B", "labels": ["ACTIVATOR"]},
        {"text": "drug C blocks channel D", "labels": ["ANTAGONIST", "DOWNREGULATOR"]},
        {"text": "nothing here", "labels": []},
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows * 4))
    config = tiny_config(
        tiny_backbone_dir, tmp_path / "model", epochs=2, distill_weight=0.5, early_stopping=1, rank_weight=1.0
    )
    config.task, config.train_path, config.dev_path = "multi-label", str(data), str(data)
    summary = train(config)
    assert summary["selection_metric"] == "example_f1"
    assert (summary["rank_weight"], summary["rank_margin"]) == (1.0, 0.3)  # recorded in epee.yaml
    for entry in summary["history"]:
        mean = sum(entry["dev_example_f1_per_exit"]) / NUM_LAYERS
        assert entry["dev_score"] == pytest.approx(mean, abs=1e-3)
