"""The `epee` command line: train → evaluate end to end on tiny models, and one-line errors (docs/design.md, "Commands")."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import DEMO_DATA, save_tiny_backbone
from transformers import AutoTokenizer

from epee_core.cli import build_parser, main
from epee_core.cli.calibrate import few_rows_warning
from epee_core.cli.serve import deploy_model


@pytest.fixture(scope="module")
def tiny_backbone_dir(tmp_path_factory, tokenizer):
    """A local Hugging Face checkpoint directory (tiny random BERT + tokenizer), as a user would point at."""
    return save_tiny_backbone(tmp_path_factory.mktemp("tiny-bert"), tokenizer, num_layers=3)


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, tiny_backbone_dir):
    output = tmp_path_factory.mktemp("trained") / "model"
    code = main(
        [
            "train",
            "--task",
            "text-classification",
            "--backbone",
            str(tiny_backbone_dir),
            "--train",
            str(DEMO_DATA / "ade_demo_train.jsonl"),
            "--dev",
            str(DEMO_DATA / "ade_demo_dev.jsonl"),
            "--output",
            str(output),
            "--max-samples",
            "64",
            "--max-dev-samples",
            "32",
            "--json",
        ]
    )
    assert code == 0
    return output


def run_json(capsys, argv: list[str]) -> dict:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def evaluate_json(capsys, model_dir, *options: str) -> dict:
    """`epee evaluate --model MODEL_DIR --data ade_demo_dev.jsonl OPTIONS --json` as a dict."""
    argv = ["evaluate", "--model", str(model_dir), "--data", str(DEMO_DATA / "ade_demo_dev.jsonl")]
    return run_json(capsys, [*argv, *options, "--json"])


def test_train_writes_a_model_directory_with_its_training_record(trained_dir):
    spec = (trained_dir / "epee.yaml").read_text()
    assert "adverse_event" in spec and "train_samples: 64" in spec
    assert (trained_dir / "exits.safetensors").is_file() and (trained_dir / "tokenizer.json").is_file()


def test_evaluate_json_has_the_design_fields(trained_dir, capsys):
    result = evaluate_json(
        capsys, trained_dir, "--max-samples", "24", "--policy", "epee", "--set", "entropy_threshold=0.5"
    )
    for key in (
        "accuracy",
        "macro_f1",
        "avg_exit_layer",
        "num_layers",
        "layer_speedup",
        "wall_seconds",
        "samples_per_second",
        "policy",
        "params",
    ):
        assert key in result, key
    assert result["policy"] == "epee" and result["params"]["entropy_threshold"] == 0.5
    assert result["num_samples"] == 24 and 1 <= result["avg_exit_layer"] <= 3
    assert result["layer_speedup"] == pytest.approx(3 / result["avg_exit_layer"], rel=1e-3)


def test_evaluate_several_policies_in_one_run(trained_dir, capsys):
    result = evaluate_json(capsys, trained_dir, "--max-samples", "16", "--policy", "full,oracle")
    full, oracle = result["results"]
    assert full["avg_exit_layer"] == 3 and oracle["avg_exit_layer"] <= 3
    assert oracle["accuracy"] >= full["accuracy"]  # the oracle exits at a correct layer whenever one exists


def test_evaluate_reads_the_policy_from_a_model_yaml(trained_dir, tmp_path, capsys):
    config = tmp_path / "model.yaml"
    config.write_text("batchSize: 8\nepee:\n  policy: static\n  layer: 2\n")
    result = evaluate_json(capsys, trained_dir, "--max-samples", "8", "--config", str(config))
    assert result["policy"] == "static" and result["avg_exit_layer"] == 2


@pytest.mark.parametrize("task", ["multi-label", "relation-extraction"])
def test_train_other_text_tasks(tiny_backbone_dir, tmp_path, capsys, task):
    rows = {
        "multi-label": [
            {"text": "drug A activates receptor B", "labels": ["ACTIVATOR"]},
            {"text": "drug C blocks channel D", "labels": ["ANTAGONIST", "DOWNREGULATOR"]},
            {"text": "nothing here", "labels": []},
        ],
        "relation-extraction": [
            {
                "text": "aspirin raises warfarin levels",
                "head": "aspirin",
                "tail": "warfarin",
                "relation": "effect",
            },
            {
                "text": "Aspirin and heparin were given",
                "head": "aspirin",
                "tail": "heparin",
                "relation": "None",
            },
        ],
    }[task]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows * 4))
    output = tmp_path / "model"
    assert (
        main(
            [
                "train",
                "--task",
                task,
                "--backbone",
                str(tiny_backbone_dir),
                "--train",
                str(data),
                "--dev",
                str(data),
                "--output",
                str(output),
                "--json",
            ]
        )
        == 0
    )
    result = run_json(
        capsys, ["evaluate", "--model", str(output), "--data", str(data), "--policy", "full", "--json"]
    )
    assert {"multi-label": "example_f1", "relation-extraction": "micro_f1"}[task] in result
    if task == "relation-extraction":  # the markers are whole tokens of the saved tokenizer
        tokenizer = AutoTokenizer.from_pretrained(output)
        assert tokenizer.tokenize("[E1] aspirin [/E1]")[0] == "[E1]"


def one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("epee: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_missing_model_dir_is_one_line(tmp_path, capsys):
    err = one_line_error(
        capsys,
        ["evaluate", "--model", str(tmp_path / "none"), "--data", str(DEMO_DATA / "ade_demo_dev.jsonl")],
    )
    assert "model directory not found" in err


def test_bad_yaml_is_one_line(trained_dir, tmp_path, capsys):
    config = tmp_path / "model.yaml"
    config.write_text("epee:\n  policy: epee\n  entropy_threshold: [1]\n")
    err = one_line_error(
        capsys, ["evaluate", "--model", str(trained_dir), "--data", "x", "--config", str(config)]
    )
    assert "'entropy_threshold' must be a finite number" in err and str(config) in err


def test_unknown_policy_is_one_line(trained_dir, capsys):
    err = one_line_error(
        capsys, ["evaluate", "--model", str(trained_dir), "--data", "x", "--policy", "turbo"]
    )
    assert "unknown policy 'turbo'" in err


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("patience=0", "'patience' must be an integer in [1, 10000]"),
        ("patience", "--set expects KEY=VALUE"),
        ("layer=2", "policy 'epee' takes no parameter 'layer'"),
    ],
)
def test_bad_set_value_is_one_line(trained_dir, capsys, pair, message):
    err = one_line_error(capsys, ["evaluate", "--model", str(trained_dir), "--data", "x", "--set", pair])
    assert message in err


def test_bad_data_file_is_one_line(trained_dir, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine", "label": "adverse_event"}\n{"txt": "typo"}\n')
    err = one_line_error(capsys, ["evaluate", "--model", str(trained_dir), "--data", str(data)])
    assert f"{data}:2: missing field 'text'" in err


# --- unusable rows: one rule in every command that reads data --------------------------------------------------


def bad_rows_file(tmp_path) -> str:
    """Demo dev rows (usable) with three unusable rows: bad JSON at line 3, an unknown label at 5 and 7."""
    good = (DEMO_DATA / "ade_demo_dev.jsonl").read_text().splitlines()[:12]
    lines = good[:2] + ["{oops"] + good[2:3] + ['{"text": "x", "label": "maybe"}'] + good[3:4]
    lines += ['{"text": "y", "label": "maybe"}'] + good[4:]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


BAD_ROWS_MESSAGE = (
    "{path}:3: not valid JSON (Expecting property name enclosed in double quotes at column 2); other unusable rows: "
    "unknown label 'maybe': 2; --skip-invalid leaves unusable rows out"
)
SKIPPED = {"unknown label 'maybe'": 2, "invalid JSON": 1}


@pytest.mark.parametrize(
    "command",
    [
        ["evaluate", "--policy", "full,epee"],
        ["bench", "--batch-sizes", "4", "--policies", "full,epee"],
        ["calibrate"],
    ],
)
def test_commands_that_read_data_stop_at_unusable_rows_or_skip_and_record_them(
    trained_dir, tmp_path, capsys, command
):
    data = bad_rows_file(tmp_path)
    argv = [*command, "--model", str(trained_dir), "--data", data]
    if command[0] == "bench":
        argv += ["--output-dir", str(tmp_path / "reports")]
    if command[0] == "calibrate":
        argv += ["--output", str(tmp_path / "model.yaml")]
    err = one_line_error(capsys, argv)
    assert err == "epee: error: " + BAD_ROWS_MESSAGE.format(path=data)

    capsys.readouterr()
    assert main([*argv, "--skip-invalid", "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["skipped_rows"] == SKIPPED
    assert (
        f"epee: {data}: skipped 3 unusable rows (unknown label 'maybe': 2, invalid JSON: 1)" in captured.err
    )
    if command[0] == "calibrate":
        written = json.loads((tmp_path / "model.report.json").read_text())
        assert written["skipped_rows"] == SKIPPED and written["num_samples"] == 12
    if command[0] == "bench":
        (written,) = (tmp_path / "reports").glob("*.json")
        assert json.loads(written.read_text())["skipped_rows"] == SKIPPED


def test_calibrate_checks_the_data_even_when_its_cache_is_reused(trained_dir, tmp_path, capsys):
    data = tmp_path / "dev.jsonl"
    data.write_text("".join((DEMO_DATA / "ade_demo_dev.jsonl").read_text().splitlines(True)[:12]))
    argv = [
        "calibrate",
        "--model",
        str(trained_dir),
        "--data",
        str(data),
        "--output",
        str(tmp_path / "m.yaml"),
    ]
    argv += ["--cache", str(tmp_path / "cache.safetensors"), "--json"]
    assert run_json(capsys, argv)["skipped_rows"] == {}
    assert run_json(capsys, argv)["cache"]["status"] == "reused"


def test_train_stops_at_unusable_rows_or_skips_and_records_them(tiny_backbone_dir, tmp_path, capsys):
    data = bad_rows_file(tmp_path)
    output = tmp_path / "model"
    argv = ["train", "--task", "text-classification", "--backbone", str(tiny_backbone_dir), "--train", data]
    argv += ["--dev", data, "--output", str(output), "--epochs", "1"]
    err = one_line_error(capsys, argv)
    assert err == (
        f"epee: error: {data}:3: not valid JSON (Expecting property name enclosed in double quotes at column 2); "
        "--skip-invalid leaves unusable rows out"
    )
    assert not output.exists()
    summary = run_json(capsys, [*argv, "--skip-invalid", "--json"])
    # In training the labels come from the training rows, so 'maybe' is a label there, not an unusable row.
    assert summary["skipped_rows"] == {"train": {"invalid JSON": 1}, "dev": {"invalid JSON": 1}}
    record = (output / "epee.yaml").read_text()
    assert "invalid JSON: 1" in record


# --- the command line's surface: help, argument conventions, output order --------------------------------------


def all_parsers(parser: argparse.ArgumentParser, path: str = "epee"):
    """(command path, parser) for the top-level parser and every sub-command, nested ones included."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from all_parsers(sub, f"{path} {name}")


