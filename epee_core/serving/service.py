"""Serving requests (docs/design.md, "HTTP contract"): decode, run the engine, encode, in TorchServe's life cycle.

`preprocess` decodes and validates each request on its own, `inference` runs the valid ones through the engine,
`postprocess` turns each outcome into an answer. Everything here is plain Python + PyTorch so it can sit behind any
server; the TorchServe handlers only move rows in and answers out. A batch is *grouped* by policy: one engine call
per distinct policy, never one per request.

A request holds one row (a plain `{"text": ...}` request, an image) or several (an Open Inference Protocol request,
`oip.py`, with n rows per input): every row of every request of a batch goes into the same engine call for its
policy, and each request gets its rows back in its own answer.

Fault isolation: no failure while handling one request may fail another. A request that cannot be served gets its
own 4xx `{"error": ...}` from validation; should an engine call raise anyway, its group is split in halves and
run again until the culprit is alone, so only that request fails (`Answer.failure` names the exception type) and
its batch-mates get the answers they would get alone. The unit is the request: a bad row of a multi-row request
fails that whole request (its answer names the row), never a batch-mate.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..engine.inputs import Example, InputError, encode_texts, model_text
from ..engine.model import EarlyExitModel
from ..engine.policies import Policy, PolicyError, make_policy, require_gate
from ..engine.runner import run_bucketed
from ..engine.signals import margin
from ..engine.spec import ConfigError
from . import oip
from .audit import AuditJob, Auditor, prediction_of
from .config import ServeConfig
from .monitor import DisagreementMonitor, ExitDriftDetector
from .scheduler import policy_key

ARCHIVE_MODEL_DIR = "model"  # where `epee package` puts the model directory inside a .mar
POLICY_HEADER = "X-EPEE-Policy"
TEXT_FIELDS = ("text", "epee")
RELATION_FIELDS = ("text", "head", "tail", "epee")
RELATION_INPUTS = ("text", "head", "tail")
PROBABILITY_DECIMALS = 6


logger = logging.getLogger(__name__)


class RequestError(oip.StatusError):
    """A request that cannot be served: the HTTP status and a message naming the field."""


# Exceptions that, raised by an engine call on one request alone, mean its input is to blame (a 400); anything
# else is the server's fault (a 500 naming the request).
INPUT_FAULTS = (UnicodeError, TypeError, ValueError, OverflowError, IndexError, KeyError)


@dataclass
class ServeRequest:
    """One decoded request: what the model reads, one input per row (text with entity markers, or an image
    tensor), and its policy; `oip` is set for an Open Inference Protocol request (answered in that form)."""

    model_inputs: list[Any]
    policy: Policy
    oip: oip.OipRequest | None = None
    request_id: str | None = None  # the server's id (audit records name it; never the content)

    @property
    def model_input(self) -> Any:
        """The input of a one-row request."""
        if len(self.model_inputs) != 1:
            raise ValueError(f"a request of {len(self.model_inputs)} rows has no single model input")
        return self.model_inputs[0]


@dataclass
class Prediction:
    """The engine's outcome for one row: its exit distribution, exit layer and entropy."""

    probs: list[float]
    exit_layer: int
    entropy: float
    policy: Policy


@dataclass
class Served:
    """The engine's outcome for one request: a prediction per row, in the request's order."""

    request: ServeRequest
    rows: list[Prediction]


@dataclass
class Answer:
    """The reply to one request: HTTP status, the JSON body, and what the handler logs and counts.

    `exit_layer` and `policy` are set on success (`exit_layers` too, one per row, for a multi-row request, whose
    `exit_layer` is its deepest row's); `failure` names the exception type when a request was isolated after its
    engine call failed (the body then says so without quoting anything of the request)."""

    status: int
    body: dict[str, Any]
    exit_layer: int | None = None
    policy: str | None = None
    failure: str | None = None
    exit_layers: list[int] | None = None

    @property
    def row_exit_layers(self) -> list[int]:
        """The exit layer of every row answered (none for a refusal)."""
        if self.exit_layers is not None:
            return list(self.exit_layers)
        return [] if self.exit_layer is None else [self.exit_layer]


def failure_answer(error: BaseException, server_fault: bool = False) -> Answer:
    """The answer of a request whose handling raised: 400 when its input is to blame, else (or with
    `server_fault`) 500; the message names the exception type only (an exception's message may quote the
    request)."""
    kind = type(error).__name__
    if isinstance(error, INPUT_FAULTS) and not server_fault:
        return Answer(400, {"error": f"the model cannot process this request ({kind})"}, failure=kind)
    return Answer(500, {"error": f"internal error while serving this request ({kind})"}, failure=kind)


