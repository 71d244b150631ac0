"""TorchServe started from the repository's own config.properties (127.0.0.1:8080/8081/8082, token auth on,
model_store/), from the repository root as a user does, with a freshly built relation-extraction archive.

Two test runs on one machine would both need port 8080: a lock file makes them take turns.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

import psutil
import pytest
import requests
from helpers import build_tiny_model

from epee_core.cli import main
from epee_core.engine.inputs import Example, encode_texts, model_text
from epee_core.engine.model import EarlyExitModel
from epee_core.engine.runner import run_early_exit
from epee_core.ops.torchserve import TorchServe
from epee_core.serving.config import ServeConfig

from .helpers import ROOT, ROOT_CONFIG, package, post_all, wait_for_metric, write_model_yaml

pytestmark = pytest.mark.integration

MODEL = "epee-test-relations"  # its own name: never overwrites an archive of the user's in model_store/
LOCK_FILE = os.path.join(tempfile.gettempdir(), "epee-serve-root-config-test.lock")
TEXT = "Severe neutropenia developed after treatment with clozapine."
PAIRS = [("neutropenia", "clozapine"), ("clozapine", "neutropenia")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    work = tmp_path_factory.mktemp("root-config")
    model_dir = work / "tiny-relations"
    build_tiny_model(tokenizer, task="relation-extraction").save_pretrained(model_dir)
    config = write_model_yaml(
        work / "relations.yaml", batch_size=4, max_batch_delay=500, task="relation-extraction", policy="epee"
    )
    with open(LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        archive = package(model_dir, config, MODEL, ROOT / "model_store")
        server = TorchServe(ROOT_CONFIG, workdir=ROOT)
        server.start()
        try:
            key_file = str(ROOT / "key_file.json")
            assert main(["deploy", "register", "--mar", f"{MODEL}.mar", "--key-file", key_file]) == 0
            yield {"server": server, "model_dir": model_dir, "config": config}
        finally:
            server.stop()
            archive.unlink(missing_ok=True)


def test_root_config_listens_on_the_documented_local_ports_with_token_auth(server):
    assert (server.inference_url, server.management_url, server.metrics_url) == (
        "http://127.0.0.1:8080",
        "http://127.0.0.1:8081",
        "http://127.0.0.1:8082",
    )
    refused = requests.get(f"{server.management_url}/models", timeout=10)
    assert "Token Authorization failed" in refused.text
    listed = requests.get(f"{server.management_url}/models", headers=server.auth("management"), timeout=10)
    assert {"modelName": MODEL, "modelUrl": f"{MODEL}.mar"} in listed.json()["models"]


@pytest.fixture(scope="module")
def outside_archive(setup, tmp_path_factory) -> Path:
    """A copy of the test archive outside model_store: a file an attacker could have dropped anywhere."""
    elsewhere = tmp_path_factory.mktemp("outside-model-store") / "planted.mar"
    shutil.copy(ROOT / "model_store" / f"{MODEL}.mar", elsewhere)
    return elsewhere


@pytest.mark.parametrize(
    "where, expected",
    [
        ("https://example.com/model.mar", "does not match any allowed URL"),
        ("http://127.0.0.1:9/model.mar", "does not match any allowed URL"),  # SSRF into the host
        ("file://{outside}", "does not match any allowed URL"),
        ("{outside}", "Model not found"),
        ("../model_store/{model}.mar", "Relative path is not allowed"),
        ("file://{store}/{model}.mar", "does not match any allowed URL"),  # names only, even inside the store
    ],
)
def test_registration_only_from_the_model_store_by_name(server, outside_archive, capsys, where, expected):
    url = where.format(outside=outside_archive, store=ROOT / "model_store", model=MODEL)
    token = f"--token={server.keys['management']}"  # `=`: a key may start with '-'
    assert main(["deploy", "register", "--mar", url, "--name", "planted", token]) == 2
    assert expected in capsys.readouterr().err
    listed = requests.get(f"{server.management_url}/models", headers=server.auth("management"), timeout=10)
    assert [entry["modelName"] for entry in listed.json()["models"]] == [MODEL]


def test_every_listening_socket_is_loopback(server):
    """HTTP APIs, gRPC (7070/7071) and anything else the Java frontend or its workers listen on."""
    processes = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
    # psutil 6 renamed `connections` to `net_connections`; kserve 0.21 (the `kserve` extra) pins psutil < 6
    sockets = [getattr(process, "net_connections", None) or process.connections for process in processes]
    listening = [
        connection.laddr
        for connections in sockets
        for connection in connections(kind="inet")
        if connection.status == psutil.CONN_LISTEN
    ]
    ports = {address.port for address in listening}
    assert {8080, 8081, 8082, 7070, 7071} <= ports
    assert {address.ip for address in listening} <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def test_relation_extraction_answers_match_the_engine_and_bad_entities_get_400(setup, server):
    model = EarlyExitModel.from_pretrained(setup["model_dir"])
    policy = ServeConfig.load(setup["config"]).policy
    calls = [{"json": {"text": TEXT, "head": head, "tail": tail}} for head, tail in PAIRS]
    calls += [
        {"json": {"text": TEXT, "tail": "clozapine"}},
        {"json": {"text": TEXT, "head": "aspirin", "tail": "clozapine"}},
    ]
    url = f"{server.inference_url}/predictions/{MODEL}"
    responses = post_all(url, [{**call, "headers": server.auth()} for call in calls])
    for (head, tail), response in zip(PAIRS, responses):
        assert response.status_code == 200, response.text
        marked = model_text(Example(TEXT, head=head, tail=tail), "relation-extraction")
        alone = run_early_exit(model, encode_texts(model.tokenizer, [marked], model.spec.max_length), policy)
        body = response.json()
        assert body["label"] == model.spec.labels[int(alone.probs[0].argmax())]
        assert body["exit_layer"] == int(alone.exit_layer[0])
    assert [response.status_code for response in responses[2:]] == [400, 400]
    assert "missing field 'head'" in responses[2].json()["error"]
    assert "'aspirin' does not occur" in responses[3].json()["error"]


def test_exit_metrics_are_on_port_8082(server):
    url = f"{server.inference_url}/predictions/{MODEL}"
    calls = [
        {"json": {"text": TEXT, "head": head, "tail": tail}, "headers": server.auth()} for head, tail in PAIRS
    ]
    exit_layers = {str(response.json()["exit_layer"]) for response in post_all(url, calls)}
    counts = wait_for_metric(server.metrics_url, "EpeeExitLayerRequests", MODEL, len(calls))
    assert sum(counts.values()) >= len(calls)
    assert exit_layers <= {dict(labels)["ExitLayer"] for labels in counts if dict(labels)["Policy"] == "epee"}
    text = requests.get(f"{server.metrics_url}/metrics", timeout=10).text
    assert f'EpeeLayersSaved{{ModelName="{MODEL}"' in text and f'EpeeLayersRun{{ModelName="{MODEL}"' in text