def test_every_argument_of_every_command_has_help_text():
    missing = [
        f"{path} {'/'.join(action.option_strings) or action.dest}"
        for path, parser in all_parsers(build_parser())
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction) and not (action.help or "").strip()
    ]
    assert missing == []


def test_top_level_help_lists_every_command_including_nested_ones(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    listing = capsys.readouterr().out
    nested = [path.split()[-1] for path, _ in all_parsers(build_parser()) if path != "epee"]
    assert {"rollout", "set-default", "soak"} <= set(nested)
    assert [name for name in nested if name not in listing] == []


# Run in a fresh interpreter: this test module has imported torch already.
NO_TORCH_FOR_HELP = """
import argparse, contextlib, io, sys
from epee_core.cli import build_parser

def command_paths(parser, path=()):
    yield path
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from command_paths(sub, (*path, name))

for path in list(command_paths(build_parser())):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        build_parser().parse_args([*path, "--help"])
print(sorted(name for name in ("torch", "transformers", "kserve") if name in sys.modules))
"""


def test_building_the_parser_and_printing_any_help_imports_no_torch():
    """`epee --help` and every `epee COMMAND --help` stay fast: torch (and KServe, for `epee serve`) is imported
    where a command runs."""
    checkout = str(Path(__file__).resolve().parents[1])
    environment = {**os.environ, "PYTHONPATH": checkout}
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCH_FOR_HELP], capture_output=True, text=True, env=environment, check=True
    )
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["describe", "--name", "ade"], ("ade", None)),
        (["describe", "ade", "--version", "all"], ("ade", "all")),
        (["scale", "--name", "ade", "--min-workers", "2"], ("ade", None)),
        (["unregister", "ade", "--version", "2.0"], ("ade", "2.0")),
        (["set-default", "--name", "ade", "--version", "2.0"], ("ade", "2.0")),
        (["set-default", "ade", "2.0"], ("ade", "2.0")),
    ],
)
def test_deploy_actions_take_the_model_as_name_flag_or_positional(argv, expected):
    assert deploy_model(build_parser().parse_args(["deploy", *argv])) == expected


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["describe"], "deploy describe: name the model with --name NAME"),
        (["describe", "ade", "--name", "other"], "--name other and the positional ade disagree"),
        (["set-default", "--name", "ade"], "deploy set-default: give the version to serve with --version"),
    ],
)
def test_deploy_without_a_model_name_is_one_line_before_any_server_call(capsys, argv, message):
    err = one_line_error(capsys, ["deploy", *argv, "--management-url", "http://127.0.0.1:9"])
    assert message in err


