"""`epee loadtest soak` for 60 seconds (the default is 10 minutes) on a real TorchServe with a tiny model:
nothing lost, good requests answered 200, bad ones 4xx, worker memory within the bound, server stopped after."""

from __future__ import annotations

import json
import os

import pytest
from helpers import build_tiny_model

from epee_core.cli import main
from epee_core.ops.torchserve import read_properties

from .helpers import derive_config, write_model_yaml

pytestmark = pytest.mark.integration

SOAK_SECONDS = float(os.environ.get("EPEE_SOAK_SECONDS", 60))
RATE = 5.0


def test_soak_loses_nothing_and_keeps_worker_memory_bounded(tmp_path, tokenizer, monkeypatch, capsys):
    model_dir = tmp_path / "tiny-text"
    build_tiny_model(tokenizer).save_pretrained(model_dir)
    config = write_model_yaml(
        tmp_path / "tiny.yaml", batch_size=4, max_batch_delay=20, task="text-classification", num_threads=1
    )
    ts_config = derive_config(tmp_path / "config.properties", tmp_path / "model_store")
    monkeypatch.chdir(tmp_path)  # TorchServe writes logs/ and key_file.json where it is started

    code = main(["loadtest", "soak", "--model", str(model_dir), "--config", str(config), "--ts-config",
                 str(ts_config), "--duration", str(SOAK_SECONDS), "--rate", str(RATE), "--warmup", "5",
                 "--output-dir", str(tmp_path / "reports"), "--json"])  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    counts, rss = report["counts"], report["rss_mb"]
    print(f"\nsoak {SOAK_SECONDS:g} s at {RATE:g}/s: sent {counts['sent']}, answered {counts['answered']}, "
          f"lost {counts['lost']}, good {counts['good_200']}/{counts['good']} 200, bad {counts['bad_4xx']}/"
          f"{counts['bad']} 4xx, p95 {counts['p95_ms']} ms, worker RSS {rss['before']} -> {rss['after']} MB")  # fmt: skip
    assert code == 0, report["checks"]
    assert counts["sent"] == pytest.approx(SOAK_SECONDS * RATE, rel=0.05)  # the rate was really kept
    assert counts["answered"] == counts["sent"] and counts["lost"] == 0
    assert counts["good_200"] == counts["good"] > 0 and counts["bad_4xx"] == counts["bad"] > 0
    assert 50 < rss["before"] and rss["growth"] <= 64  # real worker processes were measured
    assert len(rss["samples"]) >= SOAK_SECONDS / 5
    assert "PASS: nothing lost" in (tmp_path / "reports" / "soak.md").read_text()
    port = read_properties(ts_config)["inference_address"].rsplit(":", 1)[1]
    assert not (tmp_path / "logs" / "tmp" / port / ".model_server.pid").exists()  # the server was stopped
