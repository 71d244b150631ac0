"""The one thread that drives the layer-level scheduler of a KServe model server.

`predict` (on the event loop) hands each request to `SchedulerLoop.submit` and awaits the future it returns. The
loop thread admits what arrived, runs one scheduler step (one layer for every cohort in flight), resolves the
futures of the requests that exited, and goes again; it sleeps only when nothing waits and nothing runs. A request
thus joins at the next layer and is answered the moment it exits, with no HTTP round trip per step (TorchServe's
continuous batching needs one per step). The step runs off the event loop, so the server keeps accepting requests
while a layer computes (PyTorch releases the GIL in its kernels).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import epee_core  # its names load on first use: importing this module does not import torch

if TYPE_CHECKING:
    from epee_core import Answer, ContinuousBatcher

logger = logging.getLogger(__name__)


class SchedulerLoop:
    """Owns a `ContinuousBatcher` (which is not thread-safe): only the loop thread touches it.

    `on_answered(request_id, row, answer, model_ms, in_flight)` is called in the loop thread for every answer
    (logging and metrics)."""

    def __init__(self, make_batcher: Callable[[], ContinuousBatcher], on_answered: Callable[..., None]):
        self.make_batcher = make_batcher
        self.batcher = make_batcher()
        self.on_answered = on_answered
        self.inbox: deque[tuple[str, Any, Mapping[str, Any], Future]] = deque()
        self.waiting: dict[str, tuple[Any, Future]] = {}  # accepted, not yet answered: body row, future
        self.wakeup = threading.Condition()
        self.stopped = False
        self.steps = 0
        self.thread = threading.Thread(target=self.run, name="epee-scheduler", daemon=True)
        self.thread.start()

    def submit(self, request_id: str, row: Any, headers: Mapping[str, Any]) -> Future:
        """Queue a request (a TorchServe-style body row and its headers); the future resolves to its Answer."""
        future: Future = Future()
        with self.wakeup:
            self.inbox.append((request_id, row, headers, future))
            self.wakeup.notify()
        return future

    def stop(self) -> None:
        with self.wakeup:
            self.stopped = True
            self.wakeup.notify()
        self.thread.join(timeout=10)

    def run(self) -> None:
        while True:
            with self.wakeup:
                while not self.stopped and not self.inbox and not self.batcher.in_flight:
                    self.wakeup.wait()
                if self.stopped:
                    break
                arrived = list(self.inbox)
                self.inbox.clear()
            started = time.perf_counter()
            try:
                answers = self.admit(arrived)
                answers.update(self.step())
            except (
                Exception
            ) as error:  # the scheduler's state is unknown: fail what is in flight, start afresh
                logger.error("epee: scheduler step failed outside the service: %s", type(error).__name__)
                self.batcher = self.make_batcher()
                answers = {key: epee_core.failure_answer(error, server_fault=True) for key in self.waiting}
            model_ms = (time.perf_counter() - started) * 1000
            for request_id, answer in answers.items():
                self.answer(request_id, answer, model_ms)

    def admit(self, arrived: list[tuple[str, Any, Mapping[str, Any], Future]]) -> dict[str, Answer]:
        """Decode and queue the new requests; those refused at once are answered now."""
        refused = {}
        for request_id, row, headers, future in arrived:
            if not future.set_running_or_notify_cancel():
                continue  # the client went away before it was admitted
            self.waiting[request_id] = (row, future)
            answer = self.batcher.accept(request_id, row, headers, request_id)
            if answer is not None:
                refused[request_id] = answer
        return refused

    def step(self) -> dict[str, Answer]:
        """One scheduler step, if anything is in flight."""
        if not self.batcher.in_flight:
            return {}
        self.steps += 1
        return self.batcher.step()

    def answer(self, request_id: str, answer: Answer, model_ms: float) -> None:
        row, future = self.waiting.pop(request_id, (None, None))
        if future is None:
            return
        self.on_answered(request_id, row, answer, model_ms, self.batcher.in_flight)
        if not future.done():
            future.set_result(answer)
