"""`epee package` (archive contents, refusals) and the deploy client's token lookup, without a server."""

from __future__ import annotations

import json
import zipfile

import pytest
import yaml
from helpers import build_tiny_model

from epee_core.cli import main
from epee_core.ops.management import TOKEN_ENV, ServerError, management_token


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("packaging") / "tiny"
    build_tiny_model(tokenizer).save_pretrained(directory)
    return directory


def model_yaml(path, **epee):
    path.write_text(yaml.safe_dump({"batchSize": 4, "maxBatchDelay": 50, "epee": {"policy": "epee", **epee}}))
    return path


def test_archive_holds_handler_engine_sources_model_and_yaml(model_dir, tmp_path, capsys):
    config = model_yaml(tmp_path / "tiny.yaml", entropy_threshold=0.3)
    assert main(["package", "--model", str(model_dir), "--config", str(config), "--name", "tiny",
                 "--version", "2.1", "--export-path", str(tmp_path / "store"), "--json"]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    with zipfile.ZipFile(summary["archive"]) as archive:
        names = set(archive.namelist())
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
    assert {
        "text_handler.py",
        "handlers/base.py",
        "epee_core/__init__.py",
        "epee_core/serving/service.py",
        "epee_core/engine/runner.py",
        "tiny.yaml",
    } <= names
    bundled = {name.split("/")[1] for name in names if name.startswith("epee_core/")}
    assert bundled == {"__init__.py", "engine", "serving"}  # no CLI, training, calibration or measurement
    assert {
        "model/config.json",
        "model/model.safetensors",
        "model/exits.safetensors",
        "model/epee.yaml",
    } <= names
    assert not [name for name in names if name.endswith((".jsonl", ".pyc", ".bin", ".pt"))]
    assert (
        manifest["model"]["handler"] == "text_handler.py" and manifest["model"]["configFile"] == "tiny.yaml"
    )
    assert manifest["model"]["modelVersion"] == "2.1"


def test_pickled_weights_are_refused(model_dir, tmp_path, capsys):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for path in model_dir.iterdir():
        (pickled / path.name).write_bytes(path.read_bytes())
    (pickled / "pytorch_model.bin").write_bytes(b"pickle")
    config = model_yaml(tmp_path / "tiny.yaml")
    assert main(["package", "--model", str(pickled), "--config", str(config), "--name", "tiny",
                 "--export-path", str(tmp_path)]) == 2  # fmt: skip
    assert "pickled weights (pytorch_model.bin)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("epee", "name", "fragment"),
    [
        ({"entropy_treshold": 0.2}, "tiny", "unknown key 'entropy_treshold'"),
        ({"task": "multi-label"}, "tiny", "'task' is multi-label but"),
        ({"policy": "static", "layer": 9}, "tiny", "'layer' is 9"),
        ({}, "tiny/../x", "--name 'tiny/../x'"),
    ],
)
def test_bad_config_or_name_is_a_one_line_error_before_archiving(
    model_dir, tmp_path, capsys, epee, name, fragment
):
    config = model_yaml(tmp_path / "tiny.yaml", **epee)
    code = main(["package", "--model", str(model_dir), "--config", str(config), "--name", name,
                 "--export-path", str(tmp_path / "store")])  # fmt: skip
    error = capsys.readouterr().err
    assert code == 2 and fragment in error and error.count("\n") == 1
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").iterdir())


def test_misspelt_torchserve_key_is_refused_before_archiving(model_dir, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"batchsize": 4, "epee": {"policy": "epee"}}))
    code = main(["package", "--model", str(model_dir), "--config", str(config), "--name", "tiny",
                 "--export-path", str(tmp_path / "store")])  # fmt: skip
    assert code == 2
    assert (
        capsys.readouterr().err
        == f"epee: error: {config}: unknown key 'batchsize' (did you mean 'batchSize'?)\n"
    )
    assert not (tmp_path / "store").exists()


def test_management_token_prefers_flag_then_environment_then_key_file(tmp_path, monkeypatch):
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"management": {"key": "from-file"}, "inference": {"key": "other"}}))
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert management_token("from-flag", key_file) == "from-flag"
    assert management_token(None, key_file) == "from-env"
    monkeypatch.delenv(TOKEN_ENV)
    assert management_token(None, key_file) == "from-file"
    monkeypatch.chdir(tmp_path)
    assert management_token() == "from-file"  # ./key_file.json where TorchServe was started


def test_missing_key_file_named_explicitly_is_an_error(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ServerError, match="key file not found"):
        management_token(None, tmp_path / "absent.json")
