"""Open Inference Protocol v2 on a real TorchServe (the root config.properties on free ports), spoken by a client
nobody here wrote: `tritonclient.http`. Concurrent multi-row requests share dynamic batches and get the in-process
engine's answers row by row; hostile bodies mixed into the same batches get their own 4xx; and what the
`ts_open_inference_protocol` option changes (docs/oip.md).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from helpers import build_tiny_model

from epee_core.ops.management import ManagementClient
from epee_core.ops.torchserve import TorchServe

from .helpers import (
    HOSTILE,
    SENTENCES,
    derive_config,
    engine_answers,
    package_model,
    running_torchserve,
    wait_for_metric,
)

tritonclient_http = pytest.importorskip("tritonclient.http")

pytestmark = pytest.mark.integration

MODEL = "oip-text"
OUTPUTS = ("label", "probabilities", "exit_layer", "entropy", "margin", "policy")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    work = tmp_path_factory.mktemp("oip")
    model_dir, config, store = package_model(
        work, build_tiny_model(tokenizer), "tiny-text-model", "oip.yaml", MODEL, batch_size=8, max_batch_delay=200,
        task="text-classification", policy="epee", num_threads=1,
    )  # fmt: skip
    with running_torchserve(work, store) as server:
        client = ManagementClient(server.management_url, server.keys["management"], timeout=120)
        client.register(f"{MODEL}.mar", name=MODEL)
        yield {"server": server, "model_dir": model_dir, "config": config, "store": store, "work": work}


@pytest.fixture(scope="module")
def expected(setup):
    """The in-process engine's answer for every sentence under the served policy."""
    return engine_answers(setup["model_dir"], setup["config"], SENTENCES)


def triton(server: TorchServe):
    return tritonclient_http.InferenceServerClient(
        server.inference_url.removeprefix("http://"), network_timeout=60
    )


def text_input(texts: list[str], binary: bool = False):
    tensor = tritonclient_http.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array(texts, dtype=object), binary_data=binary)
    return tensor


def requested_outputs():
    return [tritonclient_http.InferRequestedOutput(name, binary_data=False) for name in OUTPUTS]


def check_result(result, texts: list[str], expected: dict) -> None:
    """A 3-row answer equal, row by row, to the in-process engine's answers."""
    labels = [label.decode() if isinstance(label, bytes) else label for label in result.as_numpy("label")]
    exit_layers = result.as_numpy("exit_layer")
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (len(texts), 3) and probabilities.dtype == np.float32
    assert list(result.as_numpy("policy")) in ([b"epee"] * len(texts), ["epee"] * len(texts))
    for row, text in enumerate(texts):
        assert labels[row] == expected[text]["label"]
        assert int(exit_layers[row]) == expected[text]["exit_layer"]
        assert probabilities[row] == pytest.approx(expected[text]["probs"], abs=1e-5)


def texts_for(client_number: int) -> list[str]:
    return [SENTENCES[(client_number + offset) % len(SENTENCES)] for offset in range(3)]


def batches_seen(server: TorchServe, expected_total: float) -> dict[int, float]:
    values = wait_for_metric(server.metrics_url, "EpeeBatches", MODEL, expected_total)
    return {int(dict(labels)["BatchSize"]): count for labels, count in values.items()}


def test_eight_concurrent_tritonclient_clients_get_the_engines_answers_row_by_row(server, expected):
    start = threading.Barrier(8)

    def one_client(number: int):
        client = triton(server)
        try:
            texts = texts_for(number)
            start.wait(timeout=30)  # all eight at once, so TorchServe batches them
            result = client.infer(MODEL, [text_input(texts)], outputs=requested_outputs(),
                                  request_id=f"client-{number}", headers=server.auth())  # fmt: skip
            return texts, result
        finally:
            client.close()

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one_client, range(8)))
    for number, (texts, result) in enumerate(results):
        response = result.get_response()
        assert response["model_name"] == MODEL and response["model_version"] == "1.0"
        assert response["id"] == f"client-{number}"
        assert [output["name"] for output in response["outputs"]] == list(OUTPUTS)
        check_result(result, texts, expected)
    sizes = batches_seen(server, 1)
    print(f"\n8 tritonclient clients x 3 rows: batches by size (requests per batch) {sizes}")
    assert max(sizes) > 1  # requests really shared engine calls


