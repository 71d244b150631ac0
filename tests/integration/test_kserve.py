"""`epee serve` (KServe's model server on the layer-level scheduler) as a user runs it: a real process on free ports,
spoken to by clients nobody here wrote (`tritonclient.http` and `tritonclient.grpc`). Readiness is false until the
model is loaded; REST and gRPC answers on the embedded demo texts equal `epee evaluate` and the engine alone, row
by row; the guarantee is in the metadata and on every answer; hostile bodies get their own 4xx beside good
requests; the exit-layer metrics count what was answered.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from helpers import DEMO_DATA, build_tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epee_core.data.text import read_examples
from epee_core.engine.model import EarlyExitModel
from epee_core.evaluation.evaluate import evaluate_policies
from epee_core.serving.config import ServeConfig

from .helpers import HOSTILE, ROOT, engine_answers, free_ports, write_model_yaml

tritonclient_http = pytest.importorskip("tritonclient.http")
tritonclient_grpc = pytest.importorskip("tritonclient.grpc")

pytestmark = pytest.mark.integration

MODEL = "kserve-text"
ROWS_PER_REQUEST = 8
DEMO_LABELS = {"adverse_event": "a", "no_adverse_event": "b"}  # the demo's labels as the tiny model's
GUARANTEE = {"epsilon": 0.05, "delta": 0.1, "bound": 0.04, "n": 400, "method": "test"}
GUARANTEE_TEXT = "accuracy-drop<=0.05; risk=0.1; bound=0.04; n=400; method=test"
# KServe's request model reads the body before the model sees it: a body that is not JSON gets a 422
NOT_JSON_STATUS = 422


def demo_rows(path) -> list[dict]:
    """The embedded ADE demo dev set, its labels renamed to the tiny model's."""
    rows = [json.loads(line) for line in (DEMO_DATA / "ade_demo_dev.jsonl").open(encoding="utf-8")]
    rows = [{"text": row["text"], "label": DEMO_LABELS[row["label"]]} for row in rows]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return rows


def poll_until_ready(url: str, process: subprocess.Popen, timeout: float = 120) -> list[tuple[int, int]]:
    """(liveness, readiness) statuses from the moment the process starts until readiness says 200 (0: nothing
    listens yet)."""

    def status(route: str) -> int:
        try:
            return requests.get(f"{url}{route}", timeout=5).status_code
        except requests.ConnectionError:
            return 0

    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        seen.append((status("/v2/health/live"), status("/v2/health/ready")))
        if seen[-1][1] == 200:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"epee serve never became ready (exit code {process.poll()}), statuses {seen[-5:]}")


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer):
    work = tmp_path_factory.mktemp("kserve")
    model_dir = work / "tiny-text-model"
    build_tiny_model(tokenizer).save_pretrained(model_dir)
    config = write_model_yaml(work / "serve.yaml", 1, 0, task="text-classification", policy="epee",
                              num_threads=1, guarantee=GUARANTEE)  # fmt: skip
    data = work / "demo.jsonl"
    rows = demo_rows(data)
    http_port, grpc_port = free_ports(2)
    command = [sys.executable, "-m", "epee_core.cli", "serve", "--model", str(model_dir), "--config", str(config),
               "--name", MODEL, "--version", "1.0", "--host", "127.0.0.1", "--http-port", str(http_port),
               "--grpc-port", str(grpc_port)]  # fmt: skip
    log = (work / "serve.log").open("w")
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=work)
    url = f"http://127.0.0.1:{http_port}"
    try:
        startup = poll_until_ready(url, process)
        yield {"url": url, "grpc": f"127.0.0.1:{grpc_port}", "startup": startup, "model_dir": model_dir,
               "config": config, "data": data, "rows": rows, "log": work / "serve.log"}  # fmt: skip
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture(scope="module")
def expected(served):
    """Per demo text: the engine's answer alone (label, exit layer, probabilities); and what `epee evaluate`
    computes for the served policy (its library call, `evaluate_policies`, with the per-row predictions kept)."""
    texts = [row["text"] for row in served["rows"]]
    model = EarlyExitModel.from_pretrained(served["model_dir"])
    policy = ServeConfig.load(served["config"]).policy
    examples = read_examples(served["data"], model.spec.task)
    (result,) = evaluate_policies(model, examples, [policy], keep_predictions=True)
    return {"alone": engine_answers(served["model_dir"], served["config"], texts), "evaluate": result,
            "evaluate_labels": [model.spec.labels[index] for index in result["predicted"]]}  # fmt: skip


