"""The shadow audit in the serving worker (serving/audit.py, `EarlyExitService.observe`): the `audit_*` keys are
checked, a seeded share of rows is audited, a policy that disagrees with full depth alarms and the service then
serves full depth (header, default policy), records hold exit logits and no text, and the layer-level scheduler
audits the same way."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from helpers import DEMO_DATA, build_tiny_model

from epee_core.engine.spec import ConfigError
from epee_core.serving.config import ServeConfig
from epee_core.serving.continuous import ContinuousBatcher
from epee_core.serving.service import TextService

# Layer 1 of the tiny model disagrees with full depth on about 40 % of the demo sentences (tests/test_audit.py).
GUARANTEE = {
    "kind": "consistency",
    "epsilon": 0.05,
    "delta": 0.1,
    "bound": 0.04,
    "n": 1000,
    "method": "exact",
}
DISAGREEING = {"policy": "static", "layer": 1, "guarantee": GUARANTEE}
JSON = {"body": {"content-type": "application/json"}}
TEXTS = [
    json.loads(line)["text"] for line in (DEMO_DATA / "ade_demo_dev.jsonl").read_text().splitlines()[:80]
]


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_tiny_model(tokenizer)


def service(model, **section) -> TextService:
    return TextService(model, ServeConfig.from_section({"audit_mode": "tail", **section}))


def serve(svc: TextService, texts: list[str], batch_size: int = 8, **body) -> list:
    """Answer `texts` in batches, as the handler does; returns the answers."""
    answers = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        rows = [{"body": {"text": text, **body}} for text in chunk]
        ids = [f"req-{start + offset}" for offset in range(len(chunk))]
        answers += svc.answer(rows, [JSON] * len(chunk), ids)
    return answers


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"audit_fraction": 1.5, "guarantee": GUARANTEE}, r"'audit_fraction' must be in \[0, 1\]"),
        ({"audit_fraction": -0.1, "guarantee": GUARANTEE}, r"'audit_fraction' must be in \[0, 1\]"),
        ({"audit_fraction": "often"}, "'audit_fraction' must be int or float"),
        ({"audit_fraction": 0.02}, "'audit_fraction' needs a 'guarantee'"),
        ({"audit_fraction": 0.02, "guarantee": {**GUARANTEE, "epsilon": 0.0, "bound": 0.0}}, "in \\(0, 1\\)"),
        ({"audit_alpha": 1.0}, r"'audit_alpha' must be in \(0, 1\)"),
        ({"audit_seed": -1}, "'audit_seed' must be an integer >= 0"),
        ({"audit_mode": "later"}, "'audit_mode' must be one of background, tail"),
        ({"audit_records": 3}, "'audit_records' must be str"),
        ({"guarantee": {**GUARANTEE, "exit_counts": [1, -1]}}, "'guarantee.exit_counts'"),
    ],
)
def test_audit_keys_out_of_range_are_refused_naming_the_key(section, message):
    with pytest.raises(ConfigError, match=message):
        ServeConfig.from_section(section)


def test_the_audit_is_off_by_default():
    config = ServeConfig.from_section({"guarantee": GUARANTEE})
    assert config.audit_fraction == 0 and config.audit_mode == "background"


def test_without_audit_fraction_the_service_never_audits_or_falls_back(model):
    svc = service(model, **DISAGREEING)
    answers = serve(svc, TEXTS)
    assert svc.auditor is None and not svc.alarmed
    assert {answer.exit_layer for answer in answers} == {1}


def test_a_policy_that_disagrees_with_full_depth_alarms_and_the_service_then_serves_full_depth(model):
    svc = service(model, audit_fraction=1.0, **DISAGREEING)
    answers = serve(svc, TEXTS)
    monitor = svc.auditor.monitor
    assert monitor.alarmed and monitor.disagreements / monitor.audited > GUARANTEE["epsilon"]
    batch_of_alarm = (monitor.alarm_at - 1) // 8
    after = answers[(batch_of_alarm + 1) * 8 :]
    assert after, "the alarm should come before the last batch"
    assert {answer.exit_layer for answer in after} == {model.num_layers}
    assert {answer.body["policy"] for answer in after} == {"full"}
    assert svc.guarantee_header.endswith(f"; fallback=full; alarm_at={monitor.alarm_at}")
    assert svc.monitoring()["fallback"] is True


def test_the_alarm_is_one_log_line_without_request_content(model, caplog):
    svc = service(model, audit_fraction=1.0, **DISAGREEING)
    with caplog.at_level("WARNING", logger="epee_core.serving.audit"):
        serve(svc, TEXTS)
    alarms = [record.getMessage() for record in caplog.records if "alarm" in record.getMessage()]
    assert len(alarms) == 1 and "serving full depth" in alarms[0]
    assert not any(text in alarms[0] for text in TEXTS)


def test_a_policy_that_agrees_with_full_depth_never_alarms(model):
    svc = service(model, policy="full", audit_fraction=1.0, guarantee=GUARANTEE)
    serve(svc, TEXTS)
    assert svc.auditor.monitor.audited == len(TEXTS) and svc.auditor.monitor.disagreements == 0
    assert not svc.alarmed and "fallback" not in svc.guarantee_header


def test_the_audit_sample_is_seeded_and_about_the_fraction(model, tmp_path):
    def audited_ids(seed: int) -> list[str]:
        records = tmp_path / f"run{len(list(tmp_path.iterdir()))}.jsonl"
        svc = service(model, policy="full", audit_fraction=0.25, audit_seed=seed, audit_records=str(records),
                      guarantee=GUARANTEE)  # fmt: skip
        serve(svc, TEXTS)
        return [json.loads(line)["request_id"] for line in records.read_text().splitlines()]

    first = audited_ids(0)
    assert first == audited_ids(0) and first != audited_ids(1)
    assert 8 <= len(first) <= 32  # Binomial(80, 0.25): mean 20


def test_requests_that_override_the_policy_are_not_audited(model):
    svc = service(model, audit_fraction=1.0, **DISAGREEING)
    serve(svc, TEXTS, epee={"policy": "static", "layer": 2})
    assert svc.auditor.monitor.audited == 0


def test_a_record_holds_every_exit_and_what_was_served_but_no_text(model, tmp_path):
    records = tmp_path / "audit.jsonl"
    svc = service(model, audit_fraction=1.0, audit_records=str(records), **DISAGREEING)
    serve(svc, TEXTS[:8])
    lines = records.read_text().splitlines()
    assert len(lines) == 8
    record = json.loads(lines[0])
    assert record["request_id"] == "req-0" and record["exit_layer"] == 1
    assert len(record["logits"]) == model.num_layers and len(record["logits"][0]) == len(model.spec.labels)
    assert record["disagree"] == (record["prediction"] != record["full_prediction"])
    assert record["length"] == len(model.tokenizer(TEXTS[0], truncation=True, max_length=64)["input_ids"])
    text = records.read_text()
    assert not any(sentence in text for sentence in TEXTS[:8])
    assert not any(word in text for word in ("hemorrhage", "text"))


def test_background_audits_reach_the_same_state_as_tail_audits(model):
    tail = service(model, audit_fraction=0.5, **DISAGREEING)
    background = service(model, audit_fraction=0.5, **DISAGREEING, audit_mode="background")
    serve(tail, TEXTS[:24])
    serve(background, TEXTS[:24])
    background.auditor.wait()
    assert background.auditor.state() == {**tail.auditor.state(), "mode": "background"}
    assert background.auditor.monitor.audited > 0


def test_the_layer_level_scheduler_audits_and_falls_back_too(model):
    svc = service(model, audit_fraction=1.0, **DISAGREEING)
    batcher = ContinuousBatcher(svc)
    answers = []
    for number, text in enumerate(TEXTS):
        assert batcher.accept(number, {"body": {"text": text}}, JSON, f"req-{number}") is None
        while batcher.in_flight:
            answers += batcher.step().values()
    monitor = svc.auditor.monitor
    assert monitor.alarmed
    assert {answer.exit_layer for answer in answers[monitor.alarm_at :]} == {model.num_layers}


def test_exit_counts_feed_a_drift_detector_on_served_rows(model):
    counts = [10] + [0] * (model.num_layers - 1)  # calibration exited at layer 1 only
    svc = service(model, policy="full", guarantee={**GUARANTEE, "exit_counts": counts})
    serve(svc, TEXTS[:40])
    assert svc.drift.rows == 40 and svc.monitoring()["drift"]["detector"] > 1


def test_exit_counts_must_match_the_models_layers(model):
    with pytest.raises(ConfigError, match="'guarantee.exit_counts' has 2 layers"):
        service(model, guarantee={**GUARANTEE, "exit_counts": [1, 2]})


def test_a_failing_audit_never_fails_an_answer(model, monkeypatch):
    svc = service(model, audit_fraction=1.0, **DISAGREEING)

    def broken(_jobs):
        raise RuntimeError("audit down")

    monkeypatch.setattr(svc.auditor, "offer", broken)
    answers = serve(svc, TEXTS[:8])
    assert [answer.status for answer in answers] == [200] * 8 and not svc.alarmed


class RecordedMetrics:
    """The part of TorchServe's metrics cache the handler calls, recording (name, value) pairs."""

    def __init__(self):
        self.calls: list[tuple[str, float]] = []

    def add_counter(self, name, value, dimensions=None):
        self.calls.append((name, value))

    def add_metric(self, name, value, unit, dimensions=None, metric_type=None):
        self.calls.append((name, value))


