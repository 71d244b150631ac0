"""A real TorchServe serving a tiny model with the shadow audit on (audit_fraction 1, a tiny certified rate): a
burst of requests served at layer 1, which disagrees with full depth, raises the alarm; the worker then answers at
full depth, says so in the `X-EPEE-Guarantee` header, in its metrics and in model describe, and logs the alarm
once without request content."""

from __future__ import annotations

import json
import time

import pytest
import requests
from helpers import DEMO_DATA, build_tiny_model

from epee_core.cli import main
from epee_core.ops.management import ManagementClient

from .helpers import post_all, read_metrics, running_torchserve, wait_for_metric, write_model_yaml

pytestmark = pytest.mark.integration

MODEL = "audited"
NUM_LAYERS = 4
GUARANTEE = {"kind": "consistency", "epsilon": 0.01, "delta": 0.1, "bound": 0.005, "n": 1000,
             "method": "exact"}  # fmt: skip
TEXTS = [
    json.loads(line)["text"] for line in (DEMO_DATA / "ade_demo_dev.jsonl").read_text().splitlines()[:48]
]


@pytest.fixture(scope="module", params=["batch", "continuous"])
def setup(request, tmp_path_factory, tokenizer):
    """The tiny model packaged with an audit, for TorchServe's dynamic batching and for its continuous batching
    (the layer-level scheduler)."""
    work = tmp_path_factory.mktemp(f"audit-{request.param}")
    build_tiny_model(tokenizer).save_pretrained(work / "model")
    config = write_model_yaml(work / "audited.yaml", batch_size=4, max_batch_delay=20, task="text-classification",
                              policy="static", layer=1, audit_fraction=1.0, audit_records=str(work / "audit.jsonl"),
                              num_threads=1, guarantee=GUARANTEE)  # fmt: skip
    store = work / "model_store"
    assert main(["package", "--model", str(work / "model"), "--config", str(config), "--name", MODEL,
                 "--export-path", str(store), "--scheduler", request.param]) == 0  # fmt: skip
    with running_torchserve(work, store) as server:
        ManagementClient(server.management_url, server.keys["management"], timeout=120).register(
            f"{MODEL}.mar", name=MODEL
        )
        yield {"server": server, "work": work, "scheduler": request.param}


def predict(server, texts: list[str]) -> list[requests.Response]:
    url = f"{server.inference_url}/predictions/{MODEL}"
    return post_all(url, [{"json": {"text": text}, "headers": server.auth()} for text in texts])


def describe(server) -> dict:
    response = requests.get(f"{server.management_url}/models/{MODEL}", params={"customized": "true"},
                            headers=server.auth("management"), timeout=60)  # fmt: skip
    assert response.status_code == 200, response.text
    metadata = response.json()[0]["customizedMetadata"]  # TorchServe parses the handler's JSON when it can
    return json.loads(metadata) if isinstance(metadata, str) else metadata


def fallback_shown(setup) -> bool:
    """The worker's fallback flag: from model describe under dynamic batching; from the metric under continuous
    batching (a describe call there leaves TorchServe 0.12's frontend hanging the next predictions)."""
    if setup["scheduler"] == "batch":
        return describe(setup["server"])["fallback"]
    return sum(read_metrics(setup["server"].metrics_url, "EpeeFallback", MODEL).values()) == 1


def test_a_disagreeing_burst_alarms_and_the_worker_falls_back_to_full_depth(setup):
    server = setup["server"]
    assert not fallback_shown(setup)
    first = predict(server, TEXTS[:8])
    assert {response.json()["exit_layer"] for response in first} == {1}
    assert "fallback" not in first[0].headers["X-EPEE-Guarantee"]
    alarmed = False
    for start in range(8, len(TEXTS), 8):  # audits run after the answers: the alarm shows a batch later
        burst = predict(server, TEXTS[start : start + 8])
        assert all(response.status_code == 200 for response in burst)
        time.sleep(0.5)  # the frontend ingests the worker's metrics from its log a moment later
        if fallback_shown(setup):
            alarmed = True
            break
    assert alarmed, "48 rows at layer 1 against a certified rate of 0.01 should alarm"
    after = predict(server, TEXTS[:8])
    assert {response.json()["exit_layer"] for response in after} == {NUM_LAYERS}
    assert {response.json()["policy"] for response in after} == {"full"}
    header = after[0].headers["X-EPEE-Guarantee"]
    assert "; fallback=full; alarm_at=" in header
    fallback = wait_for_metric(server.metrics_url, "EpeeFallback", MODEL, 1)
    assert sum(fallback.values()) == 1
    audited = wait_for_metric(server.metrics_url, "EpeeAuditedRows", MODEL, 8)
    assert audited[(("Disagree", "true"), ("Level", "Model"))] >= 1
    if setup["scheduler"] == "batch":
        state = describe(server)
        assert state["fallback"] is True and state["policy"] == "full"
        assert state["audit"]["alarm_at"] == int(header.rsplit("alarm_at=", 1)[1])
        assert state["audit"]["wealth"] >= 1 / state["audit"]["alpha"]


def test_the_alarm_is_logged_once_without_request_content(setup):
    logs = (setup["server"].log_dir / "model_log.log").read_text()
    alarms = [line for line in logs.splitlines() if "disagreement alarm" in line]
    assert len(alarms) == 1 and "serving full depth from now on" in alarms[0]
    assert not any(text[:30] in alarms[0] for text in TEXTS)


def test_audit_records_hold_exit_logits_and_no_text(setup):
    records = (setup["work"] / "audit.jsonl").read_text()
    assert records.count("\n") >= 8 and '"logits"' in records
    assert not any(text[:30] in records for text in TEXTS)
