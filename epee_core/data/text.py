"""Reading labelled text examples from JSON Lines files (docs/design.md, "Data formats")."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..engine.inputs import Example
from ..engine.spec import ConfigError
from .images import read_image_examples


def _example_from_record(record: dict, task: str, where: str) -> Example:
    def field(name: str, kind: type = str):
        if name not in record:
            raise ConfigError(f"{where}: missing field '{name}' (task {task})")
        value = record[name]
        if kind is str and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # integer class ids such as ADE's 0 / 1
        if not isinstance(value, kind):
            raise ConfigError(f"{where}: field '{name}' must be {kind.__name__}, got {value!r}")
        return value

    text = field("text")
    if task == "multi-label":
        labels = field("labels", list)
        return Example(text, labels=[str(label) for label in labels])
    if task == "relation-extraction":
        return Example(text, label=field("relation"), head=field("head"), tail=field("tail"))
    return Example(text, label=field("label"))


def read_examples(path: str | Path, task: str, max_samples: int | None = None) -> list[Example]:
    """Examples of a JSONL file in file order (the first `max_samples` if given)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: data file not found")
    examples = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise ConfigError(f"{path}:{number}: expected a JSON object")
            examples.append(_example_from_record(record, task, f"{path}:{number}"))
            if max_samples is not None and len(examples) >= max_samples:
                break
    if not examples:
        raise ConfigError(f"{path}: no examples")
    return examples


def read_task_examples(path: str | Path, task: str, split: str, max_samples: int | None = None) -> list:
    """The labelled examples of a data file for `task`: JSONL for text tasks; for image-classification a MedMNIST
    `.npz` (split `train` reads `train_*`, `dev` reads `val_*`, `eval` reads `test_*` else `val_*`) or an image
    folder. `split` only matters for `.npz` files."""
    if task == "image-classification":
        return read_image_examples(path, split, max_samples)
    return read_examples(path, task, max_samples)


def label_vocabulary(examples: list[Example], task: str) -> list[str]:
    """Sorted label names seen in the examples."""
    if task == "multi-label":
        return sorted({label for example in examples for label in example.labels or []})
    return sorted({example.label for example in examples if example.label is not None})


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
