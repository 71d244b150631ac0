"""`epee train`'s recipes and data handling: recipe defaults and overrides, label-stratified samples, the checks
before the first step, class balance, length-bucketed batches, image augmentation, threads and samples/s."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch
from helpers import DEMO_DATA, tiny_bert_config
from transformers import BertModel

from epee_core.cli import build_parser, main
from epee_core.cli.train import train_config_from_args
from epee_core.engine.backbones import BUILTIN_BACKBONES
from epee_core.engine.inputs import Example
from epee_core.engine.model import EarlyExitModel
from epee_core.engine.spec import ConfigError
from epee_core.training import trainer as training
from epee_core.training.augment import augmentation
from epee_core.training.recipes import RECIPES
from epee_core.training.trainer import (
    TrainConfig,
    class_weights,
    epoch_batches,
    padding_share,
    row_weights,
    train,
)


@pytest.fixture(scope="module")
def tiny_backbone_dir(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("tiny-bert")
    BertModel(tiny_bert_config(len(tokenizer), num_layers=2)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def config_for(backbone, output, **options) -> TrainConfig:
    defaults = {
        "train_path": str(DEMO_DATA / "ade_demo_train.jsonl"),
        "dev_path": str(DEMO_DATA / "ade_demo_dev.jsonl"),
        "epochs": 1,
        "max_samples": 48,
        "max_dev_samples": 16,
        "batch_size": 8,
        "max_length": 32,
    }
    return TrainConfig(
        task="text-classification", backbone=str(backbone), output=str(output), **{**defaults, **options}
    )


# --- recipes ---------------------------------------------------------------------------------------------------


def test_every_named_backbone_has_a_recipe():
    assert set(RECIPES) == set(BUILTIN_BACKBONES)
    assert RECIPES["vit-small"].augment == "mild" and RECIPES["vit-small"].max_length is None


def test_unset_flags_come_from_the_recipe_and_flags_override_it():
    argv = ["train", "--task", "relation-extraction", "--backbone", "albert-small", "--train", "t"]
    argv += ["--dev", "d", "--output", "o", "--lr", "1e-4"]
    config, recipe = train_config_from_args(build_parser().parse_args(argv)).with_recipe()
    expected = RECIPES["albert-small"]
    assert (config.epochs, config.batch_size, config.max_length) == (
        expected.epochs,
        expected.batch_size,
        expected.max_length,
    )
    assert config.learning_rate == 1e-4 and config.class_balance == expected.class_balance
    assert recipe["name"] == "albert-small" and recipe["overridden"] == ["learning_rate"]
    assert recipe["learning_rate"] == 1e-4


def test_a_checkpoint_directory_gets_the_pretrained_recipe_of_its_modality():
    text = TrainConfig("text-classification", "/some/bert", "t", "d", "o").with_recipe()[1]
    image = TrainConfig("image-classification", "/some/vit", "t", "d", "o").with_recipe()[1]
    assert text["name"] == "text checkpoint" and "augment" not in text
    assert image["name"] == "image checkpoint" and "max_length" not in image


def test_train_prints_and_records_the_recipe_and_its_speed(tiny_backbone_dir, tmp_path, capsys):
    output = tmp_path / "model"
    argv = ["train", "--task", "text-classification", "--backbone", str(tiny_backbone_dir)]
    argv += [
        "--train",
        str(DEMO_DATA / "ade_demo_train.jsonl"),
        "--dev",
        str(DEMO_DATA / "ade_demo_dev.jsonl"),
    ]
    argv += ["--output", str(output), "--max-samples", "40", "--max-dev-samples", "16", "--epochs", "1"]
    argv += ["--threads", "1", "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    recipe_lines = [line for line in captured.err.splitlines() if line.startswith("epee: recipe ")]
    assert recipe_lines == [
        "epee: recipe text checkpoint: epochs 1, lr 5e-05, head lr 0.001, batch 16, max length 128, "
        "class balance weights, balance power 0.5, distill 0.5 (set by flags: epochs)"
    ]
    assert summary["recipe"]["name"] == "text checkpoint" and summary["recipe"]["overridden"] == ["epochs"]
    assert summary["train_samples_per_second"] > 0 and summary["threads"] == 1
    record = EarlyExitModel.from_pretrained(output).spec.training
    assert record["recipe"] == summary["recipe"] and record["skipped_rows"] == {"train": {}, "dev": {}}
    assert record["distill_weight"] == 0.5  # the recipe's self-distillation was used, not only printed
    assert record["train_samples"] == 40 and record["dev_samples"] == 16


def test_threads_are_set_while_training_and_restored(tiny_backbone_dir, tmp_path, monkeypatch):
    seen = []
    build = training.build_model

    def recording_build(config, labels):
        seen.append(torch.get_num_threads())
        return build(config, labels)

    monkeypatch.setattr(training, "build_model", recording_build)
    before = torch.get_num_threads()
    train(config_for(tiny_backbone_dir, tmp_path / "m", threads=1, max_samples=16))
    assert seen == [1] and torch.get_num_threads() == before


# --- checks before the first step ------------------------------------------------------------------------------


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_a_dev_label_the_training_set_lacks_is_an_error_before_training(
    tiny_backbone_dir, tmp_path, monkeypatch
):
    train_file = write_rows(
        tmp_path / "t.jsonl", [{"text": f"s {i}", "label": "ab"[i % 2]} for i in range(8)]
    )
    dev_file = write_rows(tmp_path / "d.jsonl", [{"text": "x", "label": "a"}, {"text": "y", "label": "c"}])
    monkeypatch.setattr(training, "build_model", lambda *_: pytest.fail("a model was built"))
    config = config_for(tiny_backbone_dir, tmp_path / "m", train_path=train_file, dev_path=dev_file)
    config.max_samples = None
    with pytest.raises(ConfigError) as raised:
        train(config)
    assert str(raised.value).startswith(f"{dev_file}:2: label 'c' is not one the training set knows (a, b)")


def test_a_training_set_with_one_label_is_refused(tiny_backbone_dir, tmp_path):
    train_file = write_rows(tmp_path / "t.jsonl", [{"text": f"s {i}", "label": "a"} for i in range(4)])
    config = config_for(tiny_backbone_dir, tmp_path / "m", train_path=train_file, dev_path=train_file)
    with pytest.raises(ConfigError, match="carry 1 label"):
        train(config)


def test_max_samples_is_a_stratified_sample_not_the_first_rows(tiny_backbone_dir, tmp_path, monkeypatch):
    rows = [{"text": f"pair {i}", "label": "effect"} for i in range(30)]
    rows += [{"text": f"pair {i}", "label": "None"} for i in range(30, 100)]  # sorted by label, like DDI
    train_file = write_rows(tmp_path / "t.jsonl", rows)
    seen = {}
    build = training.build_model

    def recording(config, labels):
        seen["labels"] = labels
        return build(config, labels)

    monkeypatch.setattr(training, "build_model", recording)
    config = config_for(tiny_backbone_dir, tmp_path / "m", train_path=train_file, dev_path=train_file)
    config.max_samples, config.max_dev_samples = 20, 10
    train_examples, dev_examples, labels, _ = training.read_training_data(config, notify=lambda _: None)
    assert Counter(example.label for example in train_examples) == {"None": 14, "effect": 6}
    assert Counter(example.label for example in dev_examples) == {"None": 7, "effect": 3}
    assert labels == ["None", "effect"]


# --- class balance ---------------------------------------------------------------------------------------------


def test_class_weights_are_inverse_frequency_to_a_power_with_mean_one_per_row():
    examples = [Example("x", label="a")] * 90 + [Example("y", label="b")] * 10
    half = class_weights(examples, ["a", "b"], "text-classification", 0.5)
    assert float(half[1] / half[0]) == pytest.approx(3.0)
    full = class_weights(examples, ["a", "b"], "text-classification", 1.0)
    assert float(full[1] / full[0]) == pytest.approx(9.0)
    for weights in (half, full):
        assert float(90 * weights[0] + 10 * weights[1]) == pytest.approx(100.0)
    multi = [Example("x", labels=["p"])] * 20 + [Example("y", labels=[])] * 80
    assert class_weights(multi, ["p"], "multi-label", 0.5).tolist() == pytest.approx([2.0])


def test_balanced_sampler_draws_classes_about_equally():
    examples = [Example("x", label="a")] * 900 + [Example("y", label="b")] * 100
    weights = row_weights(examples, ["a", "b"], "text-classification", 1.0)
    drawn = random.Random(0).choices(range(1000), weights=weights, k=20000)
    share_b = sum(index >= 900 for index in drawn) / len(drawn)
    assert share_b == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("balance", ["weights", "sampler"])
def test_training_runs_with_each_class_balance(tiny_backbone_dir, tmp_path, balance):
    summary = train(config_for(tiny_backbone_dir, tmp_path / "m", class_balance=balance, max_samples=24))
    assert summary["class_balance"] == balance
    assert (summary["class_weights"] is not None) == (balance == "weights")


# --- length bucketing ------------------------------------------------------------------------------------------


def test_bucketed_batches_cover_every_row_once_with_less_padding_and_stay_random():
    rng = random.Random(0)
    lengths = [rng.randint(5, 120) for _ in range(2000)]
    order = list(range(2000))
    random.Random(1).shuffle(order)
    bucketed = epoch_batches(order, 16, lengths, random.Random(2))
    plain = epoch_batches(order, 16, None, random.Random(2))
    assert sorted(index for batch in bucketed for index in batch) == list(range(2000))
    assert padding_share(bucketed, lengths) < 0.1 < 0.4 < padding_share(plain, lengths)
    again = epoch_batches(order, 16, lengths, random.Random(3))
    assert bucketed != again  # the batch order is shuffled
    lengths_of_first = [lengths[i] for i in bucketed[0]]
    assert max(lengths_of_first) - min(lengths_of_first) < 20


def test_training_records_the_padding_share_of_its_batches(tiny_backbone_dir, tmp_path):
    summary = train(config_for(tiny_backbone_dir, tmp_path / "m"))
    assert summary["length_bucketing"] and 0 <= summary["padding_share"] < 0.5


# --- augmentation ----------------------------------------------------------------------------------------------


def test_mild_augmentation_never_flips_and_keeps_the_image_format():
    assert augmentation("none") is None and augmentation(None) is None
    names = [type(step).__name__ for step in augmentation("mild").transforms]
    assert "RandomHorizontalFlip" not in names and "RandomAffine" in names
    assert "RandomHorizontalFlip" in [type(step).__name__ for step in augmentation("flip").transforms]
    torch.manual_seed(0)
    image = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    out = augmentation("mild")(image)
    assert out.shape == image.shape and out.dtype == torch.uint8 and not torch.equal(out, image)


def test_minilm_distils_by_default_and_a_flag_turns_it_off():
    def resolved(backbone: str, **given) -> float:
        return (
            TrainConfig("text-classification", backbone, "t", "d", "o", **given)
            .with_recipe()[0]
            .distill_weight
        )

    assert resolved("minilm") == 0.5 and resolved("/some/bert") == 0.5  # pretrained text: distilled exits
    assert resolved("albert-small") == 0.0 and resolved("gpt2-small") == 0.0  # from scratch: not measured yet
    assert resolved("minilm", distill_weight=0.0) == 0.0
