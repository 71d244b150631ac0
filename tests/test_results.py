"""The results report (`epee report results`, epee_core.measure.results): its commands are `epee` commands, and
one tiny run end to end: certified policies measured on the held-out half with bootstrap intervals."""

from __future__ import annotations

import json
import random
import shlex
from pathlib import Path

import pytest
from helpers import build_tiny_model

from epee_core.cli import build_parser, main
from epee_core.cli.calibrate import calibration_job
from epee_core.data.catalogue import DATASETS
from epee_core.engine.model import SPEC_FILE
from epee_core.engine.spec import ModelSpec
from epee_core.measure import results
from epee_core.serving.config import ServeConfig


@pytest.mark.parametrize(("backbone", "dataset"), results.RUNS)
def test_each_run_trains_with_the_epee_train_command_it_prints(backbone, dataset):
    config = results.train_config(
        backbone, DATASETS[dataset], Path("data"), Path("models/x"), skip_invalid=True, threads=1
    )
    args = build_parser().parse_args(shlex.split(results.train_command(config))[1:])
    assert (args.task, args.backbone, args.train, args.dev, args.output) == (
        config.task,
        config.backbone,
        config.train_path,
        config.dev_path,
        config.output,
    )
    assert (args.epochs, args.max_samples, args.max_dev_samples, args.threads, args.skip_invalid) == (
        config.epochs,
        None,
        config.max_dev_samples,
        1,
        True,
    )
    # Everything else is the backbone's recipe: no flag sets it.
    assert (args.lr, args.head_lr, args.batch_size, args.class_balance) == (None, None, None, None)


@pytest.mark.parametrize(
    ("quantize", "guarantee"), [("none", "accuracy"), ("int8", "accuracy"), ("none", "none")]
)
def test_each_calibration_is_the_epee_calibrate_command_it_prints(quantize, guarantee):
    job = results.calibration_job(
        Path("models/x"), Path("models/x/calibration.jsonl"), quantize, guarantee, True
    )
    args = build_parser().parse_args(shlex.split(results.calibrate_command(job))[1:])
    assert calibration_job(args) == job


def test_docs_training_lists_exactly_the_commands_the_report_runs(capsys):
    assert main(["report", "results", "--commands", "--skip-invalid"]) == 0  # as docs/training.md says
    printed = capsys.readouterr().out.splitlines()
    documented = Path(__file__).resolve().parents[1] / "docs" / "training.md"
    in_doc = [
        line for line in documented.read_text(encoding="utf-8").splitlines() if line.startswith("epee train ")
    ]
    assert in_doc == printed


def test_report_commands_carry_skip_invalid_when_the_report_does(capsys):
    assert main(["report", "results", "--commands", "--skip-invalid", "--only", "minilm/git"]) == 0
    (command,) = capsys.readouterr().out.splitlines()
    assert command.endswith(" --skip-invalid")
    assert build_parser().parse_args(shlex.split(command)[1:]).skip_invalid


def parsed_flags(argv: list[str]) -> dict:
    """What `epee` parses from `argv`, but the function it runs."""
    return {name: value for name, value in vars(build_parser().parse_args(argv)).items() if name != "run"}


@pytest.fixture
def trained_run(tokenizer, tmp_path):
    """A data folder with an ADE-like dev split (one unusable row) and a tiny model filed as minilm/ade,
    its training record saying it was trained with the report's recipe on the whole training split."""
    data, models = tmp_path / "data", tmp_path / "models"
    (data / "ade").mkdir(parents=True)
    rng = random.Random(0)
    with (Path(results.__file__).parents[1] / "data" / "ade_demo_dev.jsonl").open() as lines:
        rows = [json.dumps({"text": json.loads(line)["text"], "label": rng.choice("ab")}) for line in lines]
    (data / "ade" / "dev.jsonl").write_text("\n".join(rows[:160] + ['{"text": 1}']) + "\n")
    model_dir = models / "ade-minilm"
    build_tiny_model(tokenizer, num_layers=4).save_pretrained(model_dir)
    config = results.train_config("minilm", DATASETS["ade"], data, model_dir)
    resolved, _ = config.with_recipe()
    spec = ModelSpec.load(model_dir / SPEC_FILE)
    spec.training = {key: getattr(resolved, key) for key in results.RECIPE_FIELDS}
    spec.training.update(
        max_samples=None, train_samples=20411, train_seconds=600.0, skipped_rows={"train": {}}
    )
    spec.save(model_dir / SPEC_FILE)
    return data, models, tmp_path / "docs" / "results.md"


