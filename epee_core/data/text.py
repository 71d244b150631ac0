"""Reading labelled examples of a data file (docs/design.md, "Data formats"): JSON Lines for text tasks, MedMNIST
`.npz` or an image folder for images; every row is checked and unusable rows follow one rule (`rows.py`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from ..engine.inputs import Example, InputError, model_text
from ..engine.spec import ConfigError
from .images import read_image_examples
from .rows import RowProblems, TaskData, json_problem, unknown_label_reason

# The field holding a JSONL row's gold label(s), per text task.
LABEL_FIELDS = {"text-classification": "label", "multi-label": "labels", "relation-extraction": "relation"}
# Every field a JSONL row of the task must have.
_FIELDS = {
    "text-classification": ("text", LABEL_FIELDS["text-classification"]),
    "multi-label": ("text", LABEL_FIELDS["multi-label"]),
    "relation-extraction": ("text", "head", "tail", LABEL_FIELDS["relation-extraction"]),
}


def label_field(task: str) -> str:
    """The name of the field holding a JSONL row's gold label(s) for `task`."""
    return LABEL_FIELDS.get(task, "label")


class _BadRow(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _label_value(value, name: str) -> str:
    """A label as a string: strings, and integer class ids such as ADE's 0 / 1."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value
    raise _BadRow(
        f"field '{name}' of the wrong type",
        f"field '{name}' must be a label (string or integer), got {value!r}",
    )


def _example_from_record(record: dict, task: str) -> Example:
    for name in _FIELDS[task]:
        if name not in record:
            raise _BadRow(f"missing field '{name}'", f"missing field '{name}' (task {task})")
    for name in ("text", "head", "tail"):
        if name in _FIELDS[task] and not isinstance(record[name], str):
            raise _BadRow(
                f"field '{name}' of the wrong type", f"field '{name}' must be a string, got {record[name]!r}"
            )
    text = record["text"]
    if not text.strip():
        raise _BadRow("empty text", "field 'text' is empty")
    if task == "multi-label":
        labels = record["labels"]
        if not isinstance(labels, list):
            raise _BadRow(
                "field 'labels' of the wrong type", f"field 'labels' must be a list, got {labels!r}"
            )
        return Example(text, labels=[_label_value(label, "labels") for label in labels])
    if task == "relation-extraction":
        example = Example(
            text, label=_label_value(record["relation"], "relation"), head=record["head"], tail=record["tail"]
        )
        try:
            model_text(example, task)
        except InputError as error:
            raise _BadRow("entities cannot be marked", str(error)) from None
        return example
    return Example(text, label=_label_value(record["label"], "label"))


def example_labels(example, task: str) -> list[str]:
    """The labels an example carries (one for single-label tasks)."""
    if task == "multi-label":
        return list(example.labels or [])
    return [] if example.label is None else [example.label]


def check_labels(
    examples: list,
    task: str,
    labels: list[str] | None,
    problems: RowProblems,
    where: list[str],
    known_by: str,
) -> list:
    """The examples whose labels are all in `labels` (None: any); the others are recorded in `problems`."""
    if labels is None:
        return examples
    known, kept = set(labels), []
    for example, place in zip(examples, where):
        unknown = [label for label in example_labels(example, task) if label not in known]
        if unknown:
            problems.add(
                place,
                unknown_label_reason(unknown[0]),
                f"label {unknown[0]!r} is not one {known_by} knows ({', '.join(labels)})",
            )
        else:
            kept.append(example)
    return kept


def _read_jsonl(path: Path, task: str, problems: RowProblems) -> tuple[list[Example], list[str]]:
    """Every usable example of a JSONL file and where it is (`FILE:LINE`); unusable rows go to `problems`."""
    if task not in _FIELDS:
        raise ConfigError(f"task {task} does not read JSON Lines")
    examples, where = [], []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            place = f"{path}:{number}"
            try:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise _BadRow("invalid JSON", json_problem(error)) from None
                if not isinstance(record, dict):
                    raise _BadRow("not a JSON object", f"expected a JSON object, got {type(record).__name__}")
                examples.append(_example_from_record(record, task))
                where.append(place)
            except _BadRow as bad:
                problems.add(place, bad.reason, bad.detail)
    return examples, where


def read_task_examples(
    path: str | Path,
    task: str,
    split: str,
    max_samples: int | None = None,
    *,
    skip_invalid: bool = False,
    labels: list[str] | None = None,
    known_by: str = "the model",
    notify: Callable[[str], None] | None = None,
) -> TaskData:
    """The labelled examples of a data file for `task`: JSONL for text tasks; for image-classification a MedMNIST
    `.npz` (split `train` reads `train_*`, `dev` reads `val_*`, `eval` reads `test_*` else `val_*`) or an image
    folder. `split` only matters for `.npz` files.

    The whole file is checked (relation-extraction entities are marked as the model will mark them; with
    `labels`, every label must be one of them, `known_by` says whose list that is). Unusable rows stop with a
    ConfigError naming the first (`FILE:LINE`) and how many more there are, or with `skip_invalid` are left out
    and counted per reason (printed to stderr, returned as `skipped_rows`). `max_samples` then keeps the first N
    usable examples."""
    path = Path(path)
    problems = RowProblems(str(path))
    if task == "image-classification":
        examples, where = read_image_examples(path, split, problems=problems)
    elif not path.is_file():
        raise ConfigError(f"{path}: data file not found")
    else:
        examples, where = _read_jsonl(path, task, problems)
    examples = check_labels(examples, task, labels, problems, where, known_by)
    skipped = problems.settle(skip_invalid, notify)
    if not examples:
        raise ConfigError(f"{path}: no usable examples" + (f" ({problems.summary()})" if skipped else ""))
    return TaskData(str(path), examples[:max_samples], skipped)


def read_examples(path: str | Path, task: str, max_samples: int | None = None) -> list[Example]:
    """The examples of a JSONL file in file order (the first `max_samples` if given); unusable rows are an error."""
    return read_task_examples(path, task, "eval", max_samples).examples


def label_vocabulary(examples: list[Example], task: str) -> list[str]:
    """Sorted label names seen in the examples."""
    return sorted({label for example in examples for label in example_labels(example, task)})


def label_tensor(examples: list[Example], labels: list[str], task: str) -> torch.Tensor:
    """Class indices [N], or multi-hot float [N, C] for multi-label; unknown labels are an error."""
    index = {label: i for i, label in enumerate(labels)}

    def lookup(label: str) -> int:
        if label not in index:
            raise ConfigError(f"label '{label}' is not one the model knows ({', '.join(labels)})")
        return index[label]

    if task == "multi-label":
        hot = torch.zeros(len(examples), len(labels))
        for row, example in enumerate(examples):
            for label in example.labels or []:
                hot[row, lookup(label)] = 1.0
        return hot
    return torch.tensor([lookup(example.label) for example in examples], dtype=torch.long)
