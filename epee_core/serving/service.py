"""Serving requests (docs/design.md, "HTTP contract"): decode, run the engine, encode, in TorchServe's life cycle.

`preprocess` decodes and validates each request on its own, `inference` runs the valid ones through the engine,
`postprocess` turns each outcome into an answer. Everything here is plain Python + PyTorch so it can sit behind any
server; the TorchServe handlers only move rows in and answers out. A batch is *grouped* by policy: one engine call
per distinct policy, never one per request.

Fault isolation: no failure while handling one request may fail another. A request that cannot be served gets its
own 4xx `{"error": ...}` from validation; should an engine call raise anyway, its group is split in halves and
run again until the culprit is alone, so only that request fails (`Answer.failure` names the exception type) and
its batch-mates get the answers they would get alone.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..engine.inputs import Example, InputError, encode_texts, model_text
from ..engine.model import EarlyExitModel
from ..engine.policies import Policy, PolicyError
from ..engine.runner import run_bucketed
from ..engine.spec import ConfigError
from .config import ServeConfig

ARCHIVE_MODEL_DIR = "model"  # where `epee package` puts the model directory inside a .mar
POLICY_HEADER = "X-EPEE-Policy"
TEXT_FIELDS = ("text", "epee")
RELATION_FIELDS = ("text", "head", "tail", "epee")
PROBABILITY_DECIMALS = 6


class RequestError(ValueError):
    """A request that cannot be served: the HTTP status and a message naming the field."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# Exceptions that, raised by an engine call on one request alone, mean its input is to blame (a 400); anything
# else is the server's fault (a 500 naming the request).
INPUT_FAULTS = (UnicodeError, TypeError, ValueError, OverflowError, IndexError, KeyError)


@dataclass
class ServeRequest:
    """One decoded request: what the model reads (text with entity markers, or an image tensor) and its policy."""

    model_input: Any
    policy: Policy


@dataclass
class Prediction:
    """The engine's outcome for one request: its exit distribution, exit layer and entropy."""

    probs: list[float]
    exit_layer: int
    entropy: float
    policy: Policy


@dataclass
class Answer:
    """The reply to one request: HTTP status, the JSON body, and what the handler logs and counts.

    `exit_layer` and `policy` are set on success; `failure` names the exception type when a request was isolated
    after its engine call failed (the body then says so without quoting anything of the request)."""

    status: int
    body: dict[str, Any]
    exit_layer: int | None = None
    policy: str | None = None
    failure: str | None = None


