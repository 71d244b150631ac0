"""Open Inference Protocol (KServe v2) bodies: decode a request into rows, encode the rows' outcomes (docs/oip.md).

TorchServe routes `POST /v2/models/{name}/infer` to our handler with the body as sent; this module is the codec
and nothing else (no torch, no model). A request carries n rows per input, all of the same shape:

    {"id": "a1", "inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "data": ["...", "...", "..."]}],
     "parameters": {"policy": "full"}}

Every input of a task (text; text, head and tail; image) is required, datatype BYTES, shape [n] or [n, 1],
1 <= n <= the row limit, `data` a flat list of n strings. Anything else is refused with a message naming the
input; the service then checks each row as it checks a plain request, and a bad row fails its own request only.

The answer holds one output per field of the plain answer, n rows each: `label` BYTES [n] (multi-label:
`labels` BYTES [n], each a JSON list of label names), `probabilities` FP32 [n, C] (columns in the model's
label order, row-major), `exit_layer` INT32 [n], `entropy` FP32 [n], `margin` FP32 [n], `policy` BYTES [n].
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..engine.policies import ALL_PARAM_KEYS

DEFAULT_MAX_ROWS = 64
REQUEST_KEYS = ("id", "inputs", "outputs", "parameters", "model_name", "model_version")
INPUT_KEYS = ("name", "datatype", "shape", "data", "parameters")
# Input parameters a client may send: KServe's codec hint (`content_type: "str"`); Triton's binary extension
# (`binary_data_size`) is refused with a hint, since the data then is not in the JSON.
INPUT_PARAMETERS = ("content_type",)
# Request parameters besides the policy ones: Triton's `binary_data_output` (tritonclient sends it when no output
# is named) is accepted and ignored, answers are always JSON.
REQUEST_PARAMETERS = ("policy", "binary_data_output")
OUTPUT_PARAMETERS = ("binary_data",)
BINARY_HEADER = "Inference-Header-Content-Length"
BINARY_HINT = (
    "binary tensor data is not supported: send the data in the JSON body "
    "(tritonclient: set_data_from_numpy(..., binary_data=False))"
)
PROBABILITY_DECIMALS = 6
ROW_OUTPUTS = ("probabilities", "exit_layer", "entropy", "margin", "policy")  # after `label` / `labels`


class StatusError(ValueError):
    """A request refused with an HTTP status and a message (the base of `OipError` and the service's
    `RequestError`)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class OipError(StatusError):
    """An inference request that does not fit the protocol or the model: an HTTP status and a message."""


@dataclass
class OipRequest:
    """A decoded inference request: its id, the rows (input name → string), the policy override, the outputs
    asked for (None: all)."""

    id: str | None
    rows: list[dict[str, str]]
    override: dict[str, Any] | None
    outputs: list[str] | None


@dataclass
class RowOutcome:
    """What the engine answered for one row."""

    probs: Sequence[float]
    exit_layer: int
    entropy: float
    margin: float
    policy: str


def output_names(multi_label: bool) -> tuple[str, ...]:
    return ("labels" if multi_label else "label", *ROW_OUTPUTS)


def oip_body(payload: Any) -> dict[str, Any] | None:
    """The inference request in a body, or None if the body is not one (a plain request).

    A body is an inference request when it is a JSON object with an `inputs` field, whether TorchServe parsed it
    (sent as application/json) or passed the bytes on (tritonclient sends no content type).
    """
    if isinstance(payload, (bytes, bytearray, str)):
        start = payload.lstrip()[:1]
        if start not in (b"{", "{"):
            return None
        try:
            payload = json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
    if isinstance(payload, dict) and "inputs" in payload:
        return payload
    return None


def _unknown(keys: Sequence[str], allowed: Sequence[str], where: str) -> None:
    unknown = sorted(str(key) for key in keys if key not in allowed)
    if unknown:
        raise OipError(400, f"unknown field '{unknown[0]}' in {where} (expected: {', '.join(allowed)})")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _rows_of(tensor: Mapping[str, Any], name: str, max_rows: int) -> list[str]:
    """The n strings of one input tensor, after checking its datatype, shape and data."""
    _unknown(list(tensor), INPUT_KEYS, f"input '{name}'")
    parameters = tensor.get("parameters", {})
    if not isinstance(parameters, dict):
        raise OipError(400, f"input '{name}': 'parameters' must be an object")
    if "binary_data_size" in parameters:
        raise OipError(400, f"input '{name}': {BINARY_HINT}")
    _unknown(list(parameters), INPUT_PARAMETERS, f"the parameters of input '{name}'")
    for key in ("datatype", "shape", "data"):
        if key not in tensor:
            raise OipError(400, f"input '{name}': missing field '{key}'")
    if tensor["datatype"] != "BYTES":
        raise OipError(400, f"input '{name}': datatype must be BYTES, got {tensor['datatype']!r}")
    shape = tensor["shape"]
    if not isinstance(shape, list) or not shape or not all(_is_int(size) and size >= 0 for size in shape):
        raise OipError(400, f"input '{name}': shape must be a list of non-negative integers, got {shape!r}")
    if len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
        raise OipError(400, f"input '{name}': shape must be [n] or [n, 1] (one string per row), got {shape}")
    data = tensor["data"]
    if not isinstance(data, list):
        raise OipError(400, f"input '{name}': data must be a flat list of strings")
    if math.prod(shape) != len(data):
        raise OipError(
            400, f"input '{name}': shape {shape} holds {math.prod(shape)} elements, data has {len(data)}"
        )
    rows = shape[0]
    if rows == 0:
        raise OipError(400, f"input '{name}': no rows (shape {shape})")
    if rows > max_rows:
        raise OipError(
            413, f"input '{name}': {rows} rows, the limit is {max_rows} per request (max_rows_per_request)"
        )
    for number, value in enumerate(data):
        if not isinstance(value, str):
            raise OipError(400, f"input '{name}' row {number}: expected a string, got {type(value).__name__}")
    return data


