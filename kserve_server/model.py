"""The `kserve.Model` of `epee serve`: KServe's life cycle around an `epee_core` service and its layer-level scheduler.

load → read the model YAML (`ServeConfig`), load the model directory, build the task's service and the scheduler
loop; `ready` turns true only then (the server answers liveness, and readiness false, while it loads).
preprocess → KServe's decoded `InferRequest` (REST JSON, REST binary tensors, or gRPC) back into the Open Inference
Protocol body `epee_core.serving.oip` checks, so both platforms validate a request the same way.
predict → the request goes to the scheduler loop (`scheduler_loop.py`) and its answer is awaited there.
postprocess → an answer becomes an `InferResponse` whose parameters carry the calibrated guarantee; a refusal
becomes `RequestRefused`, which the server turns into its own 4xx (REST) or INVALID_ARGUMENT (gRPC).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path
from typing import Any

from kserve import Model
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse, to_http_parameters

import epee_core  # its names load on first use: the server listens before torch is imported

from . import metrics
from .scheduler_loop import SchedulerLoop

logger = logging.getLogger(__name__)

GUARANTEE_HEADER = "X-EPEE-Guarantee"  # as on TorchServe (handlers/base.py)
SCHEDULER_HEADER = "X-EPEE-Scheduler"
# Headers KServe has already acted on: it decoded a binary REST body into tensors, so the service must not refuse
# the request for binary data.
CONSUMED_HEADERS = ("inference-header-content-length",)
CONSUMED_INPUT_PARAMETERS = ("binary_data_size",)


class RequestRefused(InvalidInput):
    """A request the service refused: its HTTP status and message (gRPC: INVALID_ARGUMENT with the message)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def text_of(value: Any, name: str, row: int) -> Any:
    """A BYTES element as a string (gRPC and binary REST carry bytes); anything else as sent, for the service to
    check."""
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestRefused(400, f"input '{name}' row {row}: not UTF-8 text") from None
    return value


def tensor_data(tensor) -> list:
    """The flat data of one KServe `InferInput`, from JSON, gRPC contents or raw (binary) bytes."""
    if tensor._raw_data is not None:  # gRPC raw_input_contents or a binary REST tensor: KServe parses it
        try:
            data = tensor.as_numpy().reshape(-1).tolist()
        except Exception as error:
            raise RequestRefused(400, f"input '{tensor.name}': binary data does not fit its shape and datatype "
                                      f"({type(error).__name__})") from None  # fmt: skip
    else:
        data = tensor.data if tensor.data is not None else []
    if not isinstance(data, list):
        data = list(data)
    return [text_of(value, tensor.name, row) for row, value in enumerate(data)]


def parameters_of(parameters: Any, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """Parameters as plain JSON values (gRPC sends `InferParameter` messages)."""
    if not parameters:
        return {}
    plain = to_http_parameters(parameters) if not isinstance(parameters, dict) else dict(parameters)
    return {key: value for key, value in plain.items() if key not in drop}


def oip_request_body(request: InferRequest) -> dict[str, Any]:
    """The Open Inference Protocol JSON body of a decoded request, as `epee_core.serving.oip` reads it."""
    inputs = []
    for tensor in request.inputs:
        item: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape),
                                "data": tensor_data(tensor)}  # fmt: skip
        parameters = parameters_of(tensor.parameters, CONSUMED_INPUT_PARAMETERS)
        if parameters:
            item["parameters"] = parameters
        inputs.append(item)
    body: dict[str, Any] = {"inputs": inputs}
    if request.id:
        body["id"] = request.id
    parameters = parameters_of(request.parameters)
    if parameters:
        body["parameters"] = parameters
    if request.request_outputs:
        body["outputs"] = [{"name": output.name, **({"parameters": parameters_of(output.parameters)}
                                                     if output.parameters else {})}
                           for output in request.request_outputs]  # fmt: skip
    return body