def test_train_with_an_unknown_backbone_prints_nothing_before_its_error(tmp_path, capsys):
    data = str(DEMO_DATA / "ade_demo_dev.jsonl")
    capsys.readouterr()
    code = main(["train", "--task", "text-classification", "--backbone", "bert-base", "--train", data,
                 "--dev", data, "--output", str(tmp_path / "model")])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.startswith("epee: error: backbone 'bert-base': not a directory and not one of minilm")
    assert captured.err.count("\n") == 1


def calibrate_args(*options: str) -> argparse.Namespace:
    return build_parser().parse_args(["calibrate", "--model", "m", "--data", "d", "--output", "o", *options])


def test_uncertified_calibration_on_fewer_rows_than_a_certificate_needs_warns():
    warning = few_rows_warning(calibrate_args("--guarantee", "none"), 35)
    assert warning.startswith(
        "--guarantee none chose on 35 calibration rows, where one row moves the accuracy"
    )
    assert "at least 230 test rows" in warning  # ε = 0.01, δ = 0.1: (1 - ε)^n ≤ δ


def test_uncertified_calibration_on_enough_rows_or_certified_does_not_warn():
    assert few_rows_warning(calibrate_args("--guarantee", "none"), 230) is None
    assert few_rows_warning(calibrate_args(), 35) is None  # certified: the certificate says what holds
    assert few_rows_warning(calibrate_args("--guarantee", "none", "--target-speedup", "2"), 35) is None


def test_calibrate_prints_the_few_rows_warning_on_stderr_as_one_line(monkeypatch, capsys):
    import epee_core.calibration

    monkeypatch.setattr(
        epee_core.calibration, "run_calibration", lambda job: {"split": {"calibration_samples": 24}}
    )
    assert (
        main(["calibrate", "--model", "m", "--data", "d", "--output", "o", "--guarantee", "none", "--json"])
        == 0
    )
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"split": {"calibration_samples": 24}}
    assert captured.err.startswith("epee: warning: --guarantee none chose on 24 calibration rows")
    assert captured.err.count("\n") == 1
