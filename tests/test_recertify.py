"""`epee recertify` (calibration/recertify.py): a worker's audit records become a calibration cache, Learn-then-Test
runs on them (consistency without labels, accuracy with the site's labels) and the new model YAML keeps the old
one's keys and packages."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers import DEMO_DATA, build_tiny_model

from epee_core.cli import main
from epee_core.serving.config import ServeConfig
from epee_core.serving.service import TextService

ROWS = 160
GUARANTEE = {"kind": "consistency", "epsilon": 0.2, "delta": 0.1, "bound": 0.1, "n": 1000, "method": "exact"}
JSON = {"body": {"content-type": "application/json"}}


@pytest.fixture(scope="module")
def served(tokenizer, tmp_path_factory):
    """A model directory, its model YAML (with an audit) and the audit records of ROWS demo sentences, plus the
    sentences' labels keyed by request id."""
    work = tmp_path_factory.mktemp("recertify")
    model = build_tiny_model(tokenizer)
    model.save_pretrained(work / "model")
    records = work / "audit.jsonl"
    section = {"task": "text-classification", "policy": "static", "layer": 1, "audit_fraction": 1.0,
               "audit_mode": "tail", "audit_records": str(records), "max_text_chars": 5000,
               "guarantee": GUARANTEE}  # fmt: skip
    config = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 4, "maxBatchDelay": 5, "epee": section}
    (work / "model.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    service = TextService(model, ServeConfig.from_model_yaml(config, "model.yaml"))
    rows = [json.loads(line) for line in (DEMO_DATA / "ade_demo_dev.jsonl").read_text().splitlines()[:ROWS]]
    labels = work / "labels.jsonl"
    with labels.open("w") as handle:
        for number, row in enumerate(rows):
            request_id = f"req-{number}"
            service.answer([{"body": {"text": row["text"]}}], [JSON], [request_id])
            label = "a" if row["label"] == "no_adverse_event" else "b"  # the tiny model's labels: a, b, c
            handle.write(json.dumps({"request_id": request_id, "label": label}) + "\n")
    return {"work": work, "records": records, "labels": labels}


def recertify(capsys, served, *extra: str) -> dict:
    work = served["work"]
    capsys.readouterr()
    code = main(["recertify", "--model", str(work / "model"), "--config", str(work / "model.yaml"),
                 "--audit", str(served["records"]), "--output", str(work / "new.yaml"), "--json", *extra])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_recertify_certifies_consistency_on_the_audit_records_without_labels(capsys, served):
    result = recertify(capsys, served)
    assert result["rows"] == ROWS and result["guarantee"]["kind"] == "consistency"
    assert result["guarantee"]["n"] == round(0.6 * ROWS)
    assert result["guarantee"]["epsilon"] == GUARANTEE["epsilon"]  # the old budget by default
    new = yaml.safe_load((served["work"] / "new.yaml").read_text())
    assert new["epee"]["guarantee"] == result["guarantee"]
    assert new["epee"]["policy"] == result["policy"].split()[0].split("(")[0]


def test_the_new_yaml_keeps_the_old_keys_and_packages(capsys, served, tmp_path):
    recertify(capsys, served)
    work = served["work"]
    new = yaml.safe_load((work / "new.yaml").read_text())
    assert (new["batchSize"], new["maxBatchDelay"], new["epee"]["audit_fraction"]) == (4, 5, 1.0)
    assert "layer" not in new["epee"] or new["epee"]["policy"] == "static"  # the old policy's keys are gone
    ServeConfig.load(work / "new.yaml")
    assert main(["package", "--model", str(work / "model"), "--config", str(work / "new.yaml"), "--name",
                 "recertified", "--version", "2.0", "--export-path", str(tmp_path)]) == 0  # fmt: skip
    assert (tmp_path / "recertified.mar").is_file()


def test_with_labels_recertify_certifies_the_accuracy_drop_on_the_labelled_rows(capsys, served):
    result = recertify(capsys, served, "--labels", str(served["labels"]), "--guarantee", "accuracy")
    assert result["guarantee"]["kind"] == "accuracy" and result["rows"] == ROWS


def test_accuracy_without_labels_is_refused(capsys, served):
    work = served["work"]
    code = main(["recertify", "--model", str(work / "model"), "--config", str(work / "model.yaml"), "--audit",
                 str(served["records"]), "--output", str(work / "x.yaml"), "--guarantee", "accuracy"])  # fmt: skip
    assert code == 2 and "needs --labels" in capsys.readouterr().err


def test_a_bad_record_is_named_by_line(capsys, served, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = served["records"].read_text().splitlines()
    record = json.loads(lines[1])
    record["logits"] = record["logits"][:-1]  # a layer short: another model's record
    bad.write_text(lines[0] + "\n" + json.dumps(record) + "\n")
    work = served["work"]
    code = main(["recertify", "--model", str(work / "model"), "--config", str(work / "model.yaml"), "--audit",
                 str(bad), "--output", str(tmp_path / "x.yaml")])  # fmt: skip
    assert code == 2 and f"{bad}:2: not an audit record" in capsys.readouterr().err
