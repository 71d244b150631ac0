"""The whole `epee demo --json` in a fresh folder, as `make demo` runs it on a clone: trains, calibrates, serves on
a real TorchServe (the root config.properties at free ports) and checks what the README promises: at least three
distinct exit layers across the demo sentences, each answered as annotated (about 3 minutes on 2 cores)."""

from __future__ import annotations

import json

import pytest

from epee_core.cli import main
from epee_core.ops.demo import DEMO_SENTENCES

from .helpers import derive_config

pytestmark = [pytest.mark.integration, pytest.mark.demo]


def test_the_demo_answers_as_annotated_with_exits_at_three_depths_or_more(tmp_path, monkeypatch, capsys):
    derive_config(tmp_path / "config.properties", tmp_path / "model_store")
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    answers = [(row["text"], row["label"]) for row in result["rows"]]
    assert answers == [(text, annotated) for text, annotated in DEMO_SENTENCES]
    assert len({row["exit_layer"] for row in result["rows"]}) >= 3
    assert result["exit_layers"] == sorted({row["exit_layer"] for row in result["rows"]})
    assert all(0 <= row["margin"] <= 1 for row in result["rows"])
    assert (tmp_path / result["plot"]).is_file() and (tmp_path / result["report"]).is_file()