def http_client(served):
    return tritonclient_http.InferenceServerClient(served["url"].removeprefix("http://"), network_timeout=60)


def grpc_client(served):
    return tritonclient_grpc.InferenceServerClient(served["grpc"])


def text_tensor(module, texts: list[str]):
    tensor = module.InferInput("text", [len(texts)], "BYTES")
    if module is tritonclient_http:
        tensor.set_data_from_numpy(np.array(texts, dtype=object), binary_data=False)
    else:
        tensor.set_data_from_numpy(np.array(texts, dtype=object))
    return tensor


def infer(served, protocol: str, texts: list[str], **options):
    """One tritonclient request of `texts` over REST or gRPC."""
    module = tritonclient_http if protocol == "rest" else tritonclient_grpc
    client = http_client(served) if protocol == "rest" else grpc_client(served)
    try:
        return client.infer(MODEL, [text_tensor(module, texts)], **options)
    finally:
        client.close()


def rows_of(result) -> list[dict]:
    labels = [label.decode() if isinstance(label, bytes) else label for label in result.as_numpy("label")]
    return [{"label": label, "exit_layer": int(layer), "probs": probs.tolist()}
            for label, layer, probs in zip(labels, result.as_numpy("exit_layer"),
                                           result.as_numpy("probabilities"))]  # fmt: skip


def test_readiness_is_false_until_the_model_is_loaded_while_liveness_answers(served):
    startup = served["startup"]
    assert (200, 503) in startup, startup[:10]  # live, not ready: the model was loading
    assert startup[-1] == (200, 200)
    assert startup.index((200, 503)) < len(startup) - 1
    assert requests.get(f"{served['url']}/v2/models/{MODEL}/ready", timeout=10).json()["ready"] is True


def test_rest_and_grpc_answers_equal_epee_evaluate_row_by_row(served, expected):
    """The 400 demo texts in 8-row requests, half over REST and half over gRPC, eight at a time."""
    texts = [row["text"] for row in served["rows"]]
    chunks = [texts[start : start + ROWS_PER_REQUEST] for start in range(0, len(texts), ROWS_PER_REQUEST)]
    protocols = ["rest" if number % 2 == 0 else "grpc" for number in range(len(chunks))]
    with ThreadPoolExecutor(max_workers=8) as pool:
        # every client reuses one request id: the answers still reach their own requests, and keep the id
        results = list(
            pool.map(lambda job: infer(served, *job, request_id="same-id"), zip(protocols, chunks))
        )
    for protocol, result in zip(protocols, results):
        response = result.get_response()
        assert (response["id"] if protocol == "rest" else response.id) == "same-id"
    answers = [row for result in results for row in rows_of(result)]
    assert len(answers) == len(texts)
    assert [answer["label"] for answer in answers] == expected["evaluate_labels"]
    for text, answer in zip(texts, answers):
        alone = expected["alone"][text]
        assert (answer["label"], answer["exit_layer"]) == (alone["label"], alone["exit_layer"]), text
        assert answer["probs"] == pytest.approx(alone["probs"], abs=1e-5)
    summary = expected["evaluate"]
    gold = [row["label"] for row in served["rows"]]
    accuracy = sum(answer["label"] == label for answer, label in zip(answers, gold)) / len(gold)
    average_exit = sum(answer["exit_layer"] for answer in answers) / len(answers)
    assert accuracy == pytest.approx(summary["accuracy"], abs=1e-4)
    assert average_exit == pytest.approx(summary["avg_exit_layer"], abs=1e-4)
    assert len({answer["exit_layer"] for answer in answers}) > 1  # the policy really exits early on some rows


