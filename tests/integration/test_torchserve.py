"""A real TorchServe (the root config.properties on free ports) serving a freshly packaged tiny text model.

The server runs on a Python that has torch, transformers and TorchServe but no installed epee_core: the archive
must bring its own engine. Requests go out concurrently so that TorchServe batches them (batchSize 4).
"""

from __future__ import annotations

import json
import subprocess
from collections import defaultdict

import pytest
import requests
from helpers import build_tiny_model

from epee_core.cli import main
from epee_core.engine.inputs import encode_texts
from epee_core.engine.model import EarlyExitModel
from epee_core.ops.management import ManagementClient
from epee_core.ops.torchserve import TorchServe
from epee_core.serving.config import ServeConfig

from .helpers import (
    SENTENCES,
    clean_python,
    engine_answer,
    free_ports,
    package,
    package_model,
    post_all,
    running_torchserve,
    wait_for_metric,
)

pytestmark = pytest.mark.integration

MODEL = "tiny-text"
RESPONSE_KEYS = {"label", "probabilities", "exit_layer", "num_layers", "entropy", "margin", "policy"}
MAX_BODY_BYTES, MAX_TEXT_CHARS = 3000, 1000


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    """Tiny model → model YAML → `epee package` → TorchServe → `epee deploy register`; stopped afterwards."""
    work = tmp_path_factory.mktemp("torchserve")
    model_dir, config, store = package_model(
        work,
        build_tiny_model(tokenizer),
        "tiny-text-model",
        "tiny-text.yaml",
        MODEL,
        batch_size=4,
        max_batch_delay=1000,
        task="text-classification",
        policy="epee",
        max_body_bytes=MAX_BODY_BYTES,
        max_text_chars=MAX_TEXT_CHARS,
    )
    python = clean_python(work / "venv-without-epee")
    with running_torchserve(work, store, python=python) as server:
        assert main(["deploy", "register", "--mar", f"{MODEL}.mar", "--batch-size", "4",
                     "--max-batch-delay", "1000", "--initial-workers", "1", *management_flags(server)]) == 0  # fmt: skip
        yield {"server": server, "model_dir": model_dir, "config": config, "store": store, "python": python}


def management_flags(server: TorchServe) -> list[str]:
    return ["--management-url", server.management_url, "--key-file", str(server.workdir / "key_file.json")]


@pytest.fixture(scope="module")
def engine(setup):
    """The same model and policy in-process, one sentence at a time: the reference answers."""
    model = EarlyExitModel.from_pretrained(setup["model_dir"])
    policy = ServeConfig.load(setup["config"]).policy

    def answer(text: str) -> dict:
        return engine_answer(model, encode_texts(model.tokenizer, [text], model.spec.max_length), policy)

    return answer


def predict_url(server: TorchServe) -> str:
    return f"{server.inference_url}/predictions/{MODEL}"


def json_call(server: TorchServe, body, **headers) -> dict:
    return {"json": body, "headers": {**server.auth(), **headers}}


def raw_call(server: TorchServe, data: bytes, content_type: str) -> dict:
    return {"data": data, "headers": {**server.auth(), "Content-Type": content_type}}


def test_archive_brings_its_engine_to_a_python_without_epee_core(setup, server):
    missing = subprocess.run(
        [setup["python"], "-c", "import epee_core"], cwd=setup["store"], capture_output=True
    )
    assert missing.returncode != 0 and b"ModuleNotFoundError" in missing.stderr
    log = (server.log_dir / "model_log.log").read_text()
    engine_line = next(line for line in log.splitlines() if "epee: tiny-text" in line)
    assert f"engine {server.tmp_dir}/models/" in engine_line and engine_line.rstrip().endswith("/epee_core")


def test_answers_match_the_in_process_engine(server, engine):
    responses = post_all(predict_url(server), [json_call(server, {"text": text}) for text in SENTENCES])
    for text, response in zip(SENTENCES, responses):
        assert response.status_code == 200, response.text
        body = response.json()
        expected = engine(text)
        assert set(body) == RESPONSE_KEYS
        assert (body["label"], body["exit_layer"]) == (expected["label"], expected["exit_layer"])
        assert list(body["probabilities"].values()) == pytest.approx(expected["probs"], abs=1e-4)
        assert body["num_layers"] == 4 and body["policy"] == "epee"


