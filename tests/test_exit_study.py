"""scripts/exit_study.py: the `epee train` flags each variant prints (docs/training.md quotes them) set exactly the
training fields the script sets."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from epee_core.cli import build_parser
from epee_core.cli.train import train_config_from_args

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "exit_study.py"
spec = importlib.util.spec_from_file_location("exit_study", SCRIPT)
exit_study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(exit_study)


@pytest.mark.parametrize("name", sorted(exit_study.VARIANTS))
def test_a_variants_printed_flags_train_what_the_script_trains(name):
    fields = exit_study.VARIANTS[name]
    argv = ["train", "--task", "text-classification", "--backbone", "minilm", "--train", "t.jsonl",
            "--dev", "d.jsonl", "--output", "out", *exit_study.flags(fields).split()]  # fmt: skip
    config = train_config_from_args(build_parser().parse_args(argv))
    assert {field: getattr(config, field) for field in fields} == fields
