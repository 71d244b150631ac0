"""The model directory (docs/design.md, "Model directory"): save/load roundtrip and clear errors for bad directories and YAML."""

from __future__ import annotations

import pytest
import torch
import yaml
from helpers import build_tiny_model, random_batch

from epee_core.engine.model import EarlyExitModel
from epee_core.engine.policies import make_policy
from epee_core.engine.runner import run_early_exit
from epee_core.engine.spec import ConfigError, ModelSpec
from epee_core.serving.config import ServeConfig


@pytest.fixture
def saved_model(tokenizer, tmp_path):
    model = build_tiny_model(tokenizer, task="multi-label")
    model.save_pretrained(tmp_path / "model")
    return model, tmp_path / "model"


def test_roundtrip_gives_the_same_outputs(saved_model, tokenizer):
    model, directory = saved_model
    loaded = EarlyExitModel.from_pretrained(directory)
    assert sorted(p.name for p in directory.iterdir()) >= ["config.json", "epee.yaml", "exits.safetensors"]
    assert loaded.spec.labels == model.spec.labels and loaded.multi_label
    batch = random_batch(5, len(tokenizer))
    before = run_early_exit(model, batch, make_policy("epee"))
    after = run_early_exit(loaded, batch, make_policy("epee"))
    assert torch.equal(before.exit_layer, after.exit_layer)
    torch.testing.assert_close(before.logits, after.logits)


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(ConfigError, match="model directory not found"):
        EarlyExitModel.from_pretrained(tmp_path / "nope")


def test_missing_exit_heads_are_named(saved_model):
    _, directory = saved_model
    (directory / "exits.safetensors").unlink()
    with pytest.raises(ConfigError, match="missing exits.safetensors"):
        EarlyExitModel.from_pretrained(directory)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": "red"}, "unknown key 'colour'"),
        ({"task": "translation"}, "'task' must be one of"),
        ({"num_layers": "four"}, "'num_layers' must be int"),
        ({"labels": ["a", "a"]}, "'labels' must be a non-empty list of distinct strings"),
        ({"num_layers": 6}, "epee.yaml says 6 layers"),
    ],
)
def test_bad_epee_yaml_is_named(saved_model, change, message):
    _, directory = saved_model
    data = yaml.safe_load((directory / "epee.yaml").read_text())
    (directory / "epee.yaml").write_text(yaml.safe_dump({**data, **change}))
    with pytest.raises(ConfigError, match=message):
        EarlyExitModel.from_pretrained(directory)


def test_exit_heads_of_the_wrong_shape_are_named(saved_model):
    _, directory = saved_model
    data = yaml.safe_load((directory / "epee.yaml").read_text())
    (directory / "epee.yaml").write_text(yaml.safe_dump({**data, "labels": ["x", "y"]}))
    with pytest.raises(ConfigError, match="exits.safetensors: exit heads do not fit"):
        EarlyExitModel.from_pretrained(directory)


def test_model_spec_roundtrip(tmp_path):
    spec = ModelSpec(
        task="relation-extraction",
        labels=["None", "effect"],
        backbone="bert",
        pooling="mean",
        num_layers=4,
        hidden_size=32,
        entity_markers=["[E1]"],
        negative_label="None",
    )
    spec.save(tmp_path / "epee.yaml")
    assert ModelSpec.load(tmp_path / "epee.yaml") == spec


def test_serve_config_reads_the_design_example():
    section = {
        "task": "text-classification",
        "policy": "epee",
        "entropy_threshold": 0.2,
        "patience": 2,
        "fast_ratio": 0.25,
        "ensemble": "last",
        "max_length": 256,
        "allow_request_override": True,
    }
    config = ServeConfig.from_section(section)
    assert config.policy == make_policy("epee", {"entropy_threshold": 0.2, "patience": 2})
    assert config.max_length == 256
    assert config.policy_for({"policy": "patience"}).params["patience"] == 2  # shares the configured patience
    assert config.policy_for({"policy": "full"}).name == "full"


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"policy": "epee", "threshold_entropy": 0.2}, "unknown key 'threshold_entropy'"),
        ({"policy": "epee", "patience": -1}, "'patience' must be an integer in \\[1, 10000\\]"),
        ({"policy": "epee", "entropy_threshold": "high"}, "'entropy_threshold' must be a finite number"),
        ({"policy": "warp"}, "unknown policy 'warp'"),
        ({"allow_request_override": "yes"}, "'allow_request_override' must be bool"),
        ({"max_length": 0}, "'max_length' must be a positive integer"),
    ],
)
def test_bad_serve_config_names_the_key(section, message):
    with pytest.raises(ConfigError, match=message):
        ServeConfig.from_section(section)