def test_plain_text_body_is_answered_like_json(server, engine):
    calls = [raw_call(server, text.encode(), "text/plain") for text in SENTENCES[:4]]
    for text, response in zip(SENTENCES, post_all(predict_url(server), calls)):
        assert response.status_code == 200, response.text
        assert response.json()["exit_layer"] == engine(text)["exit_layer"]


def test_json_and_header_overrides_run_every_layer_next_to_default_requests(server, engine):
    text = SENTENCES[0]
    assert engine(text)["exit_layer"] < 4  # so the override visibly changes the exit
    calls = [
        json_call(server, {"text": text, "epee": {"policy": "full"}}),
        json_call(server, {"text": text}, **{"X-EPEE-Policy": "full"}),
        json_call(server, {"text": text}),
        json_call(server, {"text": text}),
    ]
    bodies = [response.json() for response in post_all(predict_url(server), calls)]
    assert [(body["policy"], body["exit_layer"]) for body in bodies[:2]] == [("full", 4), ("full", 4)]
    assert [(body["policy"], body["exit_layer"]) for body in bodies[2:]] == [
        ("epee", engine(text)["exit_layer"])
    ] * 2


def test_concurrent_requests_are_batched_and_rows_exit_at_their_own_layers(server):
    responses = post_all(predict_url(server), [json_call(server, {"text": text}) for text in SENTENCES])
    batches = defaultdict(list)
    for response in responses:
        assert response.status_code == 200
        batches[response.headers["X-EPEE-Batch-Id"]].append(response)
    for members in batches.values():  # the header tells the batch size the handler saw
        assert {int(member.headers["X-EPEE-Batch-Size"]) for member in members} == {len(members)}
    assert max(len(members) for members in batches.values()) > 1
    assert any(len({member.json()["exit_layer"] for member in members}) > 1 for members in batches.values())


def test_bad_requests_get_their_own_4xx_json_and_batch_mates_are_answered(server):
    management = ManagementClient(server.management_url, server.keys["management"])
    worker_before = management.describe(MODEL)[0]["workers"][0]
    bad = [
        (raw_call(server, b"\xff\xfe not utf-8", "text/plain"), 400, "UTF-8"),
        (json_call(server, ["a", "list"]), 400, "got JSON list"),
        (json_call(server, {"epee": {"policy": "full"}}), 400, "missing field 'text'"),
        (json_call(server, {"text": "   "}), 400, "'text' is empty"),
        (raw_call(server, b'{"text": "unterminated', "application/json"), 400, "not valid JSON"),
        (json_call(server, {"text": "x" * (MAX_BODY_BYTES + 10)}), 413, "max_body_bytes"),
        (json_call(server, {"text": "y" * (MAX_TEXT_CHARS + 10)}), 413, "max_text_chars"),
        (json_call(server, {"tëxt": "Fièvre"}), 400, "unknown field 'tëxt'"),  # a non-ASCII error message
    ]
    good = [json_call(server, {"text": text}) for text in SENTENCES[:5]]
    # 13 requests, bad and good interleaved so that batches of 4 mix them whatever the arrival order's jitter
    # (sent bad-first, a quiet machine batches them in send order: 4 bad, 4 bad, 4 good, 1 good)
    order = [("bad", index) for index in range(len(bad))] + [("good", index) for index in range(len(good))]
    order.sort(key=lambda item: item[1] * 2 + (item[0] == "good"))
    calls = [bad[index][0] if kind == "bad" else good[index] for kind, index in order]
    responses = post_all(predict_url(server), calls)
    for (kind, index), response in zip(order, responses):
        if kind == "bad":
            _, status, fragment = bad[index]
            assert response.status_code == status, response.text
            assert set(response.json()) == {"error"} and fragment in response.json()["error"]
        else:
            assert response.status_code == 200 and response.json()["label"]
    batch_statuses = defaultdict(set)
    for response in responses:
        batch_statuses[response.headers["X-EPEE-Batch-Id"]].add(response.status_code == 200)
    assert any(statuses == {True, False} for statuses in batch_statuses.values())  # bad and good in one batch
    worker_after = management.describe(MODEL)[0]["workers"][0]
    assert (worker_after["pid"], worker_after["status"]) == (worker_before["pid"], "READY")


