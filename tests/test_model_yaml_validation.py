"""The whole model YAML is checked: TorchServe's model-config keys (names, types, ranges), the `epee:` section,
and YAML syntax errors with the file and line; in `epee package`, `epee deploy register` and at worker load."""

from __future__ import annotations

import json
import zipfile
from types import SimpleNamespace

import pytest
import yaml

from epee_core.cli import main
from epee_core.engine.spec import ConfigError
from epee_core.ops.packaging import check_archive
from epee_core.serving.config import TORCHSERVE_KEYS, ServeConfig, check_torchserve_keys

SOURCE = "model.yaml"


def write_model_yaml(path, **top_level):
    path.write_text(yaml.safe_dump({**top_level, "epee": {"policy": "epee"}}))
    return path


@pytest.mark.parametrize(
    ("top_level", "message"),
    [
        ({"batchsize": 4}, "model.yaml: unknown key 'batchsize' (did you mean 'batchSize'?)"),
        ({"maxBatchDelya": 4}, "model.yaml: unknown key 'maxBatchDelya' (did you mean 'maxBatchDelay'?)"),
        ({"colour": "red"}, "model.yaml: unknown key 'colour' (expected one of: "),
        ({"batchSize": "four"}, "model.yaml: 'batchSize' must be int, got 'four'"),
        ({"batchSize": 0}, "model.yaml: 'batchSize' must be an integer >= 1, got 0"),
        ({"maxBatchDelay": -5}, "model.yaml: 'maxBatchDelay' must be an integer >= 0, got -5"),
        ({"responseTimeout": 0}, "model.yaml: 'responseTimeout' must be an integer >= 1, got 0"),
        ({"minWorkers": True}, "model.yaml: 'minWorkers' must be int, got True"),
        ({"continuousBatching": "yes"}, "model.yaml: 'continuousBatching' must be bool, got 'yes'"),
        ({"deviceType": "tpu"}, "model.yaml: 'deviceType' must be one of cpu, gpu, got 'tpu'"),
        ({"deviceIds": [0, "one"]}, "model.yaml: 'deviceIds' must be a list of GPU numbers"),
        ({"minWorkers": 2, "maxWorkers": 1}, "model.yaml: 'maxWorkers' 1 is below 'minWorkers' 2"),
    ],
)
def test_torchserve_key_with_a_wrong_name_type_or_range_is_refused_by_name(top_level, message):
    with pytest.raises(ConfigError) as raised:
        check_torchserve_keys({**top_level, "epee": {}}, SOURCE)
    assert str(raised.value).startswith(message)


def test_every_torchserve_key_with_a_valid_value_is_accepted():
    valid = {"int": 1, "bool": True, "list": [0, 1], "dict": {"nproc-per-node": 2}}
    data = {key: valid[rule.kind.__name__] for key, rule in TORCHSERVE_KEYS.items() if not rule.choices}
    data |= {"deviceType": "GPU", "parallelType": "tp", "continuousBatching": True, "epee": {}}
    check_torchserve_keys(data, SOURCE)  # no error
    assert ServeConfig.from_model_yaml(data, SOURCE).policy.name == "epee"


def test_unknown_epee_key_suggests_the_close_one():
    with pytest.raises(
        ConfigError, match=r"model.yaml 'epee:': unknown key 'polcy' \(did you mean 'policy'\?\)"
    ):
        ServeConfig.from_model_yaml({"epee": {"polcy": "full"}}, SOURCE)


def test_load_checks_the_torchserve_keys_of_the_file(tmp_path):
    path = write_model_yaml(tmp_path / "model.yaml", batchSize=4, batchsize=4)
    with pytest.raises(
        ConfigError, match=rf"^{path}: unknown key 'batchsize' \(did you mean 'batchSize'\?\)$"
    ):
        ServeConfig.load(path)


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("batchSize: 4\nepee:\n  policy: [epee\n  patience: 2\n")
    with pytest.raises(ConfigError) as raised:
        ServeConfig.load(path)
    message = str(raised.value)
    assert (
        message.startswith(f"{path}, line 4, column 11: not valid YAML: ")
        and "<unicode string>" not in message
    )


# --- where the check runs: epee deploy register, and the worker ----------------------------------------------


def write_archive(path, model_yaml: str):
    """A `.mar` as torch-model-archiver writes it, reduced to its manifest and model YAML."""
    manifest = {"model": {"modelName": "tiny", "handler": "text_handler.py", "configFile": "tiny.yaml"}}
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("MAR-INF/MANIFEST.json", json.dumps(manifest))
        archive.writestr("tiny.yaml", model_yaml)
    return path


def test_archive_check_names_the_yaml_inside_the_archive(tmp_path):
    archive = write_archive(tmp_path / "tiny.mar", "batchSize: four\nepee:\n  policy: epee\n")
    with pytest.raises(ConfigError, match=rf"^tiny.yaml in {archive}: 'batchSize' must be int, got 'four'$"):
        check_archive(archive)


def test_deploy_register_refuses_an_archive_with_a_misspelt_key_before_asking_the_server(tmp_path, capsys):
    store = tmp_path / "store"
    store.mkdir()
    write_archive(store / "tiny.mar", "batchsize: 4\nepee:\n  policy: epee\n")
    unreachable = "http://127.0.0.1:9"  # were the server asked, the error would say it cannot be reached
    code = main(["deploy", "register", "--mar", "tiny.mar", "--model-store", str(store),
                 "--management-url", unreachable, "--token", "unused"])  # fmt: skip
    assert code == 2
    assert capsys.readouterr().err == (
        f"epee: error: tiny.yaml in {store / 'tiny.mar'}: unknown key 'batchsize' (did you mean 'batchSize'?)\n"
    )


def test_deploy_register_finds_the_model_store_of_config_properties(tmp_path, monkeypatch, capsys):
    (tmp_path / "config.properties").write_text("model_store=archives\n")
    (tmp_path / "archives").mkdir()
    write_archive(tmp_path / "archives" / "tiny.mar", "batchsize: 4\nepee:\n  policy: epee\n")
    monkeypatch.chdir(tmp_path)
    code = main(["deploy", "register", "--mar", "tiny.mar", "--management-url", "http://127.0.0.1:9"])
    assert code == 2 and "unknown key 'batchsize'" in capsys.readouterr().err


def test_deploy_rollout_checks_the_new_archive_too(tmp_path, capsys):
    write_archive(tmp_path / "tiny.mar", "epee:\n  policy: epee\ncontinuousBatching: sure\n")
    code = main(["deploy", "rollout", "--mar", "tiny.mar", "--name", "tiny", "--model-store", str(tmp_path),
                 "--management-url", "http://127.0.0.1:9", "--token", "unused"])  # fmt: skip
    assert code == 2 and "'continuousBatching' must be bool" in capsys.readouterr().err


def test_worker_refuses_a_misspelt_torchserve_key_at_load():
    handlers = pytest.importorskip("handlers.text_handler")
    context = SimpleNamespace(model_name="tiny", manifest={}, system_properties={},
                              model_yaml_config={"batchsize": 4, "epee": {"policy": "epee"}})  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"tiny model YAML: unknown key 'batchsize' \(did you mean 'batchSize'"
    ):
        handlers.TextHandler().initialize(context)
