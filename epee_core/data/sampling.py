"""Seeded samples of a data set: label-stratified (`epee train --max-samples`, `--max-dev-samples`, the results
report's dev halves) or plain random (the performance report's timed rows)."""

from __future__ import annotations

import random
from collections import defaultdict

from .text import example_labels


def stratum(example, task: str) -> str:
    """The group an example is sampled in: its label; for multi-label its rarest label is not known here, so
    the sorted label set (empty sets form one group)."""
    return "|".join(sorted(example_labels(example, task)))


def stratified_sample(examples: list, size: int | None, task: str, seed: int = 0) -> list:
    """`size` examples drawn at random (seeded) so that every label keeps its share of the data, and every label
    keeps at least one example when `size` allows; never the first rows. The examples keep their file order.
    All of them when `size` is None or not smaller."""
    if size is None or size >= len(examples):
        return list(examples)
    if size < 1:
        return []
    groups: dict[str, list[int]] = defaultdict(list)
    for index, example in enumerate(examples):
        groups[stratum(example, task)].append(index)
    names = sorted(groups)
    # Largest-remainder allocation of `size` in proportion to each group, at least one each when possible.
    exact = {name: size * len(groups[name]) / len(examples) for name in names}
    quota = {name: int(exact[name]) for name in names}
    if size >= len(names):
        for name in names:
            quota[name] = max(quota[name], 1)
    rng = random.Random(seed)
    order = sorted(names, key=lambda name: (-(exact[name] - int(exact[name])), rng.random()))
    while sum(quota.values()) < size:
        for name in order:
            if sum(quota.values()) >= size:
                break
            if quota[name] < len(groups[name]):
                quota[name] += 1
    while sum(quota.values()) > size:  # the minimum of one each overshot: take from the largest groups
        largest = max(names, key=lambda name: (quota[name], name))
        quota[largest] -= 1
    chosen = [index for name in names for index in rng.sample(groups[name], quota[name])]
    return [examples[index] for index in sorted(chosen)]


def random_sample_and_rest(items: list, size: int | None, seed: int = 0) -> tuple[list, list]:
    """`size` items drawn at random (seeded; in draw order) and the others (in their order); all items and none
    when `size` is None or not smaller."""
    if size is None or len(items) <= size:
        return list(items), []
    chosen = random.Random(seed).sample(range(len(items)), size)
    taken = set(chosen)
    return [items[index] for index in chosen], [
        item for index, item in enumerate(items) if index not in taken
    ]


def stratified_halves(strata: list[str], seed: int = 0) -> tuple[list[int], list[int]]:
    """Row indices cut into two halves with every stratum split evenly (odd strata alternate which half gets
    the extra row), in file order."""
    groups: dict[str, list[int]] = defaultdict(list)
    for index, stratum in enumerate(strata):
        groups[stratum].append(index)
    rng, first, second, extra_to_first = random.Random(seed), [], [], True
    for name in sorted(groups):
        members = groups[name]
        rng.shuffle(members)
        cut = (len(members) + extra_to_first) // 2 if len(members) % 2 else len(members) // 2
        if len(members) % 2:
            extra_to_first = not extra_to_first
        first += members[:cut]
        second += members[cut:]
    return sorted(first), sorted(second)