def test_exit_layer_and_saved_layer_metrics_reach_the_metrics_endpoint(server):
    before = wait_for_metric(server.metrics_url, "EpeeExitLayerRequests", MODEL, 0)
    saved_before = sum(wait_for_metric(server.metrics_url, "EpeeLayersSaved", MODEL, 0).values())
    responses = post_all(predict_url(server), [json_call(server, {"text": text}) for text in SENTENCES[:4]])
    exits = [response.json()["exit_layer"] for response in responses]
    after = wait_for_metric(server.metrics_url, "EpeeExitLayerRequests", MODEL, sum(before.values()) + 4)
    growth = {labels: value - before.get(labels, 0.0) for labels, value in after.items()}
    expected = defaultdict(float)
    for layer in exits:
        expected[(("ExitLayer", str(layer)), ("Level", "Model"), ("Policy", "epee"))] += 1
    assert {labels: value for labels, value in growth.items() if value} == dict(expected)
    saved = wait_for_metric(
        server.metrics_url, "EpeeLayersSaved", MODEL, saved_before + sum(4 - e for e in exits)
    )
    assert sum(saved.values()) - saved_before == sum(4 - layer for layer in exits)
    batch_sizes = wait_for_metric(server.metrics_url, "EpeeBatches", MODEL, 1)
    assert any(int(dict(labels)["BatchSize"]) > 1 for labels in batch_sizes)


# --- epee deploy against the live server -----------------------------------------------------------------------


def test_deploy_list_and_describe_show_the_registered_model(server, capsys):
    assert main(["deploy", "list", "--json", *management_flags(server)]) == 0
    assert {"modelName": MODEL, "modelUrl": f"{MODEL}.mar"} in json.loads(capsys.readouterr().out)["models"]
    assert main(["deploy", "describe", MODEL, "--json", *management_flags(server)]) == 0
    described = json.loads(capsys.readouterr().out)[0]
    assert (described["batchSize"], described["maxBatchDelay"], described["workers"][0]["status"]) == (
        4,
        1000,
        "READY",
    )


def test_deploy_second_version_register_scale_set_default_unregister(setup, server, capsys):
    package(setup["model_dir"], setup["config"], f"{MODEL}-v2", setup["store"], version="2.0")
    flags = management_flags(server)

    def versions() -> dict[str, int]:
        capsys.readouterr()
        assert main(["deploy", "describe", MODEL, "--version", "all", "--json", *flags]) == 0
        described = json.loads(capsys.readouterr().out)
        return {entry["modelVersion"]: len(entry["workers"]) for entry in described}

    assert main(["deploy", "register", "--mar", f"{MODEL}-v2.mar", "--name", MODEL, *flags]) == 0
    assert versions() == {"1.0": 1, "2.0": 1}  # workers from the model YAML's minWorkers
    assert main(["deploy", "scale", MODEL, "--version", "2.0", "--min-workers", "0", *flags]) == 0
    assert versions() == {"1.0": 1, "2.0": 0}
    assert main(["deploy", "set-default", MODEL, "2.0", *flags]) == 0
    capsys.readouterr()
    assert main(["deploy", "describe", MODEL, "--json", *flags]) == 0
    assert json.loads(capsys.readouterr().out)[0]["modelVersion"] == "2.0"
    assert main(["deploy", "set-default", MODEL, "1.0", *flags]) == 0
    assert main(["deploy", "unregister", MODEL, "--version", "2.0", *flags]) == 0
    assert versions() == {"1.0": 1}


def test_deploy_reports_an_unknown_model_in_one_line(server, capsys):
    assert main(["deploy", "describe", "no-such-model", *management_flags(server)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("epee: error:") and "no-such-model" in error and error.count("\n") == 1


def test_deploy_reports_a_wrong_token_in_one_line(server, capsys):
    assert main(["deploy", "list", "--management-url", server.management_url, "--token", "wrong"]) == 2
    assert "refused the management token" in capsys.readouterr().err


def test_deploy_reports_a_server_that_is_down_in_one_line(capsys):
    url = f"http://127.0.0.1:{free_ports(1)[0]}"
    assert main(["deploy", "list", "--management-url", url, "--token", "unused"]) == 2
    assert f"cannot reach TorchServe's management API at {url}" in capsys.readouterr().err


def test_inference_without_the_token_is_refused(server):
    response = requests.post(predict_url(server), json={"text": SENTENCES[0]}, timeout=30)
    assert response.status_code in (400, 401) and "Token Authorization failed" in response.text
