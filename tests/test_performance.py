"""The performance report (`epee report performance`): full, calibrated EPEE and oracle side by side per model,
resumable."""

from __future__ import annotations

import json

import pytest
from helpers import DEMO_DATA, build_tiny_model

from epee_core.cli import main
from epee_core.data.catalogue import DATASETS
from epee_core.data.splits import dev_sample
from epee_core.measure import performance


@pytest.fixture(scope="module")
def report_inputs(tmp_path_factory, tokenizer):
    """models/ade-tiny (labels a, b, c) and data/ade/dev.jsonl: 30 real ADE sentences labelled round-robin."""
    work = tmp_path_factory.mktemp("performance")
    build_tiny_model(tokenizer).save_pretrained(work / "models" / "ade-tiny")
    sentences = [json.loads(line)["text"] for line in (DEMO_DATA / "ade_demo_dev.jsonl").open()][:30]
    (work / "data" / "ade").mkdir(parents=True)
    (work / "data" / "ade" / "dev.jsonl").write_text(
        "".join(json.dumps({"text": text, "label": "abc"[i % 3]}) + "\n" for i, text in enumerate(sentences))
    )
    return work


def report_argv(work, *extra: str) -> list[str]:
    argv = ["report", "performance", "--data", str(work / "data"), "--models", str(work / "models")]
    argv += ["--only", "ade-tiny", "--max-samples", "12", "--batch-sizes", "1,4"]
    return [*argv, "--output", str(work / "docs" / "perf.md"), *extra]


def run_report(work, *extra: str) -> dict:
    assert main(report_argv(work, *extra)) == 0
    return json.loads((work / "docs" / "perf.json").read_text())


def test_report_times_full_epee_and_oracle_at_every_batch_size(report_inputs):
    report = run_report(report_inputs)
    (model,) = report["models"]
    assert model["num_samples"] == 12
    assert {(row["batch_size"], row["policy"]) for row in model["results"]} == {
        (batch, policy) for batch in (1, 4) for policy in ("full", model["epee_policy"], "oracle", "hf")
    }
    assert model["calibration"]["includes_timed_rows"]  # 30 dev rows: too few to keep the timed ones out
    markdown = (report_inputs / "docs" / "perf.md").read_text()
    assert "## Batch 4 at a glance" in markdown and "## ade-tiny (12 of 30 dev rows" in markdown
    assert report["command"].startswith("epee report performance --data ") and report["machine"]["cores"]


def test_report_reads_a_model_measured_with_the_same_settings_back(report_inputs):
    first = run_report(report_inputs)
    again = run_report(report_inputs)
    assert again["models"][0]["results"] == first["models"][0]["results"]
    rerun = run_report(report_inputs, "--batch-sizes", "4")
    assert {row["batch_size"] for row in rerun["models"][0]["results"]} == {4}


def test_calibration_rows_are_outside_the_timed_sample_when_enough_are_left(tmp_path):
    rows = [{"text": f"sentence {i}", "label": i % 2} for i in range(300)]
    (tmp_path / "ade").mkdir()
    (tmp_path / "ade" / "dev.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    dev, calibration, overlaps = performance.timed_and_calibration_rows("ade-minilm", tmp_path, 50)
    assert [example.text for example in dev.sample] == [
        example.text for example in dev_sample(DATASETS["ade"], tmp_path, 50).sample
    ]
    assert len(dev.examples) == 300 and not overlaps and len(calibration) == 250 and dev.skipped_rows == {}
    assert not {example.text for example in dev.sample} & {example.text for example in calibration}


def test_profile_reads_each_labelled_part_of_the_runner(report_inputs):
    report = run_report(report_inputs, "--profile", "ade-tiny")
    profile = report["profile"]
    assert {row["batch_size"] for row in profile["rows"]} == {8, 32} and len(profile["rows"]) == 4
    for row in profile["rows"]:
        assert row["layers_ms"] > 0 and row["layer_tokens_per_batch"] > 0
        assert row["ms_per_batch"] >= row["layers_ms"] + row["policy_ms"]
    assert "## Where the time goes" in (report_inputs / "docs" / "perf.md").read_text()


def test_recorded_report_figures_go_beside_the_new_ones(report_inputs):
    first = run_report(report_inputs)
    recorded = report_inputs / "recorded.json"
    recorded.write_text(json.dumps(first))
    run_report(report_inputs, "--recorded", str(recorded))
    markdown = (report_inputs / "docs" / "perf.md").read_text()
    assert "EPEE × full recorded" in markdown and f"in {recorded}" in markdown


def test_unusable_dev_rows_stop_the_report_unless_skipped(tmp_path, tokenizer, capsys):
    build_tiny_model(tokenizer).save_pretrained(tmp_path / "models" / "ade-tiny")
    (tmp_path / "data" / "ade").mkdir(parents=True)
    rows = [json.dumps({"text": f"sentence {i}", "label": "abc"[i % 3]}) for i in range(20)]
    rows[4] = json.dumps({"text": "x", "label": "zzz"})
    dev = tmp_path / "data" / "ade" / "dev.jsonl"
    dev.write_text("\n".join(rows) + "\n")
    assert main(report_argv(tmp_path)) == 2
    assert f"{dev}:5: label 'zzz' is not one the model knows (a, b, c)" in capsys.readouterr().err
    report = run_report(tmp_path, "--skip-invalid")
    assert report["models"][0]["skipped_rows"] == {"unknown label 'zzz'": 1}