def test_without_named_outputs_tritonclient_still_gets_json(server, expected):
    """tritonclient then asks for binary outputs (`binary_data_output`): ignored, the answer is JSON, which it
    reads as well."""
    client = triton(server)
    try:
        result = client.infer(MODEL, [text_input(SENTENCES[:3])], headers=server.auth())
    finally:
        client.close()
    check_result(result, SENTENCES[:3], expected)


def test_hostile_bodies_in_concurrent_batches_get_their_own_4xx_and_good_ones_their_200(server, expected):
    url = f"{server.inference_url}/v2/models/{MODEL}/infer"
    plan = [("good", number) for number in range(8)] + [("bad", kind) for kind in HOSTILE for _ in range(2)]
    plan += [("triton-bad", "wrong datatype"), ("triton-bad", "n = 0"), ("triton-bad", "binary data")]
    np.random.default_rng(1).shuffle(plan)
    start = threading.Barrier(len(plan))

    def send(item):
        kind_type, what = item
        if kind_type == "bad":
            body = HOSTILE[what][0]
            start.wait(timeout=30)
            return requests.post(url, data=body, headers={**server.auth(), "Content-Type": "application/json"},
                                 timeout=60)  # fmt: skip
        client = triton(server)
        try:
            if kind_type == "good":
                texts = texts_for(what)
                start.wait(timeout=30)
                return texts, client.infer(MODEL, [text_input(texts)], outputs=requested_outputs(),
                                           headers=server.auth())  # fmt: skip
            if what == "wrong datatype":
                tensor = tritonclient_http.InferInput("text", [2], "FP32")
                tensor.set_data_from_numpy(np.array([1.0, 2.0], dtype=np.float32), binary_data=False)
            elif what == "n = 0":
                tensor = tritonclient_http.InferInput("text", [0], "BYTES")
                tensor.set_data_from_numpy(np.array([], dtype=object), binary_data=False)
            else:
                tensor = text_input(SENTENCES[:2], binary=True)  # tritonclient's default: binary tensor data
            start.wait(timeout=30)
            try:
                client.infer(MODEL, [tensor], headers=server.auth())
            except tritonclient_http.InferenceServerException as error:
                return error
            return None
        finally:
            client.close()

    with ThreadPoolExecutor(max_workers=len(plan)) as pool:
        outcomes = list(pool.map(send, plan))
    batch_sizes = set()
    for (kind_type, what), outcome in zip(plan, outcomes):
        if kind_type == "good":
            check_result(outcome[1], outcome[0], expected)
        elif kind_type == "bad":
            _, status, fragment = HOSTILE[what]
            assert outcome.status_code == status, (what, outcome.text)
            assert set(outcome.json()) == {"error"} and fragment in outcome.json()["error"], what
            if what != "not JSON":
                batch_sizes.add(int(outcome.headers["X-EPEE-Batch-Size"]))
        else:
            assert isinstance(outcome, tritonclient_http.InferenceServerException), (what, outcome)
            fragment = {"wrong datatype": "datatype must be BYTES", "n = 0": "no rows",
                        "binary data": "binary_data=False"}[what]  # fmt: skip
            assert outcome.status() == "400" and fragment in outcome.message(), (what, outcome.message())
    print(
        f"\nhostile OIP bodies among good ones: refused requests sat in batches of sizes {sorted(batch_sizes)}"
    )
    assert max(batch_sizes) > 1  # refusals shared batches with other requests


