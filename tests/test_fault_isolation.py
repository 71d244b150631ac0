"""Fault isolation in the serving path: a request that cannot be served, or whose engine call raises, fails alone;
its batch-mates get the answers they would get alone."""

from __future__ import annotations

import pytest
from helpers import build_tiny_model

from epee_core.engine.policies import PolicyError, make_policy
from epee_core.serving.config import ServeConfig
from epee_core.serving.service import TextService, failure_answer

GOOD = [
    "Pericardial hemorrhage due to acetylsalicylic acid.",
    "Thrombocytosis under ciprofloxacin.",
    "Hypercoagulability studies were negative.",
    "Report of two cases.",
    "Acute renal failure after ibuprofen.",
    "No adverse event was observed.",
    "Rash after penicillin.",
]
JSON = {"body": {"content-type": "application/json"}}
# Bodies that Python parses as valid JSON but that no request may pass on to the engine.
HOSTILE = {
    "lone surrogate text": {"text": "\ud800 rash"},
    "lone surrogate alone": {"text": "\udfff"},
    "patience 1e308": {"text": "Rash.", "epee": {"policy": "epee", "patience": 1e308}},
    "patience as a huge integer": {"text": "Rash.", "epee": {"policy": "patience", "patience": 10**400}},
    "patience as a float": {"text": "Rash.", "epee": {"policy": "patience", "patience": 2.0}},
    "min_layer 1e308": {"text": "Rash.", "epee": {"min_layer": 1e308}},
    "static layer beyond int64": {"text": "Rash.", "epee": {"policy": "static", "layer": 2**70}},
    "threshold infinity": {
        "text": "Rash.",
        "epee": {"policy": "fpabee", "similarity_threshold": float("inf")},
    },
}


@pytest.fixture(scope="module")
def svc(tokenizer) -> TextService:
    return TextService(build_tiny_model(tokenizer), ServeConfig.from_section({}))


def assert_answers_equal(bodies: list[dict], expected: list[dict]) -> None:
    """Same labels, exit layers and policies; probabilities and entropy equal up to float noise (a batched
    matmul may round the sixth decimal differently from a row alone)."""
    assert len(bodies) == len(expected)
    for body, reference in zip(bodies, expected):
        body, reference = dict(body), dict(reference)
        assert body.pop("probabilities") == pytest.approx(reference.pop("probabilities"), abs=2e-6)
        assert body == pytest.approx(reference, abs=2e-6)


def alone(svc: TextService, body) -> dict:
    return svc.answer([{"body": body}], [JSON])[0].body


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_request_gets_its_own_400_and_batch_mates_their_answers(svc, kind):
    rows = [{"body": {"text": text}} for text in GOOD[:3]]
    rows += [{"body": HOSTILE[kind]}] + [{"body": {"text": text}} for text in GOOD[3:]]
    answers = svc.answer(rows, [JSON] * len(rows))
    assert answers[3].status == 400 and set(answers[3].body) == {"error"}
    good = [answer for index, answer in enumerate(answers) if index != 3]
    assert_answers_equal([answer.body for answer in good], [alone(svc, {"text": text}) for text in GOOD])


def test_integer_parameters_take_integers_only():
    assert make_policy("patience", {"patience": "3"}).params["patience"] == 3  # a `--set` string
    for value in (2.0, 1e308, 10**400, float("nan"), True):
        with pytest.raises(PolicyError, match="'patience' must be an integer"):
            make_policy("patience", {"patience": value})


def test_number_parameters_must_be_finite():
    for value in (float("inf"), float("nan"), "inf"):
        with pytest.raises(PolicyError, match="finite"):
            make_policy("fpabee", {"similarity_threshold": value})


def test_engine_failure_is_isolated_to_the_request_that_causes_it(svc, monkeypatch):
    """A fault no validation foresaw: the engine call raises whenever a poisoned text is in it."""
    encode = svc.encode_inputs

    def poisoned(model_inputs):
        if any("POISON" in text for text in model_inputs):
            raise TypeError("TextEncodeInput must be Union[...]")
        return encode(model_inputs)

    expected = [alone(svc, {"text": text}) for text in GOOD]
    monkeypatch.setattr(svc, "encode_inputs", poisoned)
    rows = [{"body": {"text": text}} for text in GOOD]
    rows.insert(5, {"body": {"text": "POISON pill"}})
    answers = svc.answer(rows, [JSON] * len(rows))
    culprit = answers.pop(5)
    assert culprit.status == 400 and culprit.failure == "TypeError"
    assert "POISON" not in culprit.body["error"] and "TextEncodeInput" not in culprit.body["error"]
    assert_answers_equal([answer.body for answer in answers], expected)


def test_a_fault_of_the_server_is_a_500_for_that_request_only(svc, monkeypatch):
    decode = svc.decode

    def flaky(payload, headers):
        if payload.get("text") == "boom":
            raise RuntimeError("worker state broken")
        return decode(payload, headers)

    monkeypatch.setattr(svc, "decode", flaky)
    rows = [{"body": {"text": "boom"}}, {"body": {"text": GOOD[0]}}]
    first, second = svc.answer(rows, [JSON, JSON])
    assert first.status == 500 and first.failure == "RuntimeError" and "broken" not in first.body["error"]
    assert second.status == 200


def test_failure_answer_blames_the_input_only_for_input_faults():
    assert failure_answer(UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogate")).status == 400
    assert failure_answer(OverflowError("int too big to convert")).status == 400
    assert failure_answer(MemoryError()).status == 500
