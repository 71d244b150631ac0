"""The shadow audit of a serving worker (docs/monitoring.md, "In the worker").

A seeded share `audit_fraction` of the rows served with the configured (certified) policy, or after an alarm
with the fallback, also runs to full depth. Each audited row feeds the `DisagreementMonitor` one label-free bit: does the served answer differ from full
depth's? When the monitor alarms, the service serves full depth from then on (`EarlyExitService.default_policy`).

The audit runs every exit of the row alone (`forward_all_exits`), so an audit record holds what calibration
needs to re-run Learn-then-Test (`epee recertify`): the row's logits at every exit, its token count, what was
served and full depth's prediction, and the request id (to join labels a site may have). Never the text.

When: `mode="background"` queues the rows for a worker thread, which runs them after the batch's answers have
gone out; `mode="tail"` runs them before `offer` returns, i.e. at the tail of the same batch. The queue is
bounded and `offer` waits when it is full, rather than dropping audits: which rows are audited must not depend
on load (and so, through length, on content), or the audited rows stop being a random sample.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..engine.model import EarlyExitModel
from ..engine.signals import layer_probs, predictions
from .monitor import DisagreementMonitor

logger = logging.getLogger(__name__)

AUDIT_MODES = ("background", "tail")
RECORD_FORMAT = "epee-audit/1"
QUEUE_ROWS = 256  # audits waiting for the background thread before `offer` waits


@dataclass
class AuditJob:
    """One audited row waiting for its full-depth pass: the row encoded alone and what was served."""

    request_id: str | None
    row: int  # the row's position in its request (0 for a one-row request)
    inputs: dict[str, torch.Tensor]
    prediction: Any  # served: a class index, or the sorted label indices of a multi-label row
    exit_layer: int
    policy: str


def prediction_of(probs: torch.Tensor, multi_label: bool) -> Any:
    """A row's prediction as JSON: the class index, or the sorted indices of the predicted labels."""
    predicted = predictions(probs, multi_label)
    return predicted.nonzero().flatten().tolist() if multi_label else int(predicted)


class Auditor:
    """Chooses, runs and records audits for one worker and feeds the monitor (see the module docstring).

    `choose()` is called once per eligible served row, in serving order, and draws from a seeded RNG only: the
    audit sample is independent of the rows' content. `offer` takes the chosen rows. Thread-safe between one
    serving thread and the audit thread."""

    def __init__(
        self,
        model: EarlyExitModel,
        monitor: DisagreementMonitor,
        fraction: float,
        seed: int = 0,
        mode: str = "background",
        records: str | Path | None = None,
    ):
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        if mode not in AUDIT_MODES:
            raise ValueError(f"mode must be one of {', '.join(AUDIT_MODES)}, got {mode!r}")
        self.model = model
        self.monitor = monitor
        self.fraction = float(fraction)
        self.mode = mode
        self.records = Path(records) if records else None
        self.failures = 0  # audits that raised (their type is logged, never their input)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._queue: queue.Queue[AuditJob] = queue.Queue(maxsize=QUEUE_ROWS)
        self._thread: threading.Thread | None = None

    @property
    def alarmed(self) -> bool:
        return self.monitor.alarmed

    def choose(self) -> bool:
        """Whether the next served row is audited. After an alarm rows are still audited: the monitor has
        nothing left to test, but their records are what `epee recertify` certifies the next setting on."""
        return self._rng.random() < self.fraction

    def offer(self, jobs: list[AuditJob]) -> None:
        """Audit `jobs`: now (`tail`), or queued for the background thread."""
        if self.mode == "tail":
            for job in jobs:
                self.audit(job)
            return
        if jobs and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="epee-audit", daemon=True)
            self._thread.start()
        for job in jobs:
            self._queue.put(job)

    def wait(self) -> None:
        """Block until every queued audit has run (tests, shutdown)."""
        self._queue.join()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                self.audit(job)
            finally:
                self._queue.task_done()

    def audit(self, job: AuditJob) -> dict[str, Any] | None:
        """Run one row to full depth, update the monitor, append the record; returns the record (None if the
        audit failed, which is logged by exception type only and counted)."""
        multi_label = self.model.multi_label
        try:
            with torch.inference_mode():
                device = self.model.device
                logits = self.model.forward_all_exits({k: t.to(device) for k, t in job.inputs.items()})[:, 0]
                length = int(self.model.backbone.embed(job.inputs)[1].sum())
            logits = logits.float().cpu()
            full = prediction_of(layer_probs(logits[-1], multi_label), multi_label)
        except Exception as error:  # an audit never fails the worker
            self.failures += 1
            logger.error("epee: an audit failed (%s); the monitor skips that row", type(error).__name__)
            return None
        record = {
            "format": RECORD_FORMAT,
            "request_id": job.request_id,
            "row": job.row,
            "policy": job.policy,
            "exit_layer": job.exit_layer,
            "prediction": job.prediction,
            "full_prediction": full,
            "disagree": job.prediction != full,
            "length": length,
            "logits": logits.tolist(),
        }
        with self._lock:
            if not self.monitor.alarmed:  # once raised, the alarm stays: the test is over
                self.monitor.update(record["disagree"])
                if self.monitor.alarmed:
                    self._log_alarm()
        if self.records is not None:
            self._append(record)
        return record

    def _log_alarm(self) -> None:
        """The one log line of an alarm: counts and the test, no request content."""
        monitor = self.monitor
        logger.warning(
            "epee: disagreement alarm at audited row %d (%d of %d disagreed with full depth; H0: rate <= %g; "
            "wealth %.4g >= 1/alpha = %g): serving full depth from now on",
            monitor.alarm_at, monitor.disagreements, monitor.audited, monitor.epsilon, monitor.wealth,
            1 / monitor.alpha,
        )  # fmt: skip

    def _append(self, record: dict[str, Any]) -> None:
        """One JSON line per audited row, written in one call (workers may share the file)."""
        try:
            self.records.parent.mkdir(parents=True, exist_ok=True)
            with self.records.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as error:
            logger.error("epee: cannot append to the audit records (%s)", type(error).__name__)

    def state(self) -> dict[str, Any]:
        """The monitor's state and the audit's own counts, for metrics and model describe."""
        with self._lock:
            state = self.monitor.state()
        state.pop("estimates")
        return {**state, "audit_fraction": self.fraction, "mode": self.mode, "failures": self.failures}
