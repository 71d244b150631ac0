"""Unusable rows of a data file: one rule (stop at the first with FILE:LINE and the count of rows like it, or with
`skip_invalid` leave them out and count them per reason), and seeded label-stratified samples."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from helpers import MARKABLE_RELATION_ROW, UNMARKABLE_RELATION_ROW

from epee_core.data import UnusableRowsError, read_task_examples, stratified_sample
from epee_core.engine.inputs import Example
from epee_core.engine.spec import ConfigError

GOOD = {"text": "aspirin raises warfarin levels", "label": "yes"}


def write_lines(path, lines: list) -> str:
    """One JSONL line per item: dicts are dumped, strings written as they are (bad JSON)."""
    path.write_text("".join((json.dumps(line) if isinstance(line, dict) else line) + "\n" for line in lines))
    return str(path)


def test_bad_json_stops_at_the_first_row_and_counts_the_rows_like_it(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [GOOD, "{not json", GOOD, "[1, 2", {"text": "no label"}])
    with pytest.raises(UnusableRowsError) as raised:
        read_task_examples(path, "text-classification", "eval")
    assert str(raised.value) == (
        f"{path}:2: not valid JSON (Expecting property name enclosed in double quotes at column 2) (and 1 more row like it); "
        "other unusable rows: missing field 'label': 1; --skip-invalid leaves unusable rows out"
    )
    assert raised.value.skipped_rows == {"invalid JSON": 2, "missing field 'label'": 1}


def test_skip_invalid_leaves_the_rows_out_and_reports_the_count_per_reason(tmp_path, capsys):
    path = write_lines(
        tmp_path / "d.jsonl", [GOOD, "{not json", GOOD, "[1, 2", {"text": "no label"}, "", GOOD]
    )
    data = read_task_examples(path, "text-classification", "eval", skip_invalid=True)
    assert len(data.examples) == 3 and all(example.label == "yes" for example in data.examples)
    assert data.skipped_rows == {"invalid JSON": 2, "missing field 'label'": 1}
    assert capsys.readouterr().err == (
        f"epee: {path}: skipped 3 unusable rows (invalid JSON: 2, missing field 'label': 1)\n"
    )


def test_a_single_bad_row_has_no_count_suffix(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [GOOD, {"text": 7, "label": "yes"}])
    with pytest.raises(ConfigError) as raised:
        read_task_examples(path, "text-classification", "eval")
    assert str(raised.value) == (
        f"{path}:2: field 'text' must be a string, got 7; --skip-invalid leaves unusable rows out"
    )


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"text": "x", "label": True}, "field 'label' of the wrong type"),
        ({"text": "x", "label": 1.5}, "field 'label' of the wrong type"),
        ({"text": "   ", "label": "yes"}, "empty text"),
        ("[1, 2]", "not a JSON object"),
        ({"label": "yes"}, "missing field 'text'"),
    ],
)
def test_each_kind_of_unusable_row_has_its_reason(tmp_path, row, reason):
    path = write_lines(tmp_path / "d.jsonl", [GOOD, row])
    data = read_task_examples(path, "text-classification", "eval", skip_invalid=True, notify=lambda _: None)
    assert data.skipped_rows == {reason: 1} and len(data.examples) == 1


def test_integer_labels_are_class_names(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1}])
    assert [e.label for e in read_task_examples(path, "text-classification", "eval").examples] == ["0", "1"]


def test_relation_rows_whose_entities_cannot_be_marked_are_unusable(tmp_path):
    rows = [
        MARKABLE_RELATION_ROW,
        UNMARKABLE_RELATION_ROW,
        {"text": "NO synthase and eNOS", "head": "NO synthase", "tail": "iNOS", "relation": "None"},
        {"text": "aspirin raises warfarin", "head": "aspirin", "tail": "warfarin"},
    ]
    path = write_lines(tmp_path / "re.jsonl", rows)
    with pytest.raises(ConfigError) as raised:
        read_task_examples(path, "relation-extraction", "eval")
    assert str(raised.value) == (
        f"{path}:2: 'tail' entity 'mpa' does not occur in 'text' apart from the head entity "
        "(and 1 more row like it); other unusable rows: missing field 'relation': 1; "
        "--skip-invalid leaves unusable rows out"
    )
    data = read_task_examples(path, "relation-extraction", "eval", skip_invalid=True, notify=lambda _: None)
    assert data.skipped_rows == {"entities cannot be marked": 2, "missing field 'relation'": 1}
    assert [example.head for example in data.examples] == ["aspirin"]


def unknown_label_rows(tmp_path, source: str) -> tuple[str, str, list[str], str, str]:
    """A data file of four rows, the second and fourth with a label outside the known ones: its path, task, the
    known labels, where the first unknown label is and that label."""
    if source == "npz":
        path = tmp_path / "set.npz"
        np.savez(path, val_images=np.zeros((4, 8, 8), np.uint8), val_labels=np.array([[0], [2], [1], [2]]))
        return str(path), "image-classification", ["0", "1"], f"{path}:val_labels[1]", "2"
    rows = [
        GOOD,
        {"text": "b", "label": "maybe"},
        {"text": "c", "label": "no"},
        {"text": "d", "label": "maybe"},
    ]
    path = write_lines(tmp_path / "d.jsonl", rows)
    return path, "text-classification", ["no", "yes"], f"{path}:2", "maybe"


@pytest.mark.parametrize("source", ["jsonl", "npz"])
def test_labels_the_model_does_not_know_are_unusable(tmp_path, source):
    path, task, known, first, label = unknown_label_rows(tmp_path, source)
    with pytest.raises(ConfigError) as raised:
        read_task_examples(path, task, "eval", labels=known)
    assert str(raised.value).startswith(
        f"{first}: label {label!r} is not one the model knows ({', '.join(known)}) (and 1 more row like it);"
    )
    data = read_task_examples(path, task, "eval", skip_invalid=True, labels=known, notify=lambda _: None)
    assert data.skipped_rows == {f"unknown label {label!r}": 2} and len(data.examples) == 2


def test_multi_label_rows_with_an_unknown_label_are_unusable(tmp_path):
    rows = [{"text": "a", "labels": ["x"]}, {"text": "b", "labels": ["x", "q"]}, {"text": "c", "labels": "x"}]
    path = write_lines(tmp_path / "d.jsonl", rows)
    data = read_task_examples(
        path, "multi-label", "eval", skip_invalid=True, labels=["x", "y"], notify=lambda _: None
    )
    assert data.skipped_rows == {"field 'labels' of the wrong type": 1, "unknown label 'q'": 1}


def test_max_samples_counts_usable_rows_after_the_whole_file_is_checked(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [GOOD, "{bad", GOOD, GOOD, "{bad"])
    data = read_task_examples(
        path, "text-classification", "eval", 2, skip_invalid=True, notify=lambda _: None
    )
    assert len(data.examples) == 2 and data.skipped_rows == {"invalid JSON": 2}
    with pytest.raises(ConfigError, match=r"d.jsonl:2: .*\(and 1 more row like it\)"):
        read_task_examples(path, "text-classification", "eval", 1)


def test_a_file_of_only_unusable_rows_has_no_usable_examples(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ["{bad"])
    with pytest.raises(ConfigError, match="no usable examples"):
        read_task_examples(path, "text-classification", "eval", skip_invalid=True, notify=lambda _: None)


def test_unreadable_images_in_a_folder_follow_the_rule(tmp_path):
    from PIL import Image

    for name in ("normal", "pneumonia"):
        (tmp_path / name).mkdir()
        Image.new("L", (8, 8), 40).save(tmp_path / name / "a.png")
    (tmp_path / "normal" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ConfigError, match=r"broken.png: not a readable image"):
        read_task_examples(tmp_path, "image-classification", "eval")
    data = read_task_examples(
        tmp_path, "image-classification", "eval", skip_invalid=True, notify=lambda _: None
    )
    assert data.skipped_rows == {"unreadable image": 1} and len(data.examples) == 2


# --- stratified samples ----------------------------------------------------------------------------------------


def skewed(n_none: int = 820, n_rare: int = 150, n_tiny: int = 3) -> list[Example]:
    """Sorted by label, like DDI's training file: the first rows are all one class."""
    labels = ["effect"] * n_rare + ["int"] * n_tiny + ["None"] * n_none
    return [Example(f"row {i}", label=label) for i, label in enumerate(labels)]