def test_the_guarantee_is_in_the_metadata_and_on_every_answer(served):
    metadata = requests.get(f"{served['url']}/v2/models/{MODEL}", timeout=10).json()
    assert metadata["parameters"]["guarantee"] == GUARANTEE_TEXT
    assert [tensor["name"] for tensor in metadata["inputs"]] == ["text"]
    rest = requests.post(
        f"{served['url']}/v2/models/{MODEL}/infer",
        timeout=60,
        json={
            "inputs": [
                {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["Rash after penicillin."]}
            ]
        },
    )
    assert rest.status_code == 200 and rest.json()["parameters"]["guarantee"] == GUARANTEE_TEXT
    assert rest.headers["X-EPEE-Guarantee"] == GUARANTEE_TEXT
    grpc = infer(served, "grpc", ["Rash after penicillin."])
    assert grpc.get_response().parameters["guarantee"].string_param == GUARANTEE_TEXT


def test_a_policy_override_in_the_request_parameters_applies_to_that_request(served, expected):
    text = served["rows"][0]["text"]
    for protocol in ("rest", "grpc"):
        (row,) = rows_of(infer(served, protocol, [text], parameters={"policy": "full"}))
        assert row["exit_layer"] == 4  # every layer of the tiny model
    (row,) = rows_of(infer(served, "rest", [text]))
    assert row["exit_layer"] == expected["alone"][text]["exit_layer"]


def test_hostile_bodies_get_their_own_4xx_and_good_requests_beside_them_their_answers(served, expected):
    url = f"{served['url']}/v2/models/{MODEL}/infer"
    texts = [row["text"] for row in served["rows"][:24]]
    plan = [("good", number) for number in range(6)] + [("bad", kind) for kind in HOSTILE for _ in range(2)]
    plan += [("grpc-bad", "wrong datatype"), ("grpc-bad", "not UTF-8")]
    np.random.default_rng(1).shuffle(plan)
    start = threading.Barrier(len(plan))

    def send(item):
        kind, what = item
        if kind == "good":
            chunk = texts[what * 4 : what * 4 + 4]
            start.wait(timeout=30)
            return chunk, infer(served, "rest" if what % 2 else "grpc", chunk)
        if kind == "bad":
            start.wait(timeout=30)
            return requests.post(url, data=HOSTILE[what][0], headers={"Content-Type": "application/json"},
                                 timeout=60)  # fmt: skip
        tensor = tritonclient_grpc.InferInput("text", [1], "FP32" if what == "wrong datatype" else "BYTES")
        data = (
            np.array([1.0], dtype=np.float32) if what == "wrong datatype" else np.array([b"\xff\xfe"], object)
        )
        tensor.set_data_from_numpy(data)
        client = grpc_client(served)
        start.wait(timeout=30)
        try:
            client.infer(MODEL, [tensor])
        except tritonclient_grpc.InferenceServerException as error:
            return error
        finally:
            client.close()
        return None

    with ThreadPoolExecutor(max_workers=len(plan)) as pool:
        outcomes = list(pool.map(send, plan))
    for (kind, what), outcome in zip(plan, outcomes):
        if kind == "good":
            chunk, result = outcome
            assert [(row["label"], row["exit_layer"]) for row in rows_of(result)] == [
                (expected["alone"][text]["label"], expected["alone"][text]["exit_layer"]) for text in chunk
            ]
        elif kind == "bad":
            _, status, fragment = HOSTILE[what]
            if what == "not JSON":
                assert outcome.status_code == NOT_JSON_STATUS, outcome.text
                assert (
                    set(outcome.json()) == {"error"} and "not an inference request" in outcome.json()["error"]
                )
                continue
            assert outcome.status_code == status, (what, outcome.text)
            assert set(outcome.json()) == {"error"} and fragment in outcome.json()["error"], (
                what,
                outcome.text,
            )
        else:
            assert isinstance(outcome, tritonclient_grpc.InferenceServerException), (what, outcome)
            fragment = {"wrong datatype": "datatype must be BYTES", "not UTF-8": "not UTF-8"}[what]
            assert outcome.status() == "StatusCode.INVALID_ARGUMENT" and fragment in outcome.message()


