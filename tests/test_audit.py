"""`epee audit` (cli/audit.py): a replayed stream alarms when the policy disagrees with full depth more than
certified, then serves full depth; a policy that agrees never alarms. Also where the certified rate comes from
and the guarantee's optional `consistency_bound`."""

from __future__ import annotations

import json

import pytest
from helpers import DEMO_DATA, MARKABLE_RELATION_ROW, UNMARKABLE_RELATION_ROW, build_tiny_model

from epee_core.cli import main
from epee_core.cli.audit import certified_rate
from epee_core.cli.common import CommandError
from epee_core.serving.config import ServeConfig

ROWS = 60
# On the demo sentences the tiny model's layer-1 exit disagrees with full depth on about 40 % of rows.
GUARANTEE = (
    "  guarantee: {kind: consistency, epsilon: 0.05, delta: 0.1, bound: 0.04, n: 1000, method: exact}\n"
)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    lines = (DEMO_DATA / "ade_demo_dev.jsonl").read_text().splitlines()[:ROWS]
    path = tmp_path_factory.mktemp("stream") / "stream.jsonl"
    path.write_text("".join(json.dumps({"text": json.loads(line)["text"]}) + "\n" for line in lines))
    return path


def audit(capsys, tmp_path, model_dir, stream, policy_lines: str, *extra: str) -> dict:
    config = tmp_path / "model.yaml"
    config.write_text(f"epee:\n{policy_lines}{GUARANTEE}")
    capsys.readouterr()
    code = main(["audit", "--model", str(model_dir), "--config", str(config), "--stream", str(stream), "--json",
                 *extra])  # fmt: skip
    assert code == 0
    return json.loads(capsys.readouterr().out)


def test_a_policy_that_disagrees_with_full_depth_alarms_and_then_serves_full_depth(
    capsys, tmp_path, model_dir, stream
):
    rows_out = tmp_path / "rows.jsonl"
    report = audit(capsys, tmp_path, model_dir, stream, "  policy: static\n  layer: 1\n",
                   "--audit-fraction", "1", "--rows-out", str(rows_out))  # fmt: skip
    assert report["epsilon"] == 0.05 and report["epsilon_source"] == "guarantee.epsilon"
    assert report["rows"] == ROWS and report["wealth"] >= 1 / 0.05
    alarm = report["alarm_at_row"]
    assert alarm is not None and report["audited"] == alarm  # every row audited until the alarm
    assert report["observed_disagreement"] > 0.05
    rows = [json.loads(line) for line in rows_out.read_text().splitlines()]
    assert [row["row"] for row in rows] == list(range(1, ROWS + 1))
    assert {(row["policy"], row["exit_layer"]) for row in rows[:alarm]} == {("static", 1)}
    assert {(row["policy"], row["exit_layer"], row["audited"]) for row in rows[alarm:]} == {
        ("full", 4, False)
    }
    assert rows[alarm - 1]["disagree"] is True


def test_a_policy_that_agrees_with_full_depth_never_alarms(capsys, tmp_path, model_dir, stream):
    report = audit(capsys, tmp_path, model_dir, stream, "  policy: full\n", "--audit-fraction", "1")
    assert report["alarm_at_row"] is None and report["wealth"] < 1
    assert report["audited"] == ROWS and report["observed_disagreement"] == 0.0
    assert report["reason"].startswith("no alarm")


def test_the_audit_sample_is_seeded_and_about_the_fraction(capsys, tmp_path, model_dir, stream):
    first = audit(capsys, tmp_path, model_dir, stream, "  policy: full\n", "--audit-fraction", "0.5")
    again = audit(capsys, tmp_path, model_dir, stream, "  policy: full\n", "--audit-fraction", "0.5")
    assert first["audited"] == again["audited"]
    assert 0.25 * ROWS < first["audited"] < 0.75 * ROWS


def test_a_bad_stream_line_is_named(capsys, tmp_path, model_dir):
    config = tmp_path / "model.yaml"
    config.write_text(f"epee:\n  policy: full\n{GUARANTEE}")
    stream = tmp_path / "bad.jsonl"
    stream.write_text('{"text": "aspirin"}\n{"txt": "aspirin"}\n')
    code = main(["audit", "--model", str(model_dir), "--config", str(config), "--stream", str(stream)])
    assert code == 2
    assert f"{stream}: line 2" in capsys.readouterr().err


ACCURACY = {"kind": "accuracy", "epsilon": 0.01, "delta": 0.1, "bound": 0.008, "n": 1200, "method": "exact"}


def test_the_certified_rate_is_the_consistency_bound_of_an_accuracy_certificate():
    assert certified_rate({**ACCURACY, "consistency_bound": 0.03}, "m.yaml") == (
        0.03,
        "guarantee.consistency_bound",
    )
    assert certified_rate(ACCURACY, "m.yaml") == (0.01, "guarantee.epsilon")
    assert certified_rate({**ACCURACY, "kind": "consistency"}, "m.yaml") == (0.01, "guarantee.epsilon")
    with pytest.raises(CommandError, match="m.yaml: no 'guarantee'"):
        certified_rate(None, "m.yaml")


def test_the_guarantee_accepts_a_consistency_bound_in_zero_one():
    serve = ServeConfig.from_section({"guarantee": {**ACCURACY, "consistency_bound": 0.03}})
    assert serve.guarantee["consistency_bound"] == 0.03
    with pytest.raises(ValueError, match=r"'guarantee.consistency_bound' must be in \[0.0, 1.0\]"):
        ServeConfig.from_section({"guarantee": {**ACCURACY, "consistency_bound": 1.5}})


def test_a_relation_stream_is_read_from_text_head_and_tail(capsys, tmp_path, tokenizer):
    model_dir = tmp_path / "relation"
    build_tiny_model(tokenizer, task="relation-extraction").save_pretrained(model_dir)
    stream = tmp_path / "relations.jsonl"
    stream.write_text(json.dumps(MARKABLE_RELATION_ROW) + "\n" + json.dumps(UNMARKABLE_RELATION_ROW) + "\n")
    config = tmp_path / "model.yaml"
    config.write_text(f"epee:\n  policy: full\n{GUARANTEE}")
    code = main(["audit", "--model", str(model_dir), "--config", str(config), "--stream", str(stream)])
    assert code == 2  # the second row's tail cannot be marked: named like a bad request
    assert f"{stream}: line 2" in capsys.readouterr().err
    stream.write_text(json.dumps(MARKABLE_RELATION_ROW) + "\n")
    assert main(["audit", "--model", str(model_dir), "--config", str(config), "--stream", str(stream),
                 "--audit-fraction", "1", "--json"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert (report["rows"], report["audited"], report["alarm_at_row"]) == (1, 1, None)
