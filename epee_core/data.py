"""Reading labelled examples (JSON Lines, DESIGN §8) and turning them into model inputs for text tasks."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError
from .images import read_image_examples

ENTITY_MARKERS = ("[E1]", "[/E1]", "[E2]", "[/E2]")


class InputError(ValueError):
    """Content a request or a data file carries that the model cannot take; the message names the field."""


@dataclass
class Example:
    text: str
    label: str | None = None  # single-label tasks
    labels: list[str] | None = None  # multi-label
    head: str | None = None  # relation extraction: entity strings in `text`
    tail: str | None = None


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


def _find(
    text: str, entity: str, taken: tuple[int, int] | None = None, after: int = 0
) -> tuple[int, int] | None:
    """First occurrence of `entity` (exact case, else case-insensitive) from `after` on, not overlapping `taken`."""
    for haystack, needle in ((text, entity), (text.lower(), entity.lower())):
        start = haystack.find(needle, after)
        while start != -1:
            end = start + len(needle)
            if taken is None or end <= taken[0] or start >= taken[1]:
                return start, end
            start = haystack.find(needle, start + 1)
    return None


def mark_entities(text: str, head: str, tail: str) -> str:
    """Wrap the first occurrence of `head` in [E1]…[/E1] and of `tail` in [E2]…[/E2] (DESIGN §6).

    The tail's occurrence is the first that does not overlap the head's, so markers never nest.
    """
    for name, entity in (("head", head), ("tail", tail)):
        if not entity.strip():
            raise InputError(f"'{name}' is empty")
    head_span = _find(text, head)
    if head_span is None:
        raise InputError(f"'head' entity {head!r} does not occur in 'text'")
    tail_span = _find(text, tail, taken=head_span)
    while tail_span is None and head_span is not None:
        # The head's first occurrence may sit inside the tail's only one ('plasmin' in 'plasminogen'): try the
        # head's later occurrences before giving up.
        head_span = _find(text, head, after=head_span[0] + 1)
        tail_span = _find(text, tail, taken=head_span) if head_span is not None else None
    if head_span is None or tail_span is None:
        raise InputError(f"'tail' entity {tail!r} does not occur in 'text' apart from the head entity")
    inserts = sorted(
        [
            (head_span[0], "[E1] "),
            (head_span[1], " [/E1]"),
            (tail_span[0], "[E2] "),
            (tail_span[1], " [/E2]"),
        ],
        key=lambda insert: insert[0],
        reverse=True,
    )
    for position, marker in inserts:
        text = text[:position] + marker + text[position:]
    return text


def model_text(example: Example, task: str) -> str:
    """The string the tokenizer sees: the text, with entity markers for relation extraction."""
    if task == "relation-extraction":
        return mark_entities(example.text, example.head or "", example.tail or "")
    return example.text


def encode_texts(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenize a batch, right-padded to its longest row and truncated to `max_length` tokens."""
    tokenizer.padding_side = "right"
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return dict(encoded)


def add_entity_markers(tokenizer) -> None:
    """Register the entity markers as special tokens so they are never split (the caller resizes embeddings)."""
    tokenizer.add_special_tokens({"additional_special_tokens": list(ENTITY_MARKERS)})
