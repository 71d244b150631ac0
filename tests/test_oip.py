"""Open Inference Protocol requests in the serving path, without a server (docs/oip.md): the codec's checks, every
row of every request in one engine call per policy, answers equal to the engine's per row, and a bad request or
row failing alone."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from helpers import build_tiny_model
from PIL import Image

import epee_core.serving.service as serving
from epee_core.engine.inputs import encode_images, encode_texts
from epee_core.engine.runner import run_bucketed, run_early_exit
from epee_core.engine.spec import ConfigError
from epee_core.serving import oip
from epee_core.serving.config import ServeConfig
from epee_core.serving.images import ImageService
from epee_core.serving.request_log import request_line
from epee_core.serving.service import TextService

TEXTS = [
    "Pericardial hemorrhage due to acetylsalicylic acid.",
    "Thrombocytosis under ciprofloxacin.",
    "Hypercoagulability studies were negative.",
    "Report of two cases.",
    "Severe rash after amoxicillin.",
]
JSON = {"body": {"content-type": "application/json"}}
NO_TYPE = {"body": {"content-type": ""}}  # what tritonclient sends: TorchServe passes the bytes on
OUTPUTS = ["label", "probabilities", "exit_layer", "entropy", "margin", "policy"]
PLAIN_FIELDS = ["label", "probabilities", "exit_layer", "num_layers", "entropy", "margin", "policy"]


def tensor(name: str, data, shape=None, datatype: str = "BYTES") -> dict:
    return {"name": name, "datatype": datatype, "shape": shape or [len(data)], "data": data}


def infer(texts, **extra) -> dict:
    return {"inputs": [tensor("text", list(texts))], **extra}


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_tiny_model(tokenizer)


@pytest.fixture(scope="module")
def svc(model) -> TextService:
    return TextService(model, ServeConfig.from_section({}), model_name="ade", model_version="2.0")


def engine(model, text: str, policy) -> dict:
    result = run_early_exit(model, encode_texts(model.tokenizer, [text], 64), policy)
    return {
        "label": model.spec.labels[int(result.probs[0].argmax())],
        "exit_layer": int(result.exit_layer[0]),
        "probs": result.probs[0].tolist(),
    }


def outputs(body: dict) -> dict:
    return {output["name"]: output for output in body["outputs"]}


def check_rows(model, body: dict, texts, policy) -> None:
    """An inference response carries one row per text, each what the engine answers for that text alone."""
    out = outputs(body)
    n, classes = len(texts), len(model.spec.labels)
    assert [o["name"] for o in body["outputs"]] == OUTPUTS
    assert out["label"]["datatype"] == "BYTES" and out["label"]["shape"] == [n]
    assert out["probabilities"]["datatype"] == "FP32" and out["probabilities"]["shape"] == [n, classes]
    assert out["exit_layer"]["datatype"] == "INT32" and out["entropy"]["datatype"] == "FP32"
    assert out["margin"]["datatype"] == "FP32" and out["margin"]["shape"] == [n]
    assert out["policy"]["data"] == [policy.name] * n
    probabilities = np.array(out["probabilities"]["data"]).reshape(n, classes)
    for row, text in enumerate(texts):
        alone = engine(model, text, policy)
        assert out["label"]["data"][row] == alone["label"]
        assert out["exit_layer"]["data"][row] == alone["exit_layer"]
        assert probabilities[row] == pytest.approx(alone["probs"], abs=1e-5)
        top, second = sorted(alone["probs"], reverse=True)[:2]
        assert out["margin"]["data"][row] == pytest.approx(top - second, abs=1e-5)


# --- answers ---------------------------------------------------------------------------------------------------


def test_rows_of_several_requests_and_a_plain_one_share_one_engine_call(svc, model, monkeypatch):
    calls = []

    def counting_run(model, inputs, policy, labels=None):
        calls.append((policy.name, int(inputs["input_ids"].shape[0])))
        return run_bucketed(model, inputs, policy, labels)

    monkeypatch.setattr(serving, "run_bucketed", counting_run)
    rows = [
        {"body": infer(TEXTS[:3], id="first")},
        {"body": {"text": TEXTS[3]}},
        {"body": json.dumps(infer(TEXTS[3:])).encode()},  # as tritonclient sends it: bytes, no content type
    ]
    first, plain, third = svc.answer(rows, [JSON, JSON, NO_TYPE])
    assert calls == [("epee", 6)]  # one engine call for all six rows
    assert first.status == plain.status == third.status == 200
    assert first.body["model_name"] == "ade" and first.body["model_version"] == "2.0"
    assert first.body["id"] == "first" and "id" not in third.body  # no id sent, none known
    check_rows(model, first.body, TEXTS[:3], svc.config.policy)
    check_rows(model, third.body, TEXTS[3:], svc.config.policy)
    assert plain.body["label"] == engine(model, TEXTS[3], svc.config.policy)["label"]
    assert set(plain.body) == set(PLAIN_FIELDS)
    assert first.exit_layers == outputs(first.body)["exit_layer"]["data"]
    assert first.exit_layer == max(first.exit_layers) and first.row_exit_layers == first.exit_layers


def test_the_plain_answer_is_unchanged(svc, model):
    """The plain path: the same JSON body, field by field and in order, as the engine gives for one text."""
    answer = svc.answer([{"body": {"text": TEXTS[0]}}], [JSON])[0]
    alone = engine(model, TEXTS[0], svc.config.policy)
    assert list(answer.body) == PLAIN_FIELDS
    assert answer.body["probabilities"] == {
        label: round(p, 6) for label, p in zip(model.spec.labels, alone["probs"])
    }
    assert answer.exit_layers is None and answer.row_exit_layers == [answer.exit_layer]


def test_the_server_request_id_answers_a_request_without_id(svc):
    answers = svc.answer([{"body": infer(TEXTS[:1])}, {"body": infer(TEXTS[:1], id="mine")}], [JSON, JSON],
                         request_ids=["ts-1", "ts-2"])  # fmt: skip
    assert [answer.body["id"] for answer in answers] == ["ts-1", "mine"]


def test_shape_n_by_1_and_requested_outputs_in_their_order(svc):
    body = infer(
        TEXTS[:2], outputs=[{"name": "exit_layer"}, {"name": "label", "parameters": {"binary_data": True}}]
    )
    body["inputs"][0]["shape"] = [2, 1]
    answer = svc.answer([{"body": body}], [JSON])[0]
    assert answer.status == 200 and [o["name"] for o in answer.body["outputs"]] == ["exit_layer", "label"]


def test_policy_parameters_override_like_the_epee_field(svc, model):
    body = infer(TEXTS[:2], parameters={"policy": "full", "binary_data_output": True})
    answer = svc.answer([{"body": body}], [JSON])[0]
    assert outputs(answer.body)["exit_layer"]["data"] == [4, 4]
    assert outputs(answer.body)["policy"]["data"] == ["full", "full"]
    header = svc.answer([{"body": infer(TEXTS[:1])}], [{**JSON, "X-EPEE-Policy": "full"}])[0]
    assert outputs(header.body)["policy"]["data"] == ["full"]
    tuned = svc.answer([{"body": infer(TEXTS[:1], parameters={"policy": "entropy", "entropy_threshold": 0.9})}],
                       [JSON])[0]  # fmt: skip
    assert outputs(tuned.body)["policy"]["data"] == ["entropy"]
    locked = TextService(model, ServeConfig.from_section({"allow_request_override": False}))
    refused = locked.answer([{"body": infer(TEXTS[:1], parameters={"policy": "full"})}], [JSON])[0]
    assert refused.status == 403 and "allow_request_override" in refused.body["error"]


def test_multi_label_labels_are_json_lists_of_names(tokenizer):
    model = build_tiny_model(tokenizer, task="multi-label")
    svc = TextService(model, ServeConfig.from_section({}))
    answer = svc.answer([{"body": infer(TEXTS[:3])}], [JSON])[0]
    out = outputs(answer.body)
    assert [o["name"] for o in answer.body["outputs"]][0] == "labels"
    probabilities = np.array(out["probabilities"]["data"]).reshape(3, 4)
    for row, value in enumerate(out["labels"]["data"]):
        expected = [label for label, p in zip(model.spec.labels, probabilities[row]) if p >= 0.5]
        assert json.loads(value) == expected


def test_relation_extraction_takes_text_head_and_tail_of_the_same_rows(tokenizer):
    model = build_tiny_model(tokenizer, task="relation-extraction")
    svc = TextService(model, ServeConfig.from_section({}))
    texts = ["Aspirin caused bleeding.", "Warfarin and aspirin interact."]
    body = {"inputs": [tensor("text", texts), tensor("head", ["Aspirin", "Warfarin"]),
                       tensor("tail", ["bleeding", "aspirin"])]}  # fmt: skip
    good, short_tail, absent = svc.answer(
        [{"body": body},
         {"body": {"inputs": [tensor("text", texts), tensor("head", ["Aspirin", "Warfarin"]),
                              tensor("tail", ["bleeding"])]}},
         {"body": {"inputs": [tensor("text", texts), tensor("head", ["Aspirin", "ibuprofen"]),
                              tensor("tail", ["bleeding", "aspirin"])]}}],
        [JSON] * 3,
    )  # fmt: skip
    assert good.status == 200 and outputs(good.body)["label"]["shape"] == [2]
    marked = "[E1] Aspirin [/E1] caused [E2] bleeding [/E2]."
    alone = run_early_exit(model, encode_texts(model.tokenizer, [marked], 64), svc.config.policy)
    assert outputs(good.body)["exit_layer"]["data"][0] == int(alone.exit_layer[0])
    assert short_tail.status == 400 and "'tail' has 1 rows, 'text' has 2" in short_tail.body["error"]
    assert absent.status == 400 and absent.body["error"].startswith("row 1: 'head' entity")
    missing = svc.answer([{"body": {"inputs": [tensor("text", texts), tensor("head", ["Aspirin", "Warfarin"])]}}],
                         [JSON])[0]  # fmt: skip
    assert missing.status == 400 and missing.body["error"].startswith("missing input 'tail'")


def test_images_are_base64_rows():
    model = build_tiny_model(kind="vit")
    svc = ImageService(model, ServeConfig.from_section({}))
    rng = np.random.default_rng(0)
    pngs = []
    for _ in range(3):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    encoded = [base64.b64encode(png).decode() for png in pngs]
    good, bad = svc.answer([{"body": {"inputs": [tensor("image", encoded)]}},
                            {"body": {"inputs": [tensor("image", [encoded[0], "not base64!"])]}}], [JSON, JSON])  # fmt: skip
    assert good.status == 200
    for row, png in enumerate(pngs):
        image = svc.decode(png, {"body": {"content-type": "image/png"}}).model_input
        alone = run_early_exit(model, encode_images(svc.transform, [image]), svc.config.policy)
        assert outputs(good.body)["exit_layer"]["data"][row] == int(alone.exit_layer[0])
    assert bad.status == 400 and bad.body["error"] == "row 1: 'image' is not valid base64"


# --- refusals: each request alone --------------------------------------------------------------------------------

HOSTILE = {
    "wrong shape": ({"inputs": [tensor("text", TEXTS[:2], shape=[3])]}, 400, "shape [3] holds 3 elements, data has 2"),
    "shape of rank 3": ({"inputs": [tensor("text", TEXTS[:2], shape=[2, 1, 1])]}, 400, "shape must be [n] or [n, 1]"),
    "shape [n, 2]": ({"inputs": [tensor("text", TEXTS[:2], shape=[1, 2])]}, 400, "shape must be [n] or [n, 1]"),
    "negative shape": ({"inputs": [tensor("text", [], shape=[-1])]}, 400, "non-negative integers"),
    "wrong datatype": ({"inputs": [tensor("text", TEXTS[:2], datatype="FP32")]}, 400, "datatype must be BYTES"),
    "unknown input": ({"inputs": [tensor("txt", TEXTS[:1])]}, 400, "unknown input 'txt'"),
    "no inputs": ({"inputs": []}, 400, "'inputs' must be a non-empty list"),
    "input given twice": ({"inputs": [tensor("text", TEXTS[:1]), tensor("text", TEXTS[:1])]}, 400, "given twice"),
    "n = 0": ({"inputs": [tensor("text", [], shape=[0])]}, 400, "no rows"),
    "lone surrogate in a row": (infer([TEXTS[0], "\ud800 rash"]), 400, "row 1: 'text' is not valid Unicode"),
    "empty row": (infer([TEXTS[0], " "]), 400, "row 1: 'text' is empty"),
    "number in a row": (infer([TEXTS[0], 7]), 400, "input 'text' row 1: expected a string, got int"),
    "nested data": ({"inputs": [tensor("text", [[TEXTS[0]]], shape=[1, 1])]}, 400, "row 0: expected a string"),
    "data not a list": ({"inputs": [{**tensor("text", TEXTS[:1]), "data": TEXTS[0]}]}, 400, "flat list"),
    "missing data": ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1]}]}, 400, "missing field 'data'"),
    "unknown request field": (infer(TEXTS[:1], priority=1), 400, "unknown field 'priority'"),
    "unknown parameter": (infer(TEXTS[:1], parameters={"sequence_id": 3}), 400, "unknown field 'sequence_id'"),
    "unknown policy": (infer(TEXTS[:1], parameters={"policy": "fastest"}), 400, "fastest"),
    "oracle policy": (infer(TEXTS[:1], parameters={"policy": "oracle"}), 400, "oracle"),
    "binary input": ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                                  "parameters": {"binary_data_size": 9}}]}, 400, "binary tensor data"),  # fmt: skip
    "unknown output": (infer(TEXTS[:1], outputs=[{"name": "logits"}]), 400, "unknown output 'logits'"),
    "classification output": (infer(TEXTS[:1], outputs=[{"name": "label", "parameters": {"class_count": 2}}]),
                              400, "unknown field 'class_count'"),  # fmt: skip
    "id not a string": (infer(TEXTS[:1], id=5), 400, "'id' must be a string"),
    "too many rows": (infer(["Rash."] * 65), 413, "65 rows, the limit is 64"),
}  # fmt: skip


def test_each_hostile_request_gets_its_own_error_and_batch_mates_their_answers(svc, model):
    kinds = list(HOSTILE)
    rows, headers, plan = [], [], []
    for number, kind in enumerate(kinds):  # every hostile body between two good requests, in one batch
        rows += [{"body": infer(TEXTS[number % 3 : number % 3 + 2])}, {"body": HOSTILE[kind][0]}]
        headers += [JSON, JSON]
        plan += [("good", TEXTS[number % 3 : number % 3 + 2]), ("bad", kind)]
    rows.append({"body": {"text": TEXTS[4]}})
    headers.append(JSON)
    plan.append(("plain", TEXTS[4]))
    answers = svc.answer(rows, headers)
    assert len(answers) == len(rows)
    for (kind_type, what), answer in zip(plan, answers):
        if kind_type == "good":
            assert answer.status == 200
            check_rows(model, answer.body, what, svc.config.policy)
        elif kind_type == "plain":
            assert (
                answer.status == 200
                and answer.body["label"] == engine(model, what, svc.config.policy)["label"]
            )
        else:
            _, status, fragment = HOSTILE[what]
            assert answer.status == status, (what, answer.body)
            assert set(answer.body) == {"error"} and fragment in answer.body["error"], (what, answer.body)


def test_binary_tensor_bodies_are_refused_with_a_hint(svc):
    binary = (
        b'{"inputs":[{"name":"text","shape":[1],"datatype":"BYTES","parameters":{"binary_data_size":9}}]}'
    )
    binary += b"\x05\x00\x00\x00Rash."
    headers = {**NO_TYPE, "Inference-Header-Content-Length": "98"}
    answer = svc.answer([{"body": binary}, {"body": {"text": TEXTS[0]}}], [headers, JSON])
    assert answer[0].status == 400 and "binary_data=False" in answer[0].body["error"]
    assert answer[1].status == 200


def test_an_engine_failure_in_one_row_fails_its_request_only(svc, model, monkeypatch):
    encode = svc.encode_inputs

    def poisoned(model_inputs):
        if any("POISON" in text for text in model_inputs):
            raise TypeError("TextEncodeInput must be Union[...]")
        return encode(model_inputs)

    monkeypatch.setattr(svc, "encode_inputs", poisoned)
    rows = [{"body": infer(TEXTS[:2])}, {"body": infer([TEXTS[2], "POISON pill", TEXTS[3]])},
            {"body": {"text": TEXTS[4]}}, {"body": infer(TEXTS[3:])}]  # fmt: skip
    first, culprit, plain, last = svc.answer(rows, [JSON] * 4)
    assert culprit.status == 400 and culprit.failure == "TypeError" and "POISON" not in culprit.body["error"]
    check_rows(model, first.body, TEXTS[:2], svc.config.policy)
    check_rows(model, last.body, TEXTS[3:], svc.config.policy)
    assert plain.status == 200


def test_oip_body_detection():
    assert oip.oip_body({"inputs": []}) == {"inputs": []}
    assert oip.oip_body(b' {"inputs": [], "id": "x"}') == {"inputs": [], "id": "x"}
    for plain in ({"text": "x"}, b"Rash.", "{not json", b"\x89PNG", '["inputs"]'):
        assert oip.oip_body(plain) is None


def test_row_limit_is_a_validated_serving_key(model):
    svc = TextService(model, ServeConfig.from_section({"max_rows_per_request": 2}))
    assert svc.answer([{"body": infer(TEXTS[:3])}], [JSON])[0].status == 413
    with pytest.raises(ConfigError, match="'max_rows_per_request' must be a positive integer"):
        ServeConfig.from_section({"max_rows_per_request": 0})


def test_the_log_line_of_a_multi_row_request_names_rows_and_layers_not_content(svc):
    answer = svc.answer([{"body": infer(TEXTS[:3])}], [JSON])[0]
    line = request_line("req-1", {"body": infer(TEXTS[:3])}, answer, "b1", 1, 2.0, 4)
    layers = ",".join(str(layer) for layer in answer.exit_layers)
    assert f"status 200, 3 rows, exit layers {layers} of 4, policy epee" in line
    assert all(text not in line for text in TEXTS)