def _header(headers: Mapping[str, Any], name: str) -> str | None:
    """A request header by case-insensitive name (TorchServe passes them as sent)."""
    wanted = name.lower()
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == wanted and isinstance(value, str):
            return value
    return None


def _content_type(headers: Mapping[str, Any], field_name: str) -> str:
    """The body's content type: TorchServe records it per input field (`{"body": {"content-type": ...}}`)."""
    per_field = headers.get(field_name)
    value = per_field.get("content-type") if isinstance(per_field, Mapping) else None
    value = value or _header(headers, "content-type") or ""
    return value.split(";")[0].strip().lower()


def payload_size(payload: Any) -> int:
    """Size in bytes of a request body as TorchServe hands it over (bytes, text, or parsed JSON)."""
    if isinstance(payload, (bytes, bytearray)):
        return len(payload)
    if isinstance(payload, str):
        return len(payload.encode("utf-8", errors="surrogatepass"))
    return len(json.dumps(payload, ensure_ascii=False).encode("utf-8", errors="surrogatepass"))


def body_field(row: Any) -> str | None:
    """Where a TorchServe request row keeps its body: `body` or `data` (None for a form-encoded request)."""
    return next((name for name in ("body", "data") if isinstance(row, Mapping) and name in row), None)


def request_payload(row: Any, headers: Mapping[str, Any], max_body_bytes: int) -> Any:
    """The body of one TorchServe request row: parsed JSON (a dict under `body`/`data`), text or raw bytes.

    Raises RequestError for an empty or form-encoded request (400), a body over `max_body_bytes` (413), and a
    body sent as `application/json` that TorchServe could not parse (400).
    """
    field_name = body_field(row)
    if field_name is None:
        raise RequestError(
            400,
            "empty request: send JSON (Content-Type: application/json) or text/plain; "
            "form-encoded bodies (curl's default --data) are not supported",
        )
    payload = row[field_name]
    size = payload_size(payload)
    if size > max_body_bytes:
        raise RequestError(
            413, f"request body is {size} bytes, the limit is {max_body_bytes} (max_body_bytes)"
        )
    if isinstance(payload, (bytes, bytearray)) and _content_type(headers, field_name) == "application/json":
        raise RequestError(400, "body is not valid JSON (Content-Type: application/json)")
    return payload


def _json_fields(payload: Any) -> dict[str, Any]:
    """A text request as a dict of fields: a JSON object as is, plain text as `{"text": ...}`."""
    if isinstance(payload, (bytes, bytearray)):
        try:
            payload = bytes(payload).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(400, "body is neither JSON nor UTF-8 text") from None
    if isinstance(payload, str):
        if payload.lstrip().startswith("{"):  # JSON sent as text/plain
            try:
                payload = json.loads(payload)
            except json.JSONDecodeError:
                return {"text": payload}
        else:
            return {"text": payload}
    if not isinstance(payload, dict):
        raise RequestError(
            400, f'expected a JSON object {{"text": ...}} or plain text, got JSON {type(payload).__name__}'
        )
    return payload


