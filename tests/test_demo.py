"""`epee demo`: its sentences and their annotation, and the table a new user reads (README, "Try it"). The whole
demo on a real TorchServe runs in tests/integration/test_demo.py."""

from __future__ import annotations

import json
import shlex

from helpers import DEMO_DATA

from epee_core.cli import build_parser
from epee_core.ops.demo import DEMO_SENTENCES, DOCS_SENTENCE, next_commands, render_demo


def demo_result(running_in: str | None = None, warnings: tuple[str, ...] = ()) -> dict:
    def row(text: str, annotated: str, label: str, exit_layer: int) -> dict:
        return {"text": text, "annotated": annotated, "label": label, "correct": label == annotated,
                "probability": 0.9, "margin": 0.8, "exit_layer": exit_layer, "num_layers": 6,
                "latency_ms": 5.0}  # fmt: skip

    rows = [row(DOCS_SENTENCE, "adverse_event", "adverse_event", 6),
            row("Hypercoagulability studies were negative.", "no_adverse_event", "adverse_event", 1)]  # fmt: skip
    return {"rows": rows, "policy": "max_prob(threshold=0.9)", "exit_layers": [1, 6], "mean_exit_layer": 3.5,
            "num_layers": 6, "mean_latency_ms": 5.0, "mean_full_latency_ms": 9.0, "agree_with_annotation": 1,
            "promise": "disagreement with full depth <= 0.05 with probability >= 0.9",
            "calibration": {"data": "ade_demo_dev.jsonl", "rows": 400, "full_accuracy": 0.87,
                            "chosen_accuracy": 0.86, "warnings": list(warnings)},
            "plot": "models/ade-minilm-pareto.png", "report": "models/ade-minilm.report.json",
            "next": ["epee evaluate --model models/ade-minilm"], "seconds": 1.0, "inference_key": "k",
            "inference_url": "http://127.0.0.1:8080/predictions/ade-minilm", "running_in": running_in}  # fmt: skip


def test_demo_sentences_are_annotated_as_in_the_corpus_and_include_the_docs_example():
    corpus = {row["text"]: row["label"] for row in map(json.loads, (DEMO_DATA / "ade_demo_dev.jsonl").open())}
    texts = [text for text, _ in DEMO_SENTENCES]
    assert DOCS_SENTENCE in texts and len(set(texts)) == len(texts)
    for text, annotated in DEMO_SENTENCES:
        assert text == DOCS_SENTENCE or corpus.get(text) == annotated, text


def test_demo_table_marks_each_answer_against_its_annotation():
    lines = render_demo(demo_result()).splitlines()
    assert lines[0].split()[:3] == ["text", "annotated", "answer"]
    right = next(line for line in lines if line.startswith(DOCS_SENTENCE))
    wrong = next(line for line in lines if line.startswith("Hypercoagulability"))
    assert "✓" in right and "✗" not in right and "6/6" in right
    assert "✗" in wrong and "no_adverse_event  adverse_event" in wrong and "1/6" in wrong


def test_demo_says_what_was_promised_its_warnings_where_its_outputs_are_and_what_next():
    text = render_demo(demo_result(warnings=("the budget may not hold",)))
    assert "promised by the calibration on 400 dev sentences" in text and "<= 0.05" in text
    assert "warning: the budget may not hold" in text.splitlines()
    assert "models/ade-minilm-pareto.png" in text and "models/ade-minilm.report.json" in text
    assert "  epee evaluate --model models/ade-minilm" in text.splitlines()
    assert "warning" not in render_demo(demo_result())


def test_demo_that_keeps_running_says_how_to_stop_it_after_its_table():
    lines = render_demo(demo_result("/work/demo")).splitlines()
    assert lines[-1] == "TorchServe keeps running; stop it with `torchserve --stop` in /work/demo"
    assert lines[0].startswith("text")  # the table comes first
    assert "torchserve --stop" not in render_demo(demo_result(None))


def test_the_next_commands_the_demo_prints_are_valid_epee_commands(tmp_path):
    root = tmp_path
    commands = next_commands(root, root / "models" / "ade-minilm", root / "models" / "ade-minilm.yaml")
    assert len(commands) >= 3
    for command in commands:
        words = shlex.split(command, comments=True)
        assert words[0] == "epee"
        build_parser().parse_args(words[1:])  # exits (SystemExit) on an unknown flag or command
        assert str(tmp_path) not in command  # relative to where the demo ran
