"""The scheduler thread of `epee serve` (kserve_server/scheduler_loop.py), without a server: requests submitted
from many threads at once are answered as if alone, a refusal at once, each answer reported once."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import build_tiny_model

from epee_core.serving.config import ServeConfig
from epee_core.serving.continuous import ContinuousBatcher
from epee_core.serving.service import TextService
from kserve_server.scheduler_loop import SchedulerLoop

TEXTS = ["Rash after penicillin.", "The patient recovered.", "Severe hepatitis under isoniazid and rifampicin.",
         "Report of two cases.", "Thrombocytosis under ciprofloxacin.", "Hypercoagulability studies were negative."]  # fmt: skip


def oip_row(texts: list[str]) -> dict:
    return {"body": {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}}


@pytest.fixture
def service(tokenizer) -> TextService:
    return TextService(build_tiny_model(tokenizer), ServeConfig.from_section({}))


@pytest.fixture
def loop(service):
    reported: list[str] = []
    loop = SchedulerLoop(lambda: ContinuousBatcher(service, service.config.scheduler_limits),
                         lambda request_id, *_: reported.append(request_id))  # fmt: skip
    loop.reported = reported
    yield loop
    loop.stop()


def outputs(body: dict) -> dict:
    return {tensor["name"]: tensor["data"] for tensor in body["outputs"]}


def test_requests_from_many_threads_get_the_answers_they_get_alone(service, loop):
    requests = {f"r{number}": oip_row(TEXTS[number:] + TEXTS[:number][: number % 3]) for number in range(6)}
    start = threading.Barrier(len(requests))

    def send(item):
        request_id, row = item
        start.wait(timeout=30)
        return loop.submit(request_id, row, {}).result(timeout=60)

    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        answers = dict(zip(requests, pool.map(send, requests.items())))
    for request_id, row in requests.items():
        (alone,) = service.answer([row], [{}], [request_id])
        assert answers[request_id].status == 200
        served, expected = outputs(answers[request_id].body), outputs(alone.body)
        for name in ("label", "exit_layer", "policy"):
            assert served[name] == expected[name], name
        for name in ("entropy", "probabilities"):  # float noise: the padding differs from the request alone
            assert served[name] == pytest.approx(expected[name], abs=1e-5), name
    assert sorted(loop.reported) == sorted(requests)
    assert loop.steps > 1  # the answers came from layer steps, not one call


def test_a_refused_request_is_answered_at_once_beside_running_ones(loop):
    good = loop.submit("good", oip_row(TEXTS), {})
    bad = loop.submit("bad", oip_row([""]), {})
    assert bad.result(timeout=60).status == 400 and "row 0" in bad.result().body["error"]
    assert good.result(timeout=60).status == 200
    assert sorted(loop.reported) == ["bad", "good"]


def test_stop_ends_the_thread(loop):
    loop.stop()
    assert not loop.thread.is_alive()