def _text_field(fields: Mapping[str, Any], name: str, max_chars: int) -> str:
    if name not in fields:
        raise RequestError(400, f"missing field '{name}'")
    value = fields[name]
    if not isinstance(value, str):
        raise RequestError(400, f"'{name}' must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # valid JSON may carry a lone surrogate ("\ud800") that no tokenizer takes
        raise RequestError(400, f"'{name}' is not valid Unicode (it holds a lone surrogate)") from None
    if not value.strip():
        raise RequestError(400, f"'{name}' is empty")
    if len(value) > max_chars:
        raise RequestError(
            413, f"'{name}' has {len(value)} characters, the limit is {max_chars} (max_text_chars)"
        )
    return value


class EarlyExitService:
    """Serves one early-exit model: request policies, grouped engine calls, answers as in docs/design.md.

    Subclasses say how a request body becomes a model input (`decode`) and how a list of inputs becomes a
    batch of tensors (`encode_inputs`); the text service is below, an image service can follow the same shape.
    """

    # the inputs of an Open Inference Protocol request, all required (subclasses say which)
    oip_inputs: tuple[str, ...] = ()

    def __init__(
        self,
        model: EarlyExitModel,
        config: ServeConfig,
        model_name: str = "model",
        model_version: str | None = None,
    ):
        config.check_model(model.spec, "model YAML 'epee:'")
        require_gate(config.policy, model.exit_gate)  # `policy: gate` on a model without gate.safetensors
        self.model = model.eval()
        self.config = config
        self.spec = model.spec
        self.model_name = model_name  # what an Open Inference Protocol answer names
        self.model_version = model_version
        self.fallback = make_policy("full")  # served instead of `config.policy` once the audit monitor alarms
        self.auditor = self._auditor()
        counts = (config.guarantee or {}).get("exit_counts")
        self.drift = ExitDriftDetector(counts) if counts else None  # a warning only: never a fallback

    def _auditor(self) -> Auditor | None:
        """The shadow audit of `audit_fraction` (None when 0): its monitor tests the guarantee's rate."""
        config = self.config
        if not config.audit_fraction:
            return None
        monitor = DisagreementMonitor(config.monitored_rate, config.audit_alpha)
        return Auditor(self.model, monitor, config.audit_fraction, config.audit_seed, config.audit_mode,
                       config.audit_records)  # fmt: skip

    @property
    def alarmed(self) -> bool:
        """Whether the audit monitor has alarmed: from then on the default policy is `fallback`."""
        return self.auditor is not None and self.auditor.alarmed

    @property
    def default_policy(self) -> Policy:
        """The policy of a request that names none: the configured one, or full depth after an alarm."""
        return self.fallback if self.alarmed else self.config.policy

    @property
    def guarantee_header(self) -> str | None:
        """The `X-EPEE-Guarantee` value; after an alarm it says that full depth is served and since when
        (`alarm_at`: the audited row that raised it)."""
        header = self.config.guarantee_header
        if header and self.alarmed:
            header += f"; fallback={self.fallback.name}; alarm_at={self.auditor.monitor.alarm_at}"
        return header

    def monitoring(self) -> dict[str, Any]:
        """The audit and drift state (model describe, metrics): what is monitored, never request content."""
        state: dict[str, Any] = {"policy": self.default_policy.describe(), "fallback": self.alarmed}
        if self.auditor is not None:
            state["audit"] = self.auditor.state()
        if self.drift is not None:
            state["drift"] = {"detector": self.drift.detector, "warning": self.drift.warning,
                              "rows": self.drift.rows, "first_warning_at": self.drift.first_warning_at}  # fmt: skip
        return state

    def observe(self, served: Sequence[Served]) -> None:
        """After serving: every row of the configured policy feeds the drift detector, and a seeded share of them
        goes to the audit (after an alarm: of the fallback's rows, whose records `epee recertify` reads). Rows a
        request's override chose are not what the certificate covers and are left out."""
        if self.auditor is None and self.drift is None:
            return
        try:
            self._observe(served)
        except Exception as error:  # monitoring never fails an answer
            logger.error("epee: monitoring skipped a batch (%s)", type(error).__name__)

    def _observe(self, served: Sequence[Served]) -> None:
        configured = policy_key(self.config.policy)
        audited, jobs = {configured, policy_key(self.default_policy)}, []
        for outcome in served:
            if policy_key(outcome.request.policy) not in audited:
                continue
            for number, (model_input, row) in enumerate(zip(outcome.request.model_inputs, outcome.rows)):
                if self.drift is not None and policy_key(row.policy) == configured:
                    self.drift.update(row.exit_layer)
                if self.auditor is not None and self.auditor.choose():
                    probs = torch.tensor(row.probs)
                    jobs.append(AuditJob(outcome.request.request_id, number, self.encode_inputs([model_input]),
                                         prediction_of(probs, self.spec.multi_label), row.exit_layer,
                                         row.policy.describe()))  # fmt: skip
        if jobs:
            self.auditor.offer(jobs)

    @property
    def device(self) -> torch.device:
        """Where the model lives: engine inputs are moved there before each call."""
        return self.model.device

    def decode(self, payload: Any, headers: Mapping[str, Any]) -> ServeRequest:
        raise NotImplementedError

    def decode_row(self, fields: Mapping[str, Any]) -> Any:
        """The model input of one row given as fields (input name → value); raises RequestError."""
        raise NotImplementedError

    def decode_oip(
        self, body: Mapping[str, Any], headers: Mapping[str, Any], request_id: str | None = None
    ) -> ServeRequest:
        """An Open Inference Protocol request: the protocol checked by `oip.decode_request`, then every row as a
        plain request's fields are; a bad row refuses the request, naming the row."""
        try:
            request = oip.decode_request(body, self.oip_inputs, self.spec.multi_label,
                                         self.config.max_rows_per_request, request_id)  # fmt: skip
        except oip.OipError as error:
            raise RequestError(error.status, error.message) from None
        inputs = []
        for number, fields in enumerate(request.rows):
            try:
                inputs.append(self.decode_row(fields))
            except RequestError as error:
                raise RequestError(error.status, f"row {number}: {error.message}") from None
        return ServeRequest(inputs, self.request_policy(request.override, headers), request, request_id)

    def encode_inputs(self, model_inputs: list[Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def check_fields(self, fields: Mapping[str, Any], allowed: Sequence[str]) -> None:
        """A 400 naming the first (sorted) field of a plain JSON request that the task does not take."""
        unknown = sorted(key for key in fields if key not in allowed)
        if unknown:
            raise RequestError(
                400,
                f"unknown field '{unknown[0]}' for task {self.spec.task} (expected: {', '.join(allowed)})",
            )

    def request_policy(self, override: Any, headers: Mapping[str, Any]) -> Policy:
        """The policy of one request: the JSON `epee` field, else the `X-EPEE-Policy` header, else the default."""
        header_policy = _header(headers, POLICY_HEADER)
        if override is None and header_policy is not None:
            override = {"policy": header_policy.strip()}
        if override is None:
            return self.default_policy
        if not isinstance(override, dict):
            raise RequestError(
                400, f'\'epee\' must be a JSON object such as {{"policy": "full"}}, got {override!r}'
            )
        if not self.config.allow_request_override:
            raise RequestError(
                403, "per-request policy override is disabled for this model (allow_request_override)"
            )
        try:
            policy = self.config.policy_for(override)
            policy.check_layers(self.spec.num_layers)
            require_gate(policy, self.model.exit_gate)
        except PolicyError as error:
            raise RequestError(400, str(error)) from None
        return policy

    def preprocess(
        self,
        rows: Sequence[Any],
        headers: Sequence[Mapping[str, Any]],
        request_ids: Sequence[str | None] | None = None,
    ) -> list[ServeRequest | Answer]:
        """Decode and validate every request on its own; one that cannot be served becomes its own Answer.

        A JSON object with an `inputs` field is an Open Inference Protocol request; `request_ids` (the server's
        ids) answer those that send no `id` of their own."""
        decoded: list[ServeRequest | Answer] = []
        for number, (row, request_headers) in enumerate(zip(rows, headers)):
            try:
                if _header(request_headers, oip.BINARY_HEADER) is not None:
                    raise RequestError(400, oip.BINARY_HINT)
                payload = request_payload(row, request_headers, self.config.max_body_bytes)
                body = oip.oip_body(payload)
                request_id = request_ids[number] if request_ids else None
                if body is None:
                    decoded.append(self.decode(payload, request_headers))
                    decoded[-1].request_id = request_id
                else:
                    decoded.append(self.decode_oip(body, request_headers, request_id))
            except RequestError as error:
                decoded.append(Answer(error.status, {"error": error.message}))
            except Exception as error:  # a decoding fault stays with its own request
                decoded.append(failure_answer(error))
        return decoded

    def inference(self, decoded: Sequence[ServeRequest | Answer]) -> list[Served | Answer]:
        """Run the valid requests, one engine call per distinct policy over all their rows; refusals pass through
        in place."""
        outcomes: list[Served | Answer] = [item for item in decoded]  # type: ignore[misc]
        groups: dict[tuple, list[int]] = {}
        for index, item in enumerate(decoded):
            if isinstance(item, ServeRequest):
                groups.setdefault(policy_key(item.policy), []).append(index)
        for indices in groups.values():
            requests = [decoded[index] for index in indices]
            for index, outcome in zip(indices, self._run_isolated(requests)):  # type: ignore[arg-type]
                outcomes[index] = outcome
        self.observe([outcome for outcome in outcomes if isinstance(outcome, Served)])
        return outcomes

    def _run_isolated(self, requests: list[ServeRequest]) -> list[Served | Answer]:
        """One engine call for the rows of requests that share a policy; if it raises, the halves run again on
        their own, down to the single request that fails, so a failure never reaches a batch-mate."""
        policy = requests[0].policy
        try:
            encoded = self.encode_inputs([row for request in requests for row in request.model_inputs])
            device = self.device
            result = run_bucketed(self.model, {name: t.to(device) for name, t in encoded.items()}, policy)
        except Exception as error:
            if len(requests) == 1:
                return [failure_answer(error)]
            middle = len(requests) // 2
            return self._run_isolated(requests[:middle]) + self._run_isolated(requests[middle:])
        probs, exit_layers, entropies = (
            result.probs.tolist(),
            result.exit_layer.tolist(),
            result.entropy.tolist(),
        )
        served, start = [], 0
        for request in requests:
            end = start + len(request.model_inputs)
            rows = [
                Prediction(probs[row], exit_layers[row], entropies[row], policy) for row in range(start, end)
            ]
            served.append(Served(request, rows))
            start = end
        return served

    def postprocess(self, outcomes: Sequence[Served | Answer]) -> list[Answer]:
        """Every outcome as an answer: a plain request's prediction becomes the JSON body of docs/design.md, an
        Open Inference Protocol request's rows its inference response; refusals stay."""
        answers = []
        for outcome in outcomes:
            if not isinstance(outcome, Served):
                answers.append(outcome)
            elif outcome.request.oip is None:
                answers.append(self.encode(outcome.rows[0]))
            else:
                answers.append(self.encode_oip(outcome.request.oip, outcome.rows))
        return answers

    def answer(
        self,
        rows: Sequence[Any],
        headers: Sequence[Mapping[str, Any]],
        request_ids: Sequence[str | None] | None = None,
    ) -> list[Answer]:
        """A whole batch through the life cycle: one Answer per request, in order."""
        return self.postprocess(self.inference(self.preprocess(rows, headers, request_ids)))

    def margins(self, rows: list[Prediction]) -> list[float]:
        """Each row's probability margin at its exit (`signals.margin`: top-1 − top-2, multi-label the least
        certain label's |2p − 1|): how far the answer was from flipping when it left."""
        probs = torch.tensor([row.probs for row in rows], dtype=torch.float32)
        return margin(probs, self.spec.multi_label).tolist()

    def encode_oip(self, request: oip.OipRequest, rows: list[Prediction]) -> Answer:
        outcomes = [
            oip.RowOutcome(row.probs, row.exit_layer, row.entropy, row_margin, row.policy.name)
            for row, row_margin in zip(rows, self.margins(rows))
        ]
        body = oip.encode_response(request, outcomes, self.spec.labels, self.spec.multi_label,
                                   self.model_name, self.model_version)  # fmt: skip
        layers = [row.exit_layer for row in rows]
        return Answer(200, body, max(layers), rows[0].policy.name, exit_layers=layers)

    def encode(self, prediction: Prediction) -> Answer:
        labels, probs = self.spec.labels, prediction.probs
        body: dict[str, Any] = {}
        if self.spec.multi_label:
            body["labels"] = [label for label, p in zip(labels, probs) if p >= 0.5]
        else:
            body["label"] = labels[max(range(len(probs)), key=probs.__getitem__)]
        body.update(
            probabilities={label: round(p, PROBABILITY_DECIMALS) for label, p in zip(labels, probs)},
            exit_layer=prediction.exit_layer,
            num_layers=self.spec.num_layers,
            entropy=round(prediction.entropy, PROBABILITY_DECIMALS),
            margin=round(self.margins([prediction])[0], PROBABILITY_DECIMALS),
            policy=prediction.policy.name,
        )
        return Answer(200, body, prediction.exit_layer, prediction.policy.name)


class TextService(EarlyExitService):
    """text-classification, multi-label and relation-extraction: `{"text"}` (+ `"head"`, `"tail"`) or plain text."""

    def __init__(self, model: EarlyExitModel, config: ServeConfig, **identity: Any):
        super().__init__(model, config, **identity)
        self.oip_inputs = RELATION_INPUTS if model.spec.task == "relation-extraction" else ("text",)
        if model.tokenizer is None:
            raise ConfigError(f"task '{model.spec.task}' needs a tokenizer in the model directory")
        self.max_length = config.max_length or model.spec.max_length

    def decode(self, payload: Any, headers: Mapping[str, Any]) -> ServeRequest:
        fields = _json_fields(payload)
        relation = self.spec.task == "relation-extraction"
        allowed = RELATION_FIELDS if relation else TEXT_FIELDS
        self.check_fields(fields, allowed)
        return ServeRequest([self.decode_row(fields)], self.request_policy(fields.get("epee"), headers))

    def decode_row(self, fields: Mapping[str, Any]) -> str:
        """The text the tokenizer sees: `text` checked, with entity markers around `head` and `tail` for
        relation extraction."""
        max_chars = self.config.max_text_chars
        example = Example(_text_field(fields, "text", max_chars))
        if self.spec.task == "relation-extraction":
            example.head = _text_field(fields, "head", max_chars)
            example.tail = _text_field(fields, "tail", max_chars)
        try:
            return model_text(example, self.spec.task)
        except InputError as error:
            raise RequestError(400, str(error)) from None

    def encode_inputs(self, model_inputs: list[Any]) -> dict[str, torch.Tensor]:
        return encode_texts(self.model.tokenizer, model_inputs, self.max_length)