def _override(parameters: Any) -> dict[str, Any] | None:
    """The policy override a request's parameters ask for: `policy` and any policy parameter side by side, as in
    the `epee:` section of the model YAML."""
    if not isinstance(parameters, dict):
        raise OipError(400, f"'parameters' must be an object, got {type(parameters).__name__}")
    allowed = (*REQUEST_PARAMETERS, *sorted(ALL_PARAM_KEYS))
    _unknown(list(parameters), allowed, "the request parameters")
    override = {key: value for key, value in parameters.items() if key == "policy" or key in ALL_PARAM_KEYS}
    return override or None


def _requested_outputs(outputs: Any, names: Sequence[str]) -> list[str] | None:
    if not isinstance(outputs, list):
        raise OipError(400, f"'outputs' must be a list, got {type(outputs).__name__}")
    requested: list[str] = []
    for output in outputs:
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise OipError(400, "each of 'outputs' must be an object with a string 'name'")
        name = output["name"]
        _unknown(list(output), ("name", "parameters"), f"output '{name}'")
        parameters = output.get("parameters", {})
        if not isinstance(parameters, dict):
            raise OipError(400, f"output '{name}': 'parameters' must be an object")
        _unknown(list(parameters), OUTPUT_PARAMETERS, f"the parameters of output '{name}'")
        if name not in names:
            raise OipError(400, f"unknown output '{name}' (this model answers: {', '.join(names)})")
        if name in requested:
            raise OipError(400, f"output '{name}' is asked for twice")
        requested.append(name)
    return requested or None


def decode_request(
    body: Mapping[str, Any],
    input_names: Sequence[str],
    multi_label: bool,
    max_rows: int = DEFAULT_MAX_ROWS,
    fallback_id: str | None = None,
) -> OipRequest:
    """Check an inference request against the model's inputs and cut it into rows; raises OipError.

    `input_names` are the inputs the task needs (all required); `fallback_id` answers a request that sent no id.
    """
    _unknown(list(body), REQUEST_KEYS, "the inference request")
    request_id = body.get("id", fallback_id)
    if request_id is not None and not isinstance(request_id, str):
        raise OipError(400, f"'id' must be a string, got {type(request_id).__name__}")
    inputs = body["inputs"]
    if not isinstance(inputs, list) or not inputs:
        raise OipError(400, f"'inputs' must be a non-empty list (this model takes: {', '.join(input_names)})")
    columns: dict[str, list[str]] = {}
    for tensor in inputs:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise OipError(400, "each of 'inputs' must be an object with a string 'name'")
        name = tensor["name"]
        if name not in input_names:
            raise OipError(400, f"unknown input '{name}' (this model takes: {', '.join(input_names)})")
        if name in columns:
            raise OipError(400, f"input '{name}' is given twice")
        columns[name] = _rows_of(tensor, name, max_rows)
    for name in input_names:
        if name not in columns:
            raise OipError(400, f"missing input '{name}' (this model takes: {', '.join(input_names)})")
    first = input_names[0]
    for name in input_names[1:]:
        if len(columns[name]) != len(columns[first]):
            raise OipError(
                400, f"input '{name}' has {len(columns[name])} rows, '{first}' has {len(columns[first])}"
            )
    rows = [{name: columns[name][number] for name in input_names} for number in range(len(columns[first]))]
    override = _override(body["parameters"]) if "parameters" in body else None
    outputs = _requested_outputs(body["outputs"], output_names(multi_label)) if "outputs" in body else None
    return OipRequest(request_id, rows, override, outputs)


def _tensor(name: str, datatype: str, shape: list[int], data: list) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def encode_response(
    request: OipRequest,
    rows: Sequence[RowOutcome],
    labels: Sequence[str],
    multi_label: bool,
    model_name: str,
    model_version: str | None = None,
) -> dict[str, Any]:
    """The inference response for a request's rows, in order: one output per field of the plain answer."""
    n, classes = len(rows), len(labels)
    if multi_label:
        label_name = "labels"
        label_data = [json.dumps([label for label, p in zip(labels, row.probs) if p >= 0.5]) for row in rows]
    else:
        label_name = "label"
        label_data = [labels[max(range(classes), key=row.probs.__getitem__)] for row in rows]
    probabilities = [round(p, PROBABILITY_DECIMALS) for row in rows for p in row.probs]
    tensors = [
        _tensor(label_name, "BYTES", [n], label_data),
        _tensor("probabilities", "FP32", [n, classes], probabilities),
        _tensor("exit_layer", "INT32", [n], [row.exit_layer for row in rows]),
        _tensor("entropy", "FP32", [n], [round(row.entropy, PROBABILITY_DECIMALS) for row in rows]),
        _tensor("margin", "FP32", [n], [round(row.margin, PROBABILITY_DECIMALS) for row in rows]),
        _tensor("policy", "BYTES", [n], [row.policy for row in rows]),
    ]
    outputs = {tensor["name"]: tensor for tensor in tensors}
    body: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        body["model_version"] = model_version
    if request.id is not None:
        body["id"] = request.id
    body["outputs"] = [outputs[name] for name in (request.outputs or outputs)]
    return body
