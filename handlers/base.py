"""The shared TorchServe handler: base_handler's life cycle around an `epee_core` service.

initialize → read and validate the model YAML (TorchServe's keys and the `epee:` section), load the model
directory from the archive onto the worker's device (`cuda:{gpu_id}` when TorchServe gives the worker a GPU and
CUDA is there, else the CPU);
preprocess → the service decodes and validates each request on its own (plain or Open Inference Protocol);
inference → the service runs the valid requests through the engine (grouped by policy, failures isolated per
request); postprocess → answers, per-request status, batch headers, request log lines and metrics. `handle` keeps anything that still escapes from failing the
batch inside TorchServe. Subclasses pick the service.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path

import torch
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

import epee_core
from epee_core import (
    ARCHIVE_MODEL_DIR,
    Answer,
    ContinuousBatcher,
    EarlyExitModel,
    EarlyExitService,
    ServeConfig,
    debug_input_line,
    failure_answer,
    request_line,
)

logger = logging.getLogger(__name__)

# Declared under model_metrics in metrics.yaml; dimension order must match the declaration there.
EXIT_LAYER_METRIC = "EpeeExitLayerRequests"
LAYERS_RUN_METRIC = "EpeeLayersRun"
LAYERS_SAVED_METRIC = "EpeeLayersSaved"
ISOLATED_METRIC = "EpeeIsolatedFailures"
BATCH_METRIC = "EpeeBatches"
AUDITED_METRIC = "EpeeAuditedRows"  # audited rows so far, by whether they disagreed with full depth
WEALTH_METRIC = "EpeeAuditWealth"  # the monitor's wealth: the alarm is at 1/alpha
FALLBACK_METRIC = "EpeeFallback"  # 1 once the alarm switched the worker to full depth
DRIFT_METRIC = "EpeeExitDrift"  # the exit-layer drift detector: a warning at its threshold, never a fallback
BATCH_SIZE_HEADER = "X-EPEE-Batch-Size"
BATCH_ID_HEADER = "X-EPEE-Batch-Id"
GUARANTEE_HEADER = "X-EPEE-Guarantee"  # what `epee calibrate` certified for the configured policy
SCHEDULER_HEADER = "X-EPEE-Scheduler"  # "continuous" on answers of the layer-level scheduler


def reason_phrase(message: str) -> str:
    """The HTTP reason phrase of an error: one line of ASCII (the JSON body keeps the exact message).

    TorchServe 0.12 frames the phrase with its length in characters but sends its UTF-8 bytes, so a non-ASCII
    phrase (a user's entity string, "30×20 pixels") corrupts the frame and kills the worker with its batch.
    """
    return " ".join(message.encode("ascii", "backslashreplace").decode("ascii").split())


class EarlyExitHandler(BaseHandler):
    """Serves an `epee package` archive; `service_class` decides how a request body is decoded."""

    service_class: type[EarlyExitService] = EarlyExitService

    def initialize(self, context) -> None:
        self.context = context
        self.manifest = context.manifest
        config = ServeConfig.from_model_yaml(
            context.model_yaml_config or {}, source=f"{context.model_name} model YAML"
        )
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        device, dtype = config.placement(context.system_properties.get("gpu_id"))
        model_dir = Path(context.system_properties["model_dir"]) / ARCHIVE_MODEL_DIR
        model = EarlyExitModel.from_pretrained(
            model_dir, device=device, dtype=dtype, quantize=config.quantize, runtime=config.runtime_on(device)
        )
        version = (self.manifest or {}).get("model", {}).get("modelVersion")
        self.service = self.service_class(model, config, model_name=context.model_name, model_version=version)
        continuous = bool((context.model_yaml_config or {}).get("continuousBatching", False))
        self.batcher = ContinuousBatcher(self.service, config.scheduler_limits) if continuous else None
        # requests that were sent a continuing chunk (their head is committed)
        self.streaming: set[str] = set()
        self.first_rows: dict[str, object] = {}  # continuous: each running request's body, for its log line
        self.initialized = True
        spec = self.service.spec
        logger.info(
            "epee: %s %s, %d layers, policy %s, device %s, dtype %s, quantize %s, runtime %s, %d torch threads, "
            "scheduler %s, engine %s",
            context.model_name,
            spec.task,
            spec.num_layers,
            config.policy.describe(),
            model.device,
            str(model.dtype).removeprefix("torch."),
            config.quantize,
            model.runtime,
            torch.get_num_threads(),
            f"continuous ({self.batcher.scheduler.limits.cohort_threads} cohort threads)"
            if continuous
            else "batch",
            Path(epee_core.__file__).parent,  # the copy bundled in the archive (packaging.py)
        )
        if config.log_inputs:
            logger.warning("epee: %s has log_inputs on: request bodies go to the logs (never with PHI)",
                           context.model_name)  # fmt: skip
        if config.audit_fraction:
            logger.info("epee: shadow audit of %g of the rows (%s), alarm at level %g against disagreement "
                        "rate %g", config.audit_fraction, config.audit_mode, config.audit_alpha,
                        config.monitored_rate)  # fmt: skip
        self.audited_reported = (0, 0)  # audited rows and disagreements already counted in the metric

    def describe_handle(self) -> str:
        """Model describe (`GET /models/NAME?customized=true`): the policy served, the guarantee, and the audit
        and drift state, as JSON (TorchServe shows it as `customizedMetadata`)."""
        return json.dumps(
            {"guarantee": self.service.config.guarantee, **self.service.monitoring()}, default=str
        )

    def handle(self, data: list, context) -> list[dict]:
        """base_handler's `handle`, with a last line of defence: TorchServe answers a batch whose handler raised
        with 503 for every request and logs a traceback that may quote input, so nothing is allowed out."""
        if self.batcher is not None and not self._is_describe():
            return self.handle_step(data)
        try:
            return super().handle(data, context)
        except Exception as error:
            logger.error("epee: batch of %d failed outside the service: %s", len(data), type(error).__name__)
            answers = [failure_answer(error, server_fault=True) for _ in data]
            return self.respond(answers, uuid.uuid4().hex[:12])

    # --- continuous batching: one call, one scheduler step ----------------------------------------------------

    def handle_step(self, data: list) -> list:
        """Admit the new requests of `data`, run one scheduler step, answer what finished and keep the rest."""
        context = self.context
        request_ids = [context.get_request_id(index) for index in range(len(data))]
        try:
            answers = self.step_answers(data, request_ids)
        except Exception as error:  # the scheduler's state is unknown: fail what is in flight, start afresh
            logger.error("epee: step of %d requests failed outside the service: %s", len(data),
                         type(error).__name__)  # fmt: skip
            self.batcher = ContinuousBatcher(self.service, self.service.config.scheduler_limits)
            answers = {index: failure_answer(error, server_fault=True) for index in range(len(data))}
        return self.respond_step(answers, request_ids)

    def step_answers(self, data: list, request_ids: list[str]) -> dict[int, Answer]:
        """The answers this step produces, by position in `data`; positions without one keep running."""
        batcher, live = self.batcher, set(request_ids)
        for gone in [key for key in batcher.requests if key not in live]:  # TorchServe dropped the client
            batcher.cancel(gone)
            self.streaming.discard(gone)
            self.first_rows.pop(gone, None)
        answers: dict[int, Answer] = {}
        started = time.perf_counter()
        for index, (row, request_id) in enumerate(zip(data, request_ids)):
            if request_id in batcher.requests:
                continue
            self.first_rows[request_id] = row
            headers = self.context.get_all_request_header(index)
            answer = batcher.accept(request_id, row, headers, request_id)
            if answer is not None:
                answers[index] = answer
        finished = batcher.step()
        self.model_ms = (time.perf_counter() - started) * 1000
        for index, request_id in enumerate(request_ids):
            if request_id in finished:
                answers[index] = finished[request_id]
        return answers

    def respond_step(self, answers: dict[int, Answer], request_ids: list[str]) -> list:
        """Per request: its answer (the last chunk of a stream, or a whole response), or an empty chunk that
        keeps it in flight. Status and headers go with a request's first response only: TorchServe commits them
        with the first chunk.

        Whether a request continues is said through `context.stopping_criteria`, not by setting the
        `ts_stream_next` header: TorchServe 0.12's worker (`ts/protocol/otf_message_handler.py`,
        `create_predict_response`) turns a handler's "true" into "false" unless a stopping criterion decides.
        Per request the criterion answers False (continue), True (the last chunk of a stream) or None (a whole
        response: no stream header at all)."""
        context, body = self.context, []
        guarantee = self.service.guarantee_header
        stop: list[bool | None] = []
        done = []
        for index, request_id in enumerate(request_ids):
            answer = answers.get(index)
            first = request_id not in self.streaming
            if first:
                context.set_response_content_type(index, "application/json")
                context.set_response_header(index, SCHEDULER_HEADER, "continuous")
                if guarantee:
                    context.set_response_header(index, GUARANTEE_HEADER, guarantee)
            if answer is None:
                self.streaming.add(request_id)
                stop.append(False)
                body.append("")
                continue
            if answer.status >= 500:
                answer.body["request_id"] = request_id
            if first:
                stop.append(None)
                if answer.status != 200:
                    context.set_response_status(answer.status, reason_phrase(answer.body["error"]), idx=index)
            else:  # the head went out with status 200; the last chunk carries the answer
                stop.append(True)
                self.streaming.discard(request_id)
            body.append(answer.body)
            done.append((request_id, self.first_rows.pop(request_id, {}), answer))
        context.stopping_criteria = [lambda _, decision=decision: decision for decision in stop]
        self.log_lines(done, "continuous", self.batcher.in_flight if self.batcher else 0)
        self.record_metrics([answer for _, _, answer in done], count_batch=False)
        return body

    def preprocess(self, data: list) -> list:
        self.rows = data
        headers = [self.context.get_all_request_header(index) for index in range(len(data))]
        request_ids = [self.context.get_request_id(index) for index in range(len(data))]
        return self.service.preprocess(data, headers, request_ids)

    def inference(self, decoded: list, *args, **kwargs) -> list:
        started = time.perf_counter()
        outcomes = self.service.inference(decoded)
        self.model_ms = (time.perf_counter() - started) * 1000
        return outcomes

    def postprocess(self, outcomes: list) -> list[dict]:
        answers = self.service.postprocess(outcomes)
        batch_id = uuid.uuid4().hex[:12]
        self.log_requests(answers, batch_id)
        self.record_metrics(answers)
        return self.respond(answers, batch_id)

    def respond(self, answers: list[Answer], batch_id: str) -> list[dict]:
        """Status, content type, batch headers and the calibrated guarantee per request; a 500 names its request
        id."""
        batch_size = str(len(answers))
        guarantee = self.service.guarantee_header
        for index, answer in enumerate(answers):
            self.context.set_response_content_type(index, "application/json")
            self.context.set_response_header(index, BATCH_SIZE_HEADER, batch_size)
            self.context.set_response_header(index, BATCH_ID_HEADER, batch_id)
            if guarantee:
                self.context.set_response_header(index, GUARANTEE_HEADER, guarantee)
            if answer.status >= 500:
                answer.body["request_id"] = self.context.get_request_id(index)
            if answer.status != 200:
                self.context.set_response_status(
                    answer.status, reason_phrase(answer.body["error"]), idx=index
                )
        return [answer.body for answer in answers]

    def log_requests(self, answers: list[Answer], batch_id: str) -> None:
        """One line per request: id, size, status, exit layer, failure type, timing; never the content."""
        request_ids = [self.context.get_request_id(index) for index in range(len(answers))]
        self.log_lines(list(zip(request_ids, self.rows, answers)), batch_id, len(answers))

    def log_lines(self, done: list[tuple[str, object, Answer]], batch_id: str, batch_size: int) -> None:
        """`request_line` for each (request id, body row, answer); the body only with `log_inputs`."""
        num_layers = self.service.spec.num_layers
        for request_id, row, answer in done:
            if self.service.config.log_inputs:
                logger.info(debug_input_line(request_id, row))
            logger.info(
                request_line(request_id, row, answer, batch_id, batch_size, self.model_ms, num_layers)
            )

    def record_metrics(self, answers: list[Answer], count_batch: bool = True) -> None:
        """Per row answered: a counter per exit layer (and policy), layers run and layers saved; one batch count
        (its size in requests) unless the layer-level scheduler answered them (`count_batch` False)."""
        metrics, model = self.context.metrics, self.context.model_name
        base = [Dimension("ModelName", model), Dimension("Level", "Model")]
        num_layers = self.service.spec.num_layers
        for answer in answers:
            if answer.failure is not None:
                failure_dims = [
                    *base,
                    Dimension("Status", str(answer.status)),
                    Dimension("ErrorType", answer.failure),
                ]
                metrics.add_counter(ISOLATED_METRIC, 1, dimensions=failure_dims)
            for exit_layer in answer.row_exit_layers:  # one per row (an inference request may hold several)
                exit_dims = [
                    *base,
                    Dimension("Policy", answer.policy),
                    Dimension("ExitLayer", str(exit_layer)),
                ]
                metrics.add_counter(EXIT_LAYER_METRIC, 1, dimensions=exit_dims)
                metrics.add_counter(LAYERS_RUN_METRIC, exit_layer, dimensions=list(base))
                metrics.add_counter(LAYERS_SAVED_METRIC, num_layers - exit_layer, dimensions=list(base))
        if count_batch:
            metrics.add_counter(
                BATCH_METRIC, 1, dimensions=[*base, Dimension("BatchSize", str(len(answers)))]
            )
        self.record_monitoring(base)

    def record_monitoring(self, base: list) -> None:
        """The audit monitor and the drift detector as they stand after this call's rows: the audited rows
        since the last call (by disagreement), the wealth, the fallback flag and the drift detector. Audits
        that run in the background show at the next call."""
        metrics, service = self.context.metrics, self.service
        if service.auditor is not None:
            state = service.auditor.state()
            counted, disagreed = self.audited_reported
            new_disagreements = state["disagreements"] - disagreed
            for disagree, count in (("true", new_disagreements),
                                    ("false", state["audited"] - counted - new_disagreements)):  # fmt: skip
                if count:
                    metrics.add_counter(
                        AUDITED_METRIC, count, dimensions=[*base, Dimension("Disagree", disagree)]
                    )
            self.audited_reported = (state["audited"], state["disagreements"])
            metrics.add_metric(WEALTH_METRIC, state["wealth"], "count", dimensions=list(base),
                               metric_type=MetricTypes.GAUGE)  # fmt: skip
            metrics.add_metric(FALLBACK_METRIC, int(service.alarmed), "count", dimensions=list(base),
                               metric_type=MetricTypes.GAUGE)  # fmt: skip
        if service.drift is not None:
            metrics.add_metric(DRIFT_METRIC, service.drift.detector, "count", dimensions=list(base),
                               metric_type=MetricTypes.GAUGE)  # fmt: skip
