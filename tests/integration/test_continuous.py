"""A real TorchServe serving an archive packaged with `--scheduler continuous`: TorchServe's continuous batching
drives the layer-level scheduler, one handler call per step, with the layers in ONNX Runtime (the graphs
`epee package` put in the archive).

Checked: concurrent plain JSON and Open Inference Protocol requests (requests, tritonclient, a client reading the
chunked body) get the in-process engine's answer alone; hostile requests in the same burst get their own 4xx
before any chunk; a worker killed mid-step loses no request: each is answered or fails with an error, none hangs.
"""

from __future__ import annotations

import json
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import pytest
import requests
import yaml
from helpers import build_tiny_model

from epee_core.cli import main
from epee_core.ops.management import ManagementClient

from .helpers import SENTENCES, engine_answers, post_all, running_torchserve, write_model_yaml

tritonclient_http = pytest.importorskip("tritonclient.http")

pytestmark = pytest.mark.integration

MODEL = "continuous-text"
HOSTILE = [
    ({"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
    ({"json": {"text": ""}}, 400, "'text' is empty"),
    ({"json": {"text": "x" * 2000}}, 413, "max_text_chars"),
    ({"json": {"txt": "wrong field"}}, 400, "unknown field 'txt'"),
    ({"json": {"text": "ok", "epee": {"policy": "oracle"}}}, 400, "oracle"),
    ({"json": {"inputs": [{"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}]}}, 400, "BYTES"),
    ({"data": "a" * 5000, "headers": {"Content-Type": "text/plain"}}, 413, "max_body_bytes"),
    (
        {"json": {"text": "ok", "epee": {"policy": "entropy", "entropy_threshold": 7}}},
        400,
        "entropy_threshold",
    ),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    """Tiny model → YAML → `epee package --scheduler continuous` → TorchServe → register. Two torch threads, so the
    worker runs cohorts side by side on two cohort threads (their default: the worker's threads)."""
    work = tmp_path_factory.mktemp("continuous")
    model_dir = work / "model"
    build_tiny_model(tokenizer, num_layers=6).save_pretrained(model_dir)
    config = write_model_yaml(work / "model.yaml", batch_size=8, max_batch_delay=50, task="text-classification",
                              policy="entropy", entropy_threshold=0.3, max_text_chars=1000,
                              max_body_bytes=3000, num_threads=2, runtime="onnxruntime")  # fmt: skip
    store = work / "model_store"
    assert main(["package", "--model", str(model_dir), "--config", str(config), "--name", MODEL,
                 "--export-path", str(store), "--scheduler", "continuous"]) == 0  # fmt: skip
    with running_torchserve(work, store) as server:
        client = ManagementClient(server.management_url, server.keys["management"], timeout=120)
        client.register(f"{MODEL}.mar", name=MODEL)
        yield {"server": server, "client": client, "model_dir": model_dir, "config": config}


@pytest.fixture(scope="module")
def expected(setup):
    return engine_answers(setup["model_dir"], setup["config"], SENTENCES)


def predict_url(setup) -> str:
    return f"{setup['server'].inference_url}/predictions/{MODEL}"


def auth(setup) -> dict:
    return setup["server"].auth()


def test_the_archive_turns_on_torchserves_continuous_batching(setup):
    described = setup["client"].describe(MODEL)[0]
    assert described["continuousBatching"] is True
    assert described["batchSize"] == 64 and described["maxBatchDelay"] == 1
    log = (setup["server"].log_dir / "model_log.log").read_text()
    assert (
        "2 torch threads, scheduler continuous (2 cohort threads)" in log
    )  # the default: the worker's threads
    assert "runtime onnxruntime" in log and "layer graphs read from" in log  # the archive's, not exported


def test_sentences_exit_at_several_layers_so_requests_really_stream(expected):
    assert len({answer["exit_layer"] for answer in expected.values()}) > 1


def test_concurrent_requests_get_their_answer_alone(setup, expected):
    calls = [{"json": {"text": text}, "headers": auth(setup)} for text in SENTENCES * 4]
    for call, response in zip(calls, post_all(predict_url(setup), calls)):
        text = call["json"]["text"]
        assert response.status_code == 200, response.text
        assert response.headers["X-EPEE-Scheduler"] == "continuous"
        body = response.json()
        assert (body["label"], body["exit_layer"]) == (expected[text]["label"], expected[text]["exit_layer"])
        assert list(body["probabilities"].values()) == pytest.approx(expected[text]["probs"], abs=1e-5)


def test_a_request_that_runs_past_its_first_step_arrives_as_a_chunked_body(setup, expected):
    """Read the way a streaming client reads: chunk by chunk; the chunks join into one JSON answer."""
    deep = max(SENTENCES, key=lambda text: expected[text]["exit_layer"])
    assert expected[deep]["exit_layer"] > 1
    with requests.post(
        predict_url(setup), json={"text": deep}, headers=auth(setup), stream=True, timeout=60
    ) as r:
        assert r.status_code == 200
        assert r.headers.get("Transfer-Encoding") == "chunked"
        chunks = [chunk for chunk in r.iter_content(chunk_size=None) if chunk]
    assert json.loads(b"".join(chunks))["exit_layer"] == expected[deep]["exit_layer"]


def test_open_inference_protocol_requests_from_tritonclient(setup, expected):
    server = setup["server"]
    client = tritonclient_http.InferenceServerClient(server.inference_url.removeprefix("http://"),
                                                     network_timeout=60)  # fmt: skip
    texts = SENTENCES[:3]
    tensor = tritonclient_http.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array(texts, dtype=object), binary_data=False)
    outputs = [
        tritonclient_http.InferRequestedOutput(name, binary_data=False) for name in ("label", "exit_layer")
    ]
    result = client.infer(MODEL, [tensor], outputs=outputs, headers=server.auth())
    labels = [label.decode() if isinstance(label, bytes) else label for label in result.as_numpy("label")]
    assert labels == [expected[text]["label"] for text in texts]
    assert result.as_numpy("exit_layer").tolist() == [expected[text]["exit_layer"] for text in texts]


def test_hostile_requests_get_their_own_4xx_while_good_ones_stream_beside_them(setup, expected):
    """64 concurrent requests, one in eight hostile: each hostile one gets its own 4xx before any chunk, every good
    one the answer it gets alone."""
    texts = SENTENCES * 7
    good = [{"json": {"text": text}, "headers": auth(setup)} for text in texts]
    hostile = [{**call, "headers": {**auth(setup), **call.get("headers", {})}} for call, _, _ in HOSTILE]
    calls = [*good]
    for number, call in enumerate(hostile):
        calls.insert(number * 8 + 3, call)
    responses = post_all(predict_url(setup), calls)
    hostile_seen = 0
    good_answers = iter(texts)
    for call, response in zip(calls, responses):
        if call in hostile:
            _, status, fragment = HOSTILE[hostile.index(call)]
            assert response.status_code == status, (fragment, response.text)
            assert "Transfer-Encoding" not in response.headers  # refused before any chunk
            assert fragment in response.json()["error"]
            hostile_seen += 1
        else:
            text = next(good_answers)
            assert response.status_code == 200, response.text
            body = response.json()
            assert (body["label"], body["exit_layer"]) == (
                expected[text]["label"],
                expected[text]["exit_layer"],
            )
    assert (len(calls), hostile_seen) == (64, 8)


def test_a_worker_killed_mid_step_loses_no_request(setup, expected):
    """16 clients keep requests in flight (policy `full`: each streams through all six layers); the worker is
    killed. Every request is answered correctly or fails with an error the client sees (a status, or a broken
    connection), none waits out its timeout, and the new worker serves again."""
    client, url = setup["client"], predict_url(setup)
    old_pid = client.describe(MODEL)[0]["workers"][0]["pid"]
    stop, outcomes, lock = threading.Event(), [], threading.Lock()

    def send(number: int) -> None:
        text = SENTENCES[number % len(SENTENCES)]
        while not stop.is_set():
            started = time.monotonic()
            try:
                body = {"text": text, "epee": {"policy": "full"}}
                response = requests.post(url, json=body, headers=auth(setup), timeout=30)
                outcome = (response.status_code, response.json() if response.status_code == 200 else None)
            except requests.RequestException as error:
                outcome = ("error", type(error).__name__)
            with lock:
                outcomes.append((text, outcome, time.monotonic() - started))

    with ThreadPoolExecutor(max_workers=16) as pool:
        for number in range(16):
            pool.submit(send, number)
        time.sleep(2)
        psutil.Process(old_pid).kill()
        deadline = time.monotonic() + 60
        while True:
            workers = client.describe(MODEL)[0]["workers"]
            if workers and workers[0]["pid"] != old_pid and workers[0]["status"] == "READY":
                break
            assert time.monotonic() < deadline, f"no new worker: {workers}"
            time.sleep(0.5)
        time.sleep(2)
        stop.set()
    failed = [outcome for _, outcome, _ in outcomes if outcome[0] != 200]
    assert failed, "the kill should have failed the requests in flight"
    assert max(seconds for _, _, seconds in outcomes) < 25, "a request waited out its timeout: lost"
    for _, (status, body), _ in outcomes:
        if status == 200:
            assert (body["exit_layer"], body["policy"]) == (6, "full")
        else:
            assert status == "error" or status >= 500
    print(
        f"\nworker kill: {len(outcomes)} requests, {len(failed)} failed: {sorted({o[0] for o in failed}, key=str)}"
    )
    answered_after = [1 for _, outcome, _ in outcomes[-16:] if outcome[0] == 200]
    assert answered_after, "the new worker did not serve"


def test_packaging_back_to_batch_turns_continuous_batching_off(setup, tmp_path):
    config = yaml.safe_load(setup["config"].read_text())
    config["continuousBatching"] = True
    path = tmp_path / "continuous.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["package", "--model", str(setup["model_dir"]), "--config", str(path), "--name", "back",
                 "--export-path", str(tmp_path), "--scheduler", "batch", "--json"]) == 0  # fmt: skip
    with zipfile.ZipFile(tmp_path / "back.mar") as archive:
        archived = yaml.safe_load(archive.read(path.name))
    assert "continuousBatching" not in archived and archived["batchSize"] == 8