def test_a_run_is_certified_on_one_dev_half_and_measured_on_the_other(trained_run, monkeypatch):
    data, models, output = trained_run
    argv = [
        "report",
        "results",
        "--data",
        str(data),
        "--models",
        str(models),
        "--output",
        str(output),
        "--resamples",
        "40",
    ]
    argv += ["--only", "minilm/ade,minilm/ddi", "--skip-untrained", "--skip-invalid"]
    assert main(argv) == 0
    report = json.loads(output.with_suffix(".json").read_text())
    assert report["missing"] == ["minilm/ddi"]
    (run,) = report["runs"]
    model_dir = models / "ade-minilm"
    report_dir = model_dir / results.REPORT_DIR
    calibration = (report_dir / "calibration.jsonl").read_text().splitlines()
    heldout = (report_dir / "heldout.jsonl").read_text().splitlines()
    source = (data / "ade" / "dev.jsonl").read_text().splitlines()
    assert sorted(calibration + heldout) == sorted(source) and not set(calibration) & set(heldout)
    assert run["heldout_rows"] + sum(run["skipped_rows"].values()) == len(heldout)
    rows = run["rows"]
    assert list(rows) == [key for key, _ in results.ROWS]
    for row in rows.values():
        for key in ("accuracy", "macro_f1"):
            low, high = row["intervals"][key]
            assert low <= row[key] <= high
    assert rows["full"]["intervals"]["delta_accuracy"] == [0.0, 0.0]
    assert rows["oracle"]["accuracy"] >= rows["full"]["accuracy"]
    assert rows["hf"]["speedup_vs_hf"] == 1.0 and rows["hf"]["accuracy"] == rows["full"]["accuracy"]
    for key, stem in (
        ("certified", "certified"),
        ("int8_certified", "certified-int8"),
        ("uncertified", "uncertified"),
    ):
        yaml_path = report_dir / f"{stem}.yaml"
        assert yaml_path.is_file() and run["certificates"][key]["calibration_rows"] <= len(calibration)
        assert rows[key]["policy"] == ServeConfig.load(yaml_path).policy.name
    assert run["commands"][0].startswith("epee train") and "--quantize int8" in run["commands"][2]
    assert "--guarantee none" in run["commands"][3]
    markdown = output.read_text()
    assert "| minilm | ade (" in markdown and "not trained when it was generated" in markdown
    assert "int8 + certified" in markdown and "minilm/ddi" in markdown

    def fail(*_):
        raise AssertionError("measured again")

    monkeypatch.setattr(results, "certify_and_measure", fail)
    assert parsed_flags(shlex.split(report["command"])[1:]) == parsed_flags(
        argv
    )  # its command regenerates it
    assert main(argv) == 0  # resumed: heldout.json is read back

    # --update keeps the runs of the earlier JSON that were not measured now, and says where each was measured.
    json_path = output.with_suffix(".json")
    earlier = json.loads(json_path.read_text())
    assert run["measured"] and "int8 kernel" in run["machine"]
    other = {**run, "backbone": "gpt2-small", "machine": "another CPU"}
    other.pop("measured")
    json_path.write_text(json.dumps({**earlier, "generated": "2026-11-29", "runs": [other]}))
    assert main([*argv, "--update"]) == 0
    updated = json.loads(json_path.read_text())
    assert [(r["backbone"], r["measured"]) for r in updated["runs"]] == [
        ("minilm", run["measured"]),
        ("gpt2-small", "2026-11-29"),
    ]
    assert updated["missing"] == ["minilm/ddi"]
    markdown = output.read_text()
    assert "Measured on different days or machines" in markdown
    assert "- 2026-11-29, another CPU: gpt2-small/ade" in markdown


def test_update_replaces_measured_runs_keeps_the_rest_in_report_order():
    kept = {
        "generated": "2026-11-29",
        "runs": [
            {"backbone": "gpt2-small", "dataset": "ade", "x": 1},
            {"backbone": "minilm", "dataset": "ade", "x": 2},
        ],
    }
    merged = results.merge_runs(
        kept, {("minilm", "ade"): {"backbone": "minilm", "dataset": "ade", "x": 3}, ("minilm", "ddi"): None}
    )
    assert list(merged) == [("minilm", "ade"), ("minilm", "ddi"), ("gpt2-small", "ade")]
    assert merged[("minilm", "ade")]["x"] == 3 and merged[("minilm", "ddi")] is None
    assert merged[("gpt2-small", "ade")] == {
        "measured": "2026-11-29",
        "backbone": "gpt2-small",
        "dataset": "ade",
        "x": 1,
    }
    report = {"generated": "2026-12-03", "runs": [r for r in merged.values() if r]}
    assert results.provenance_lines(report)[0].startswith("**Measured on different days")
    assert results.provenance_lines({"generated": "2026-12-03", "runs": [merged[("minilm", "ade")]]}) == []