def test_the_handler_reports_the_alarm_in_metrics_and_model_describe(model, tmp_path):
    handlers = pytest.importorskip("handlers.text_handler")
    model.save_pretrained(tmp_path / "model")
    section = {"task": "text-classification", "audit_fraction": 1.0, "audit_mode": "tail", **DISAGREEING}
    counts = {"exit_counts": [5] * model.num_layers}
    section["guarantee"] = {**GUARANTEE, **counts}
    context = SimpleNamespace(model_name="tiny", manifest={}, model_yaml_config={"epee": section},
                              system_properties={"model_dir": str(tmp_path)}, metrics=RecordedMetrics())  # fmt: skip
    handler = handlers.TextHandler()
    handler.initialize(context)
    assert json.loads(handler.describe_handle())["fallback"] is False
    handler.record_metrics(serve(handler.service, TEXTS))
    described = json.loads(handler.describe_handle())
    assert described["fallback"] is True and described["audit"]["alarm_at"] >= 1
    assert described["guarantee"]["epsilon"] == GUARANTEE["epsilon"]
    recorded = dict(context.metrics.calls)
    assert recorded["EpeeFallback"] == 1 and recorded["EpeeAuditWealth"] >= 20
    assert "EpeeExitDrift" in recorded
    audited = sum(value for name, value in context.metrics.calls if name == "EpeeAuditedRows")
    assert audited == handler.service.auditor.monitor.audited