class EarlyExitKServeModel(Model):
    """Serves one `epee train` model directory with its model YAML (the same pair `epee package` takes)."""

    def __init__(self, name: str, model_dir: str | Path, config_path: str | Path, version: str | None = None):
        super().__init__(name, return_response_headers=True)
        self.model_dir = Path(model_dir)
        self.config_path = Path(config_path)
        self.version = version
        self.service = None
        self.loop: SchedulerLoop | None = None

    # --- life cycle ------------------------------------------------------------------------------------------

    def load(self) -> bool:
        import torch

        config = epee_core.ServeConfig.load(self.config_path)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        device, dtype = config.placement(None)
        model = epee_core.EarlyExitModel.from_pretrained(
            self.model_dir,
            device=device,
            dtype=dtype,
            quantize=config.quantize,
            runtime=config.runtime_on(device),
        )
        service_class = (
            epee_core.ImageService if model.spec.task == "image-classification" else epee_core.TextService
        )
        self.service = service_class(model, config, model_name=self.name, model_version=self.version)
        self.loop = SchedulerLoop(
            lambda: epee_core.ContinuousBatcher(self.service, config.scheduler_limits), self.answered
        )
        logger.info("epee: %s %s, %d layers, policy %s, device %s, %d torch threads, layer-level scheduler",
                    self.name, model.spec.task, model.spec.num_layers, config.policy.describe(), model.device,
                    torch.get_num_threads())  # fmt: skip
        self.ready = True
        return self.ready

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.stop()
        self.ready = False

    @property
    def guarantee(self) -> str | None:
        return self.service.config.guarantee_header if self.service is not None else None

    def metadata_parameters(self) -> dict[str, Any]:
        """What the model metadata adds under `parameters`: task, layers, policy, and the certified guarantee."""
        if self.service is None:
            return {}
        spec, config = self.service.spec, self.service.config
        parameters = {"task": spec.task, "num_layers": spec.num_layers, "policy": config.policy.describe(),
                      "labels": list(spec.labels), "scheduler": "continuous"}  # fmt: skip
        if self.guarantee:
            parameters["guarantee"] = self.guarantee
        return parameters

    def get_input_types(self) -> list[dict]:
        names = self.service.oip_inputs if self.service is not None else ()
        return [{"name": name, "datatype": "BYTES", "shape": [-1]} for name in names]

    def get_output_types(self) -> list[dict]:
        if self.service is None:
            return []
        spec = self.service.spec
        return [
            {"name": "labels" if spec.multi_label else "label", "datatype": "BYTES", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(spec.labels)]},
            {"name": "exit_layer", "datatype": "INT32", "shape": [-1]},
            {"name": "entropy", "datatype": "FP32", "shape": [-1]},
            {"name": "policy", "datatype": "BYTES", "shape": [-1]},
        ]

    # --- requests --------------------------------------------------------------------------------------------

    async def predict(
        self,
        payload: InferRequest,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> InferResponse:
        """Await the request's answer from the scheduler loop; a refusal raises `RequestRefused`."""
        if not isinstance(payload, InferRequest):
            raise RequestRefused(400, "send an Open Inference Protocol v2 request to /v2/models/NAME/infer")
        # the server's own id: the scheduler's key, unique even when clients reuse an `id` (which the answer keeps)
        request_id = uuid.uuid4().hex
        request_headers = {key: value for key, value in (headers or {}).items()
                           if key.lower() not in CONSUMED_HEADERS}  # fmt: skip
        row = {"body": oip_request_body(payload)}
        answer = await asyncio.wrap_future(self.loop.submit(request_id, row, request_headers))
        if response_headers is not None:
            response_headers[SCHEDULER_HEADER] = "continuous"
            if self.guarantee:
                response_headers[GUARANTEE_HEADER] = self.guarantee
        if answer.status != 200:
            if answer.status >= 500:
                raise RuntimeError(f"request {request_id}: {answer.body['error']}")
            raise RequestRefused(answer.status, answer.body["error"])
        return self.response(payload, answer.body)

    def response(self, request: InferRequest, body: dict[str, Any]) -> InferResponse:
        """The service's OIP answer as a KServe response; the guarantee goes in its parameters."""
        outputs = [InferOutput(tensor["name"], tensor["shape"], tensor["datatype"], tensor["data"])
                   for tensor in body["outputs"]]  # fmt: skip
        parameters = {"guarantee": self.guarantee} if self.guarantee else None
        return InferResponse(
            response_id=body["id"],
            model_name=self.name,
            infer_outputs=outputs,
            model_version=self.version,
            parameters=parameters,
            use_binary_outputs=request.use_binary_outputs,
            requested_outputs=request.request_outputs,
        )

    def answered(self, request_id: str, row: Any, answer, model_ms: float, in_flight: int) -> None:
        """In the loop thread, for every answer: the request log line and the metrics, as on TorchServe."""
        service = self.service
        if service.config.log_inputs:
            logger.info(epee_core.debug_input_line(request_id, row))
        logger.info(epee_core.request_line(request_id, row, answer, "continuous", in_flight, model_ms,
                                           service.spec.num_layers))  # fmt: skip
        metrics.record(self.name, answer, service.spec.num_layers)
