"""Entity markers on real-data shapes (GIT): a head inside the tail, entities nested in each other."""

from __future__ import annotations

import json

import pytest
from helpers import MARKABLE_RELATION_ROW, UNMARKABLE_RELATION_ROW, save_tiny_backbone

from epee_core.engine.inputs import InputError, mark_entities
from epee_core.engine.spec import ConfigError
from epee_core.training.trainer import TrainConfig, train


def test_head_inside_the_tail_is_marked_at_its_own_later_occurrence():
    text = "mechanism of human plasminogen activation by streptokinase and human plasmin ."
    assert mark_entities(text, "plasmin", "plasminogen") == (
        "mechanism of human [E2] plasminogen [/E2] activation by streptokinase and human [E1] plasmin [/E1] ."
    )


def test_first_occurrences_are_kept_when_they_do_not_overlap():
    text = "aspirin raises warfarin levels; aspirin again"
    assert mark_entities(text, "aspirin", "warfarin") == (
        "[E1] aspirin [/E1] raises [E2] warfarin [/E2] levels; aspirin again"
    )


def test_entity_nested_in_the_others_only_occurrence_cannot_be_marked():
    with pytest.raises(InputError, match="apart from the head entity"):
        mark_entities("in rats, mpa treatment raised triglycerides.", "mpa treatment", "mpa")


def test_training_stops_at_rows_whose_entities_cannot_be_marked_unless_skipped(tmp_path, tokenizer):
    backbone = save_tiny_backbone(tmp_path / "tiny-bert", tokenizer, num_layers=2)
    rows = [
        MARKABLE_RELATION_ROW,
        {"text": "aspirin and heparin were given", "head": "aspirin", "tail": "heparin", "relation": "None"},
        UNMARKABLE_RELATION_ROW,
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    config = TrainConfig(
        task="relation-extraction",
        backbone=str(backbone),
        train_path=str(data),
        dev_path=str(data),
        output=str(tmp_path / "model"),
        epochs=1,
    )
    with pytest.raises(ConfigError, match=rf"{data}:3: 'tail' entity 'mpa' does not occur"):
        train(config)
    config.skip_invalid = True
    summary = train(config)
    skipped = {"entities cannot be marked": 1}
    assert summary["train_samples"] == 2 and summary["skipped_rows"] == {"train": skipped, "dev": skipped}
