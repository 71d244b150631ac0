"""What the serving handler writes to the logs about each request: ids, sizes, outcome and timing, never content.

Clinical text and images are protected health information (PHI): a log line carries the request id, the body
size in bytes, the HTTP status, the exit layer and policy, the batch and the batch's model time, and nothing a
person wrote. Error *messages* stay out too (they may quote a field, e.g. an entity that does not occur in the
text); the client gets them in its response. Only `log_inputs: true` in the model YAML's `epee:` section (a
debugging aid for synthetic data) adds the request body, and the handler warns at start-up when it is on.
"""

from __future__ import annotations

from typing import Any

from .service import Answer, body_field, payload_size

DEBUG_INPUT_CHARS = 500  # with log_inputs, at most this much of a body per line


def request_body_size(row: Any) -> int:
    """Bytes of a TorchServe request row's body; 0 when it has none (form-encoded)."""
    field_name = body_field(row)
    return payload_size(row[field_name]) if field_name else 0


def request_line(
    request_id: str,
    row: Any,
    answer: Answer,
    batch_id: str,
    batch_size: int,
    model_ms: float,
    num_layers: int,
) -> str:
    """One log line per request, free of request content."""
    if answer.exit_layers is not None:
        layers = ",".join(str(layer) for layer in answer.exit_layers)
        outcome = (
            f"{len(answer.exit_layers)} rows, exit layers {layers} of {num_layers}, policy {answer.policy}"
        )
    elif answer.exit_layer is not None:
        outcome = f"exit layer {answer.exit_layer} of {num_layers}, policy {answer.policy}"
    elif answer.failure is not None:
        outcome = f"failed alone ({answer.failure})"
    else:
        outcome = "refused"
    return (
        f"epee request {request_id}: {request_body_size(row)} bytes, status {answer.status}, {outcome}, "
        f"batch {batch_id} of {batch_size}, model {model_ms:.1f} ms"
    )


def debug_input_line(request_id: str, row: Any) -> str:
    """The request body itself, for `log_inputs: true` only (synthetic data, never PHI)."""
    field_name = body_field(row)
    body = row[field_name] if field_name else row
    if isinstance(body, (bytes, bytearray)):
        body = bytes(body[:DEBUG_INPUT_CHARS]).decode("utf-8", errors="backslashreplace")
    return f"epee request {request_id} input (log_inputs is on): {str(body)[:DEBUG_INPUT_CHARS]!r}"
