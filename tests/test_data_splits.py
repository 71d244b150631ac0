"""The reports' cuts of a catalogued data set's dev split (epee_core.data.splits): a seeded random sample and the
rest, and two label-stratified halves written as files the `epee` commands read."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from epee_core.data.catalogue import DATASETS
from epee_core.data.sampling import random_sample_and_rest, stratified_halves
from epee_core.data.splits import dev_sample, write_dev_halves
from epee_core.engine.spec import ConfigError


def write_ade_dev(data_dir, rows: list[str]) -> None:
    (data_dir / "ade").mkdir()
    (data_dir / "ade" / "dev.jsonl").write_text("\n".join(rows) + "\n")


@given(st.lists(st.sampled_from("abcde"), max_size=60), st.integers(0, 3))
def test_dev_halves_cover_every_row_once_and_split_every_label_evenly(strata, seed):
    first, second = stratified_halves(strata, seed)
    assert sorted(first + second) == list(range(len(strata)))
    assert abs(len(first) - len(second)) <= 1
    for label in set(strata):
        assert abs(sum(strata[i] == label for i in first) - sum(strata[i] == label for i in second)) <= 1


@given(st.integers(0, 40), st.integers(0, 50), st.integers(0, 3))
def test_random_sample_and_rest_cover_every_item_once(count, size, seed):
    items = list(range(count))
    sample, rest = random_sample_and_rest(items, size, seed)
    assert len(sample) == min(size, count) and sorted(sample + rest) == items
    assert rest == sorted(rest)
    assert (sample, rest) == random_sample_and_rest(items, size, seed)


def test_a_sample_of_at_least_every_row_is_every_row_in_file_order():
    assert random_sample_and_rest([3, 1, 2], None) == ([3, 1, 2], [])
    assert random_sample_and_rest([3, 1, 2], 3) == ([3, 1, 2], [])


def test_dev_sample_follows_the_unusable_rows_rule(tmp_path):
    write_ade_dev(tmp_path, [json.dumps({"text": f"s {i}", "label": i % 2}) for i in range(10)] + ["{bad"])
    with pytest.raises(ConfigError, match=r"dev.jsonl:11: not valid JSON"):
        dev_sample(DATASETS["ade"], tmp_path, None)
    dev = dev_sample(DATASETS["ade"], tmp_path, 4, skip_invalid=True)
    assert len(dev.sample) == 4 and len(dev.examples) == 10 and dev.skipped_rows == {"invalid JSON": 1}
    assert {example.text for example in dev.sample + dev.rest} == {example.text for example in dev.examples}


def test_jsonl_dev_halves_keep_every_source_line_once_unusable_ones_too(tmp_path):
    rows = [json.dumps({"text": f"s {i}", "label": "ab"[i % 3 == 0]}) for i in range(21)] + ["{bad"]
    write_ade_dev(tmp_path, rows)
    first, second = write_dev_halves(DATASETS["ade"], tmp_path, tmp_path)
    first_lines, second_lines = first.read_text().splitlines(), second.read_text().splitlines()
    assert sorted(first_lines + second_lines) == sorted(rows)
    for label in "ab":
        counts = [
            sum(f'"label": "{label}"' in line for line in lines) for lines in (first_lines, second_lines)
        ]
        assert abs(counts[0] - counts[1]) <= 1


def test_image_dev_halves_split_the_val_arrays(tmp_path):
    (tmp_path / "pneumoniamnist").mkdir()
    labels = np.array([[i % 2] for i in range(9)], dtype=np.uint8)
    images = np.arange(9 * 4, dtype=np.uint8).reshape(9, 2, 2)
    np.savez(tmp_path / "pneumoniamnist" / "pneumoniamnist.npz", val_images=images, val_labels=labels)
    halves = write_dev_halves(DATASETS["pneumoniamnist"], tmp_path, tmp_path)
    assert [path.name for path in halves] == ["calibration.npz", "heldout.npz"]
    loaded = [np.load(path) for path in halves]
    assert sum(len(half["val_labels"]) for half in loaded) == 9
    assert sorted(np.concatenate([half["val_images"][:, 0, 0] for half in loaded]).tolist()) == sorted(
        images[:, 0, 0].tolist()
    )