# Open Inference Protocol bodies near the real thing, and anything else JSON holds (tests/test_request_fuzz.py's
# values and policy overrides).
def oip_bodies():
    from test_request_fuzz import json_values, overrides

    tensor = st.fixed_dictionaries(
        {"name": st.sampled_from(["text", "head", "image", ""]) | st.text(max_size=5),
         "datatype": st.sampled_from(["BYTES", "FP32", "INT64", "bytes"]) | json_values,
         "shape": st.lists(st.integers(-2, 70), max_size=3) | json_values,
         "data": st.lists(st.text(max_size=30) | json_values, max_size=5) | json_values},
        optional={"parameters": st.dictionaries(st.text(max_size=10), json_values, max_size=2)},
    )  # fmt: skip
    request = st.fixed_dictionaries(
        {"inputs": st.lists(tensor, max_size=2) | json_values},
        optional={"parameters": overrides | json_values, "id": json_values,
                  "outputs": st.lists(st.fixed_dictionaries({"name": st.text(max_size=10)}), max_size=2)},
    )  # fmt: skip
    return request | json_values


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=oip_bodies())
def test_any_body_gets_one_answer_a_200_or_its_own_4xx(served, body):
    data = json.dumps(body)  # NaN and infinities as Python writes them: not JSON, so a 4xx too
    response = requests.post(f"{served['url']}/v2/models/{MODEL}/infer", data=data, timeout=60,
                             headers={"Content-Type": "application/json"})  # fmt: skip
    assert 200 <= response.status_code < 500, (body, response.text)
    if response.status_code == 200:
        assert {output["name"] for output in response.json()["outputs"]} <= {
            "label",
            "probabilities",
            "exit_layer",
            "entropy",
            "policy",
        }
    else:  # 422: KServe's request model refused the body before the model saw it; others: ours
        assert set(response.json()) == {"error"}, response.text


METRIC_NAMES = ("EpeeExitLayerRequests_total", "EpeeLayersRun_total", "EpeeLayersSaved_total")


def scrape(url: str) -> dict[str, float]:
    """Each EPEE counter of this model, summed over its labels."""
    totals = dict.fromkeys(METRIC_NAMES, 0.0)
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        name = line.split("{", 1)[0]
        if name in totals and f'ModelName="{MODEL}"' in line:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


def test_the_exit_layer_metrics_count_every_row_answered(served, expected):
    texts = [row["text"] for row in served["rows"][:12]]
    before = scrape(served["url"])
    infer(served, "rest", texts[:6])
    infer(served, "grpc", texts[6:])
    after = scrape(served["url"])
    layers = [expected["alone"][text]["exit_layer"] for text in texts]
    assert after["EpeeExitLayerRequests_total"] - before["EpeeExitLayerRequests_total"] == len(texts)
    assert after["EpeeLayersRun_total"] - before["EpeeLayersRun_total"] == sum(layers)
    assert after["EpeeLayersSaved_total"] - before["EpeeLayersSaved_total"] == sum(
        4 - layer for layer in layers
    )


@pytest.mark.parametrize(
    "data",
    ["Infinity", "NaN", '{"inputs": -Infinity}', '{"inputs": [], "id": NaN}',
     '{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [NaN]}]}',
     '{"inputs": [{"name": "text", "shape": [1], "datatype": "FP32", "data": [Infinity]}]}'],
)  # fmt: skip
def test_a_body_with_nan_or_infinity_is_not_json_and_gets_a_4xx(served, data):
    """Python's json writes NaN and Infinity, which JSON forbids: the reply is a 4xx JSON error, never a 500."""
    response = requests.post(f"{served['url']}/v2/models/{MODEL}/infer", data=data, timeout=60,
                             headers={"Content-Type": "application/json"})  # fmt: skip
    assert 400 <= response.status_code < 500, response.text
    assert set(response.json()) == {"error"}, response.text