def failure_answer(error: BaseException) -> Answer:
    """The answer of a request whose handling raised: 400 when its input is to blame, else 500; the message names
    the exception type only (an exception's message may quote the request)."""
    kind = type(error).__name__
    if isinstance(error, INPUT_FAULTS):
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

    def __init__(self, model: EarlyExitModel, config: ServeConfig):
        config.check_model(model.spec, "model YAML 'epee:'")
        self.model = model.eval()
        self.config = config
        self.spec = model.spec

    def decode(self, payload: Any, headers: Mapping[str, Any]) -> ServeRequest:
        raise NotImplementedError

    def encode_inputs(self, model_inputs: list[Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def request_policy(self, override: Any, headers: Mapping[str, Any]) -> Policy:
        """The policy of one request: the JSON `epee` field, else the `X-EPEE-Policy` header, else the default."""
        header_policy = _header(headers, POLICY_HEADER)
        if override is None and header_policy is not None:
            override = {"policy": header_policy.strip()}
        if override is None:
            return self.config.policy
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
        except PolicyError as error:
            raise RequestError(400, str(error)) from None
        return policy

    def preprocess(
        self, rows: Sequence[Any], headers: Sequence[Mapping[str, Any]]
    ) -> list[ServeRequest | Answer]:
        """Decode and validate every request on its own; one that cannot be served becomes its own Answer."""
        decoded: list[ServeRequest | Answer] = []
        for row, request_headers in zip(rows, headers):
            try:
                payload = request_payload(row, request_headers, self.config.max_body_bytes)
                decoded.append(self.decode(payload, request_headers))
            except RequestError as error:
                decoded.append(Answer(error.status, {"error": error.message}))
            except Exception as error:  # a decoding fault stays with its own request
                decoded.append(failure_answer(error))
        return decoded

    def inference(self, decoded: Sequence[ServeRequest | Answer]) -> list[Prediction | Answer]:
        """Run the valid requests, one engine call per distinct policy; refusals pass through in place."""
        outcomes: list[Prediction | Answer] = [item for item in decoded]  # type: ignore[misc]
        groups: dict[tuple, list[int]] = {}
        for index, item in enumerate(decoded):
            if isinstance(item, ServeRequest):
                key = (item.policy.name, tuple(sorted(item.policy.params.items())))
                groups.setdefault(key, []).append(index)
        for indices in groups.values():
            requests = [decoded[index] for index in indices]
            for index, outcome in zip(indices, self._run_isolated(requests)):  # type: ignore[arg-type]
                outcomes[index] = outcome
        return outcomes

    def _run_isolated(self, requests: list[ServeRequest]) -> list[Prediction | Answer]:
        """One engine call for requests that share a policy; if it raises, the halves run again on their own,
        down to the single request that fails, so a failure never reaches a batch-mate."""
        policy = requests[0].policy
        try:
            result = run_bucketed(self.model, self.encode_inputs([r.model_input for r in requests]), policy)
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
        return [
            Prediction(probs[row], exit_layers[row], entropies[row], policy) for row in range(len(requests))
        ]

    def postprocess(self, outcomes: Sequence[Prediction | Answer]) -> list[Answer]:
        """Every outcome as an answer: predictions become the JSON body of docs/design.md, refusals stay."""
        return [self.encode(outcome) if isinstance(outcome, Prediction) else outcome for outcome in outcomes]

    def answer(self, rows: Sequence[Any], headers: Sequence[Mapping[str, Any]]) -> list[Answer]:
        """A whole batch through the life cycle: one Answer per row, in order."""
        return self.postprocess(self.inference(self.preprocess(rows, headers)))

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
            policy=prediction.policy.name,
        )
        return Answer(200, body, prediction.exit_layer, prediction.policy.name)


class TextService(EarlyExitService):
    """text-classification, multi-label and relation-extraction: `{"text"}` (+ `"head"`, `"tail"`) or plain text."""

    def __init__(self, model: EarlyExitModel, config: ServeConfig):
        super().__init__(model, config)
        if model.tokenizer is None:
            raise ConfigError(f"task '{model.spec.task}' needs a tokenizer in the model directory")
        self.max_length = config.max_length or model.spec.max_length

    def decode(self, payload: Any, headers: Mapping[str, Any]) -> ServeRequest:
        fields = _json_fields(payload)
        relation = self.spec.task == "relation-extraction"
        allowed = RELATION_FIELDS if relation else TEXT_FIELDS
        unknown = sorted(key for key in fields if key not in allowed)
        if unknown:
            raise RequestError(
                400,
                f"unknown field '{unknown[0]}' for task {self.spec.task} (expected: {', '.join(allowed)})",
            )
        max_chars = self.config.max_text_chars
        example = Example(_text_field(fields, "text", max_chars))
        if relation:
            example.head = _text_field(fields, "head", max_chars)
            example.tail = _text_field(fields, "tail", max_chars)
        try:
            text = model_text(example, self.spec.task)
        except InputError as error:
            raise RequestError(400, str(error)) from None
        return ServeRequest(text, self.request_policy(fields.get("epee"), headers))

    def encode_inputs(self, model_inputs: list[Any]) -> dict[str, torch.Tensor]:
        return encode_texts(self.model.tokenizer, model_inputs, self.max_length)
