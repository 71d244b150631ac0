"""Request decoding and batch answering of epee_core.serving, without a server (docs/design.md, "HTTP contract")."""

from __future__ import annotations

import pytest
from helpers import build_tiny_model

import epee_core.serving.service as serving
from epee_core.engine.inputs import encode_texts
from epee_core.engine.runner import run_bucketed, run_early_exit
from epee_core.engine.spec import ConfigError
from epee_core.serving.config import ServeConfig
from epee_core.serving.service import RequestError, TextService, request_payload

TEXTS = [
    "Pericardial hemorrhage due to acetylsalicylic acid.",
    "Thrombocytosis under ciprofloxacin.",
    "Hypercoagulability studies were negative.",
    "Report of two cases.",
]
JSON = {"body": {"content-type": "application/json"}}
PLAIN = {"body": {"content-type": "text/plain"}}
RESPONSE_KEYS = {"label", "probabilities", "exit_layer", "num_layers", "entropy", "margin", "policy"}


@pytest.fixture(scope="module")
def models(tokenizer):
    return {
        task: build_tiny_model(tokenizer, task=task)
        for task in ("text-classification", "relation-extraction")
    }


def service(models, model_task="text-classification", **section) -> TextService:
    return TextService(models[model_task], ServeConfig.from_section(section))


def decode_error(svc: TextService, body, headers=JSON) -> RequestError:
    with pytest.raises(RequestError) as caught:
        svc.decode(request_payload({"body": body}, headers, svc.config.max_body_bytes), headers)
    return caught.value


# --- reading the TorchServe row --------------------------------------------------------------------------------


def test_form_encoded_request_is_400_with_a_hint():
    with pytest.raises(RequestError) as caught:
        request_payload({}, {}, 1000)
    assert caught.value.status == 400 and "form-encoded" in caught.value.message


def test_body_over_max_body_bytes_is_413():
    with pytest.raises(RequestError) as caught:
        request_payload({"body": b"x" * 101}, PLAIN, 100)
    assert caught.value.status == 413 and "max_body_bytes" in caught.value.message


def test_json_body_counts_towards_max_body_bytes():
    with pytest.raises(RequestError) as caught:
        request_payload({"body": {"text": "y" * 200}}, JSON, 100)
    assert caught.value.status == 413


def test_unparsable_json_body_is_400():
    with pytest.raises(RequestError) as caught:
        request_payload({"body": b'{"text": "broken'}, JSON, 1000)
    assert caught.value.status == 400 and "not valid JSON" in caught.value.message


def test_kserve_style_data_field_is_read():
    assert request_payload({"data": {"text": "x"}}, {}, 1000) == {"text": "x"}


# --- decoding a text request -----------------------------------------------------------------------------------


def test_plain_text_and_utf8_bytes_are_the_text(models):
    svc = service(models)
    assert svc.decode("Rash after penicillin.", PLAIN).model_input == "Rash after penicillin."
    assert svc.decode("Fièvre après vaccin.".encode(), {}).model_input == "Fièvre après vaccin."


def test_json_sent_as_text_plain_is_parsed(models):
    assert service(models).decode('{"text": "Rash."}', PLAIN).model_input == "Rash."


def test_non_utf8_bytes_are_400(models):
    error = decode_error(service(models), b"\xff\xfe rash", PLAIN)
    assert error.status == 400 and "UTF-8" in error.message


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (["a list"], "got JSON list"),
        ({"txt": "typo"}, "unknown field 'txt'"),
        ({"epee": {"policy": "full"}}, "missing field 'text'"),
        ({"text": 42}, "'text' must be a string"),
        ({"text": "   "}, "'text' is empty"),
        ({"text": "x", "head": "x"}, "unknown field 'head'"),
    ],
)
def test_malformed_json_is_400_naming_the_field(models, body, fragment):
    error = decode_error(service(models), body)
    assert error.status == 400 and fragment in error.message


def test_text_over_max_text_chars_is_413(models):
    error = decode_error(service(models, max_text_chars=10), {"text": "eleven chars"})
    assert error.status == 413 and "max_text_chars" in error.message


def test_relation_extraction_marks_head_and_tail(models):
    svc = service(models, "relation-extraction")
    request = svc.decode({"text": "Aspirin caused bleeding.", "head": "Aspirin", "tail": "bleeding"}, JSON)
    assert request.model_input == "[E1] Aspirin [/E1] caused [E2] bleeding [/E2]."


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"text": "Aspirin caused bleeding.", "tail": "bleeding"}, "missing field 'head'"),
        ({"text": "Aspirin caused bleeding.", "head": "Aspirin"}, "missing field 'tail'"),
        ({"text": "Aspirin caused bleeding.", "head": "ibuprofen", "tail": "bleeding"}, "does not occur"),
        ("Aspirin caused bleeding.", "missing field 'head'"),
    ],
)
def test_relation_extraction_without_entities_is_400(models, body, fragment):
    error = decode_error(service(models, "relation-extraction"), body)
    assert error.status == 400 and fragment in error.message


