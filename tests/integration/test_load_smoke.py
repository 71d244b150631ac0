"""Smoke test of `epee loadtest compare` (well under 60 s): a tiny model, a real TorchServe on free ports, three
users for a short clinical day per run. It checks that the comparison is produced and that nothing failed — it is
not a speed test."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
from helpers import DEMO_DATA, build_tiny_model

from epee_core.cli import main

from .helpers import derive_config, write_model_yaml

pytestmark = pytest.mark.integration


def write_data_dir(directory: Path) -> Path:
    """ade/dev.jsonl (the embedded ADE sentences) and mtsamples/notes.jsonl (long notes made of them)."""
    (directory / "ade").mkdir(parents=True)
    (directory / "mtsamples").mkdir()
    shutil.copy(DEMO_DATA / "ade_demo_dev.jsonl", directory / "ade" / "dev.jsonl")
    sentences = [json.loads(line)["text"] for line in (DEMO_DATA / "ade_demo_dev.jsonl").open()]
    notes = [" ".join(sentences[start : start + 30]) for start in range(0, 150, 30)]
    (directory / "mtsamples" / "notes.jsonl").write_text(
        "".join(json.dumps({"text": n}) + "\n" for n in notes)
    )
    return directory


def port_open(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    with socket.socket() as probe:
        return probe.connect_ex((host, int(port))) == 0


def test_compare_writes_the_report_with_zero_failures_and_stops_the_server(
    tmp_path, tokenizer, monkeypatch, capsys
):
    model_dir = tmp_path / "tiny-text"
    build_tiny_model(tokenizer).save_pretrained(model_dir)
    config = write_model_yaml(
        tmp_path / "tiny.yaml", batch_size=4, max_batch_delay=20, task="text-classification", num_threads=1
    )
    ts_config = derive_config(tmp_path / "config.properties", tmp_path / "model_store")
    slo = tmp_path / "slo.yaml"
    slo.write_text("max_failure_rate: 0\n")  # the gate: no failed request at all
    output = tmp_path / "reports"
    monkeypatch.chdir(tmp_path)  # TorchServe writes logs/ and key_file.json where it is started
    # Each text task is drawn at random; 1:1 (the default is 3:1) makes a run without notes vanishingly rare.
    monkeypatch.setenv("EPEE_SHORT_WEIGHT", "1")
    monkeypatch.setenv("EPEE_LONG_WEIGHT", "1")

    code = main(
        ["loadtest", "compare", "--model", str(model_dir), "--config", str(config), "--ts-config", str(ts_config),
         "--peak-users", "3", "--duration", "6", "--warmup", "1", "--cooldown", "0.5",
         "--data-dir", str(write_data_dir(tmp_path / "data")), "--output-dir", str(output), "--slo", str(slo),
         "--schedulers", "batch,continuous", "--json"]
    )  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    epee, full, layer = (report["runs"][name] for name in ("epee", "full", "continuous-epee"))
    kinds = {"text: ADE sentence", "text: MTSamples note"}
    for run in (epee, full, layer):
        assert run["stats"]["requests"] > 0 and run["stats"]["failures"] == 0
        assert run["by_request"] and set(run["by_request"]) <= kinds
        assert run["server"]["server_requests"] >= run["stats"]["requests"]
    assert set().union(*(run["by_request"] for run in (epee, full, layer))) == kinds
    assert full["server"]["avg_exit_layer"] == 4  # the override ran every layer of the same archive
    assert epee["server"]["avg_exit_layer"] <= 4
    assert layer["server"]["avg_exit_layer"] <= 4 and set(report["ratios_continuous"]) >= {
        "p95_vs_batch_epee"
    }
    assert report["passed"] and report["slo_violations"] == []
    markdown = (output / "comparison.md").read_text()
    assert "| p95 latency, ms |" in markdown and "tiny-text-loadtest-full" in markdown
    assert "tiny-text-loadtest-continuous-epee" in markdown
    assert (output / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for variant in ("epee", "full", "continuous-epee"):
        assert (output / f"{variant}_stats.csv").is_file() and (output / f"{variant}.html").is_file()
    properties = dict(line.split("=", 1) for line in ts_config.read_text().splitlines() if "=" in line)
    assert not port_open(properties["inference_address"])  # the server is gone
