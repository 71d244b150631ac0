"""Continuous batching for a service: requests in, answers out, one scheduler step per call.

`ContinuousBatcher` joins an `EarlyExitService` (decoding, validation, answers) to a `LayerScheduler` (the
layer-level engine). A platform calls `accept` for each new request, which answers at once when the request
cannot be served (its own 4xx, before any layer runs), and `step` to run one scheduler step, which returns the
answers of the requests that just finished. TorchServe's continuous batching calls both from one `handle()`
(handlers/base.py); `epee bench --arrival-rate` drives the scheduler itself, without answers to encode.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from .scheduler import Finished, LayerScheduler, SchedulerLimits
from .service import Answer, EarlyExitService, Prediction, Served, ServeRequest, failure_answer


class ContinuousBatcher:
    """Drives a `LayerScheduler` for `service` (see the module docstring). Not thread-safe: one driver."""

    def __init__(self, service: EarlyExitService, limits: SchedulerLimits | None = None):
        self.service = service
        self.scheduler = LayerScheduler(service.model, limits)
        self.requests: dict[Hashable, ServeRequest] = {}

    def accept(
        self, key: Hashable, row: Any, headers: Mapping[str, Any], request_id: str | None = None
    ) -> Answer | None:
        """Decode, validate and encode one request and queue it; returns its answer now if it cannot be served
        (None: it runs, and a later `step` answers it)."""
        decoded = self.service.preprocess([row], [headers], [request_id])[0]
        if isinstance(decoded, Answer):
            return decoded
        return self.submit(key, decoded)

    def submit(self, key: Hashable, request: ServeRequest) -> Answer | None:
        """Queue a decoded request; an input the encoder refuses is answered at once."""
        try:
            inputs = self.service.encode_inputs(request.model_inputs)
        except Exception as error:
            return failure_answer(error)
        self.requests[key] = request
        self.scheduler.submit(key, inputs, request.policy)
        return None

    def cancel(self, key: Hashable) -> None:
        """Forget a request whose client went away: it is answered to nobody."""
        self.requests.pop(key, None)

    @property
    def in_flight(self) -> int:
        """Requests accepted and not yet answered."""
        return len(self.requests)

    def step(self) -> dict[Hashable, Answer]:
        """One scheduler step; the answers of the requests that finished in it."""
        return {
            done.key: self._answer(done)
            for done in self.scheduler.step()
            if done.key in self.requests  # a cancelled request finishes unseen
        }

    def _answer(self, done: Finished) -> Answer:
        request = self.requests.pop(done.key)
        if done.error is not None:
            return failure_answer(done.error)
        rows = [Prediction(row.probs, row.exit_layer, row.entropy, request.policy) for row in done.rows or []]
        served = Served(request, rows)
        self.service.observe([served])
        return self.service.postprocess([served])[0]