def test_plain_predictions_on_the_same_server_are_unchanged(server, expected):
    response = requests.post(f"{server.inference_url}/predictions/{MODEL}", json={"text": SENTENCES[0]},
                             headers=server.auth(), timeout=60)  # fmt: skip
    assert response.status_code == 200
    body = response.json()
    assert list(body) == ["label", "probabilities", "exit_layer", "num_layers", "entropy", "margin", "policy"]
    assert (body["label"], body["exit_layer"]) == (
        expected[SENTENCES[0]]["label"],
        expected[SENTENCES[0]]["exit_layer"],
    )


def test_what_torchserve_answers_on_the_other_v2_routes(server):
    """With our config (the OIP option off) only /v2/models/{name}/infer exists; versioned infer, metadata and
    health are 404, and an unknown model gets TorchServe's own 404 body (not `{"error"}`)."""
    base, auth = server.inference_url, server.auth()
    for path in (
        "/v2/health/ready",
        "/v2/health/live",
        "/v2",
        f"/v2/models/{MODEL}",
        f"/v2/models/{MODEL}/ready",
    ):
        assert requests.get(base + path, headers=auth, timeout=10).status_code == 404, path
    versioned = requests.post(f"{base}/v2/models/{MODEL}/versions/1.0/infer", json={"inputs": []}, headers=auth,
                              timeout=10)  # fmt: skip
    assert versioned.status_code == 404
    unknown = requests.post(f"{base}/v2/models/nope/infer", json={"inputs": []}, headers=auth, timeout=10)
    assert unknown.status_code == 404 and unknown.json()["type"] == "ModelNotFoundException"
    no_token = requests.post(f"{base}/v2/models/{MODEL}/infer", json={"inputs": []}, timeout=10)
    assert no_token.status_code == 400 and "InvalidKeyException" in no_token.text


def test_the_oip_option_adds_health_routes_that_say_ready_without_any_model(setup, server):
    """`ts_open_inference_protocol=true`: /v2/health/ready|live and /v2 answer (token required), ready while no
    model is registered at all; model metadata and model readiness stay 404, versioned infer becomes 501; infer
    is unchanged."""
    work = setup["work"]
    config = derive_config(work / "config-oip.properties", setup["store"])
    config.write_text(config.read_text() + "ts_open_inference_protocol=true\n")
    (work / "with-oip").mkdir()
    other = TorchServe(config, workdir=work / "with-oip")
    other.start()
    try:
        base, auth = other.inference_url, other.auth()
        assert requests.get(f"{base}/v2/health/ready", timeout=10).status_code == 400  # the token is needed
        assert requests.get(f"{base}/v2/health/ready", headers=auth, timeout=10).json() == {"ready": True}
        assert requests.get(f"{base}/v2/health/live", headers=auth, timeout=10).json() == {"live": True}
        assert requests.get(f"{base}/v2", headers=auth, timeout=10).json()["name"] == "Torchserve"
        ManagementClient(other.management_url, other.keys["management"], timeout=120).register(
            f"{MODEL}.mar", name=MODEL
        )
        assert requests.get(f"{base}/v2/models/{MODEL}", headers=auth, timeout=10).status_code == 404
        versioned = requests.post(f"{base}/v2/models/{MODEL}/versions/1.0/infer", json={"inputs": []},
                                  headers=auth, timeout=10)  # fmt: skip
        assert versioned.status_code == 501
        client = tritonclient_http.InferenceServerClient(base.removeprefix("http://"), network_timeout=60)
        try:
            assert client.is_server_ready(headers=auth) and client.is_server_live(headers=auth)
            assert not client.is_model_ready(MODEL, headers=auth)  # no such route in TorchServe 0.12
            result = client.infer(
                MODEL, [text_input(SENTENCES[:2])], outputs=requested_outputs(), headers=auth
            )
            assert list(result.as_numpy("exit_layer").shape) == [2]
        finally:
            client.close()
    finally:
        other.stop()
