"""Unusable rows of a data file, one rule for every command that reads one.

A row is unusable when it is not valid JSON, lacks a field or has one of the wrong type, names relation
entities that cannot be marked in its text, or carries a label the model (or the training set) does not know.
The whole file is scanned first; then, by default, the first unusable row stops the command with
`FILE:LINE: reason (and K more rows like it)`. With `skip_invalid` the rows are left out and counted per reason.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from ..engine.spec import ConfigError


class UnusableRowsError(ConfigError):
    """A data file holds unusable rows and they were not to be skipped; the message names the first one."""

    def __init__(self, message: str, skipped_rows: dict[str, int]):
        super().__init__(message)
        self.skipped_rows = skipped_rows


@dataclass
class RowProblems:
    """The unusable rows found in one data file: the first of each reason and how many there are."""

    path: str
    counts: Counter = field(default_factory=Counter)
    first: dict[str, tuple[str, str]] = field(default_factory=dict)  # reason → (where, detail)
    order: list[str] = field(default_factory=list)  # reasons in the order their first row appears

    def add(self, where: str, reason: str, detail: str) -> None:
        if reason not in self.first:
            self.first[reason] = (where, detail)
            self.order.append(reason)
        self.counts[reason] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        """Rows left out per reason, most frequent first (the `skipped_rows` record)."""
        return dict(sorted(self.counts.items(), key=lambda item: (-item[1], item[0])))

    def error(self) -> UnusableRowsError:
        """`FILE:LINE: reason (and K more rows like it)` for the first unusable row, and the other reasons."""
        reason = self.order[0]
        where, detail = self.first[reason]
        message = f"{where}: {detail}"
        more = self.counts[reason] - 1
        if more:
            message += f" (and {more} more row{'s' if more > 1 else ''} like it)"
        others = {name: count for name, count in self.as_dict().items() if name != reason}
        if others:
            listed = ", ".join(f"{name}: {count}" for name, count in others.items())
            message += f"; other unusable rows: {listed}"
        return UnusableRowsError(message + "; --skip-invalid leaves unusable rows out", self.as_dict())

    def summary(self) -> str:
        listed = ", ".join(f"{name}: {count}" for name, count in self.as_dict().items())
        return f"{self.path}: skipped {self.total} unusable row{'s' if self.total > 1 else ''} ({listed})"

    def settle(self, skip_invalid: bool, notify: Callable[[str], None] | None = None) -> dict[str, int]:
        """Raise for unusable rows unless `skip_invalid`; then report them (stderr) and return the counts."""
        if not self.total:
            return {}
        if not skip_invalid:
            raise self.error()
        (notify or print_notice)(self.summary())
        return self.as_dict()


def print_notice(message: str) -> None:
    """A notice for the user of a command: one `epee: ...` line on stderr."""
    print(f"epee: {message}", file=sys.stderr)


@dataclass
class TaskData:
    """The usable examples of a data file and what was left out (`skipped_rows`: reason → count)."""

    path: str
    examples: list
    skipped_rows: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)


def json_problem(error: json.JSONDecodeError) -> str:
    """What is wrong with a JSON line, whole: `not valid JSON (Invalid control character at column 12)`.

    The decoder's `msg` alone can end mid-sentence ("Invalid control character at"): the column completes it."""
    return f"not valid JSON ({error.msg.removesuffix(' at')} at column {error.colno})"


def unknown_label_reason(label: str) -> str:
    return f"unknown label {label!r}"
