"""The dev split of a catalogued data set (`catalogue.py`) as the reports cut it: a seeded random sample and the
rest (the performance report's timed rows), or two label-stratified halves written to files (the results
report's calibration and held-out halves). One seed for every cut, so both reports draw the same rows."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .catalogue import DataSet
from .sampling import random_sample_and_rest, stratified_halves
from .text import label_field, read_task_examples

SPLIT_SEED = 0


@dataclass
class DevSample:
    """The usable rows of a dev split (in file order), a seeded random sample of them (in draw order), the other
    rows (in file order), and the unusable rows left out per reason."""

    examples: list
    sample: list
    rest: list
    skipped_rows: dict[str, int]


def dev_sample(
    dataset: DataSet,
    data_dir: Path,
    size: int | None,
    skip_invalid: bool = False,
    labels: list[str] | None = None,
    notify: Callable[[str], None] | None = None,
) -> DevSample:
    """`size` random usable rows of the dev split (PneumoniaMNIST: val), all of them when None or not fewer, and
    the rest; unusable rows follow the one rule of `data.rows`."""
    data = read_task_examples(
        data_dir / dataset.dev, dataset.task, "eval", skip_invalid=skip_invalid, labels=labels, notify=notify
    )
    sample, rest = random_sample_and_rest(data.examples, size, SPLIT_SEED)
    return DevSample(data.examples, sample, rest, data.skipped_rows)


def _jsonl_stratum(line: str, task: str) -> str:
    """A raw JSONL row's label as a string (unparsable rows form their own group, kept for the row rule)."""
    try:
        value = json.loads(line).get(label_field(task))
    except (json.JSONDecodeError, AttributeError):
        return "?"
    return json.dumps(sorted(map(str, value)) if isinstance(value, list) else value)


def halves_paths(dataset: DataSet, output_dir: Path) -> tuple[Path, Path]:
    """Where `write_dev_halves` writes the calibration and the held-out half."""
    suffix = ".npz" if dataset.task == "image-classification" else ".jsonl"
    return output_dir / f"calibration{suffix}", output_dir / f"heldout{suffix}"


def write_dev_halves(dataset: DataSet, data_dir: Path, output_dir: Path) -> tuple[Path, Path]:
    """Write the calibration and held-out halves of the dev split (PneumoniaMNIST: val) into `output_dir`, as
    files the `epee` commands read: JSONL rows as they are in the source (unusable ones too), or a `.npz` with
    `val_*` arrays. Returns both paths."""
    source, paths = data_dir / dataset.dev, halves_paths(dataset, output_dir)
    if dataset.task == "image-classification":
        with np.load(source) as arrays:
            images, labels = arrays["val_images"], arrays["val_labels"]
        strata = [str(label) for label in labels.reshape(len(labels), -1).tolist()]
        for path, rows in zip(paths, stratified_halves(strata, SPLIT_SEED)):
            np.savez_compressed(path, val_images=images[rows], val_labels=labels[rows])
        return paths
    lines = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    strata = [_jsonl_stratum(line, dataset.task) for line in lines]
    for path, rows in zip(paths, stratified_halves(strata, SPLIT_SEED)):
        path.write_text("".join(lines[index] + "\n" for index in rows), encoding="utf-8")
    return paths