# --- per-request policy override -------------------------------------------------------------------------------


def test_json_override_selects_the_policy_with_configured_parameters(models):
    svc = service(models, policy="epee", entropy_threshold=0.3, patience=3)
    assert svc.decode({"text": "x", "epee": {"policy": "patience"}}, JSON).policy.params["patience"] == 3
    assert svc.decode({"text": "x"}, JSON).policy.name == "epee"


def test_header_override_is_case_insensitive(models):
    request = service(models).decode({"text": "x"}, {**JSON, "x-epee-policy": "full"})
    assert request.policy.name == "full"


def test_json_override_wins_over_the_header(models):
    request = service(models).decode(
        {"text": "x", "epee": {"policy": "full"}}, {**JSON, "X-EPEE-Policy": "entropy"}
    )
    assert request.policy.name == "full"


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ({"policy": "fastest"}, "unknown policy"),
        ({"policy": "oracle"}, "cannot be served"),
        ({"policy": "static", "layer": 9}, "model has 4 layers"),
        ({"policy": "entropy", "entropy_threshold": 2}, "entropy_threshold"),
        ("full", "must be a JSON object"),
    ],
)
def test_bad_override_is_400(models, override, fragment):
    error = decode_error(service(models), {"text": "x", "epee": override})
    assert error.status == 400 and fragment in error.message


def test_override_when_disabled_is_403(models):
    error = decode_error(
        service(models, allow_request_override=False), {"text": "x", "epee": {"policy": "full"}}
    )
    assert error.status == 403 and "allow_request_override" in error.message


# --- answering a batch -----------------------------------------------------------------------------------------


def test_batch_answers_match_the_engine_per_request_and_keep_order(models):
    svc = service(models)
    rows = [{"body": {"text": text}} for text in TEXTS]
    answers = svc.answer(rows, [JSON] * len(rows))
    model = models["text-classification"]
    for text, answer in zip(TEXTS, answers):
        alone = run_early_exit(model, encode_texts(model.tokenizer, [text], 64), svc.config.policy)
        assert answer.status == 200 and set(answer.body) == RESPONSE_KEYS
        assert answer.body["exit_layer"] == int(alone.exit_layer[0])
        assert answer.body["label"] == model.spec.labels[int(alone.probs[0].argmax())]
        assert answer.body["num_layers"] == 4 and answer.body["policy"] == "epee"
        assert sum(answer.body["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        top, second = sorted(answer.body["probabilities"].values(), reverse=True)[:2]
        assert answer.body["margin"] == pytest.approx(top - second, abs=1e-5)


def test_bad_rows_get_their_own_error_and_batch_mates_are_answered(models):
    rows = [{"body": {"text": TEXTS[0]}}, {"body": b"\xff"}, {}, {"body": {"text": TEXTS[1]}}]
    answers = service(models).answer(rows, [JSON, PLAIN, {}, JSON])
    assert [answer.status for answer in answers] == [200, 400, 400, 200]
    assert set(answers[1].body) == {"error"} and answers[1].exit_layer is None
    assert answers[3].body["exit_layer"] == answers[3].exit_layer


def test_a_batch_runs_one_engine_call_per_distinct_policy(models, monkeypatch):
    calls = []

    def counting_run(model, inputs, policy, labels=None):
        calls.append((policy.name, int(inputs["input_ids"].shape[0])))
        return run_bucketed(model, inputs, policy, labels)

    monkeypatch.setattr(serving, "run_bucketed", counting_run)
    rows = [{"body": {"text": text}} for text in TEXTS]
    headers = [JSON, {**JSON, "X-EPEE-Policy": "full"}, JSON, {**JSON, "X-EPEE-Policy": "full"}]
    answers = service(models).answer(rows, headers)
    assert sorted(calls) == [("epee", 2), ("full", 2)]
    assert [answer.body["policy"] for answer in answers] == ["epee", "full", "epee", "full"]
    assert answers[1].body["exit_layer"] == answers[3].body["exit_layer"] == 4


def test_multi_label_answers_carry_a_label_list(tokenizer):
    model = build_tiny_model(tokenizer, task="multi-label")
    answer = TextService(model, ServeConfig.from_section({})).answer([{"body": "Rash."}], [PLAIN])[0]
    assert "label" not in answer.body and isinstance(answer.body["labels"], list)
    assert set(answer.body["labels"]) == {
        label for label, p in answer.body["probabilities"].items() if p >= 0.5
    }
    least_certain = min(abs(2 * p - 1) for p in answer.body["probabilities"].values())
    assert answer.body["margin"] == pytest.approx(least_certain, abs=1e-5)


def test_service_refuses_a_config_for_another_task(models):
    with pytest.raises(ConfigError, match="task 'multi-label'"):
        service(models, task="multi-label")


def test_service_refuses_a_static_layer_beyond_the_model(models):
    with pytest.raises(ConfigError, match="'layer' is 7"):
        service(models, policy="static", layer=7)