def test_stratified_sample_keeps_every_labels_share_and_is_not_the_first_rows():
    examples = skewed()
    sample = stratified_sample(examples, 100, "relation-extraction", seed=0)
    counts = Counter(example.label for example in sample)
    assert len(sample) == 100 and counts["None"] in (84, 85) and counts["effect"] in (15, 16)
    assert counts["int"] >= 1  # a tiny class keeps a row
    assert sample != examples[:100]
    order = [examples.index(example) for example in sample]
    assert order == sorted(order)  # file order kept


def test_stratified_sample_is_seeded():
    examples = skewed()
    first = stratified_sample(examples, 50, "relation-extraction", seed=0)
    assert first == stratified_sample(examples, 50, "relation-extraction", seed=0)
    assert first != stratified_sample(examples, 50, "relation-extraction", seed=1)


def test_stratified_sample_of_everything_is_everything():
    examples = skewed(5, 3, 1)
    assert stratified_sample(examples, None, "text-classification") == examples
    assert stratified_sample(examples, 100, "text-classification") == examples


def test_multi_label_sample_is_stratified_by_label_set():
    examples = [Example(str(i), labels=["a"] if i % 4 else []) for i in range(400)]
    sample = stratified_sample(examples, 40, "multi-label", seed=3)
    assert Counter(tuple(example.labels) for example in sample) == {("a",): 30, (): 10}


def test_bad_json_message_is_whole_with_its_column(tmp_path):
    """The decoder's message alone stops mid-sentence ("Invalid control character at"): the column ends it."""
    path = write_lines(tmp_path / "d.jsonl", [GOOD, '{"text": "tab\there", "label": "yes"}'])
    with pytest.raises(
        UnusableRowsError, match=r":2: not valid JSON \(Invalid control character at column 14\);"
    ):
        read_task_examples(path, "text-classification", "eval")
