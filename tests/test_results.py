"""The results report script (epee_core.measure.results): recipes as `epee train` commands, notes derived from numbers."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from epee_core.cli import build_parser
from epee_core.engine.spec import ConfigError
from epee_core.measure import results


def fake_run(
    full_f1: float, epee_f1: float, full_accuracy: float = 0.8, oracle_accuracy: float = 0.9
) -> dict:
    def policy(f1: float, accuracy: float, exit_layer: float) -> dict:
        return {
            "accuracy": accuracy,
            "macro_f1": f1,
            "avg_exit_layer": exit_layer,
            "samples_per_second": 100.0,
            "exit_layer_counts": [0, 0, 3, 0, 0, 1],  # 3 of 4 samples stop before layer 6
            "params": {"entropy_threshold": 0.2},
        }

    scores = {name: policy(0.5, 0.5, 3.0) for name in results.POLICIES}
    scores.update(
        full=policy(full_f1, full_accuracy, 6.0),
        epee=policy(epee_f1, 0.8, 3.0),
        oracle=policy(0.95, oracle_accuracy, 2.0),
    )
    return {"backbone": "minilm", "dataset": "ade", "f1_key": "macro_f1", "num_layers": 6, "results": scores}


@pytest.mark.parametrize(("backbone", "dataset"), results.RUNS)
def test_each_recipe_is_the_epee_train_command_it_prints(backbone, dataset):
    config = results.train_config(
        results.RECIPES[backbone], results.DATASETS[dataset], Path("data"), Path("models/x")
    )
    args = build_parser().parse_args(shlex.split(results.train_command(config))[1:])
    assert (args.task, args.backbone, args.train, args.dev, args.output) == (
        config.task,
        config.backbone,
        config.train_path,
        config.dev_path,
        config.output,
    )
    assert (args.epochs, args.max_samples, args.max_dev_samples, args.batch_size) == (
        config.epochs,
        config.max_samples,
        config.max_dev_samples,
        config.batch_size,
    )
    assert (args.lr, args.head_lr) == (config.learning_rate, config.head_learning_rate)


@pytest.mark.parametrize(
    ("full_f1", "epee_f1", "verdict"),
    [(0.80, 0.83, "**improves**"), (0.80, 0.795, "matches"), (0.80, 0.70, "**loses** 0.100")],
)
def test_note_says_whether_epee_improves_matches_or_loses_against_full_depth(full_f1, epee_f1, verdict):
    note = results.overthinking_note(fake_run(full_f1, epee_f1))
    assert verdict in note and "3.00 of 6 layers" in note
    assert "stopping before the last layer for 75% of samples" in note


def test_overthinking_share_is_oracle_minus_full_accuracy():
    note = results.overthinking_note(fake_run(0.8, 0.8, full_accuracy=0.80, oracle_accuracy=0.87))
    assert "7.0% of samples are right at some earlier exit" in note


def test_summary_sorts_runs_by_the_epee_verdict():
    runs = [fake_run(0.8, 0.9), fake_run(0.8, 0.8)]
    runs[1]["backbone"] = "gpt2-small"
    above, level, below, overthought, others, rarely_early = results.summary_notes(runs)
    assert above.endswith("minilm/ade.") and level.endswith("gpt2-small/ade.") and below.endswith("none.")
    assert "minilm/ade, gpt2-small/ade" in overthought and others.endswith("none.")
    assert rarely_early.endswith("none.")  # 3 of 4 samples stop early


def test_summary_names_other_rules_that_beat_full_depth_when_epee_does_not():
    run = fake_run(0.5, 0.5)  # entropy and fpabee score 0.5 too
    run["results"]["patience"]["macro_f1"] = 0.6
    assert results.summary_notes([run])[-2].endswith("minilm/ade (patience).")
    note = results.overthinking_note(run)
    assert "Best early-exit macro_f1: patience (0.600 at 3.00 layers), above full depth." in note


def test_docs_training_lists_exactly_the_commands_the_report_runs(capsys):
    assert results.main(["--commands"]) == 0
    printed = capsys.readouterr().out.splitlines()
    documented = Path(__file__).resolve().parents[1] / "docs" / "training.md"
    in_doc = [
        line for line in documented.read_text(encoding="utf-8").splitlines() if line.startswith("epee train")
    ]
    assert in_doc == printed


def test_dev_rows_follow_the_unusable_rows_rule(tmp_path):
    (tmp_path / "ade").mkdir()
    rows = [json.dumps({"text": f"s {i}", "label": i % 2}) for i in range(10)] + ["{bad"]
    (tmp_path / "ade" / "dev.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(ConfigError, match=r"dev.jsonl:11: not valid JSON"):
        results.dev_rows(results.DATASETS["ade"], tmp_path, None)
    examples, size, skipped = results.dev_rows(results.DATASETS["ade"], tmp_path, 4, skip_invalid=True)
    assert len(examples) == 4 and size == 10 and skipped == {"invalid JSON": 1}


def test_report_commands_carry_skip_invalid_when_the_report_does(capsys):
    assert results.main(["--commands", "--skip-invalid", "--only", "minilm/git"]) == 0
    (command,) = capsys.readouterr().out.splitlines()
    assert command.endswith(" --skip-invalid")
    assert build_parser().parse_args(shlex.split(command)[1:]).skip_invalid
