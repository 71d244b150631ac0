"""`epee serve`: a KServe ModelServer for one early-exit model, on REST (OIP v2) and gRPC.

KServe's pieces (its REST app and endpoints, its gRPC servicer, its data plane), with what KServe 0.21 leaves out:
- a bind address (its REST server binds 0.0.0.0 and its gRPC server [::], hard-coded);
- server readiness that waits for the model (KServe's `/v2/health/ready` says true with nothing loaded), and a
  model that loads *after* the server listens, so liveness answers and readiness says false until it is loaded;
- tritonclient.http's JSON without a content type is read as JSON (`JsonWhenUntyped`);
- a refusal keeps its own status and `{"error": ...}` body (`RequestRefused`; KServe maps InvalidInput to 400);
- a body KServe's request model refuses gets 422 `{"error": ...}` naming where it is wrong (`not_an_infer_request`);
  FastAPI's own reply echoes the input and fails with a 500 when it holds NaN or Infinity, which Python's json
  reads but JSON forbids;
- the model metadata's `parameters`: task, policy and the calibrated guarantee (KServe's response model drops
  them, so this one route is ours).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from concurrent import futures

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from grpc import aio
from kserve import ModelServer
from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING, MAX_GRPC_MESSAGE_LENGTH
from kserve.errors import ModelNotFound
from kserve.model_server import app
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
from kserve.protocol.grpc.server import GRPCServer
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.rest.server import RESTServer

from .model import EarlyExitKServeModel, RequestRefused

logger = logging.getLogger(__name__)
GRPC_LIMITS = {"grpc_max_send_message_length": MAX_GRPC_MESSAGE_LENGTH,
               "grpc_max_receive_message_length": MAX_GRPC_MESSAGE_LENGTH}  # fmt: skip


class ReadyWhenLoaded(DataPlane):
    """Server readiness (`/v2/health/ready`, gRPC ServerReady) is true only once every model is loaded."""

    async def ready(self) -> bool:
        models = self.model_registry.get_models().values()
        return bool(models) and all([await model.healthy() for model in models])


class BoundGRPCServer(GRPCServer):
    """KServe's gRPC server on a given host (KServe 0.21 binds [::] only); otherwise its `start`, unchanged."""

    def __init__(self, host: str, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._host = host

    async def start(self, max_workers):
        servicer = InferenceServicer(self._data_plane, self._model_repository_extension)
        self._server = aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=(LoggingInterceptor(), ExceptionToStatusInterceptor()),
            options=[
                ("grpc.max_send_message_length", self._kwargs.get("grpc_max_send_message_length")),
                ("grpc.max_receive_message_length", self._kwargs.get("grpc_max_receive_message_length")),
            ],
        )
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self._server)
        address = f"{self._host}:{self._port}"
        if not self._server.add_insecure_port(address):
            raise OSError(f"gRPC cannot listen on {address}")
        logger.info("epee: gRPC on %s", address)
        await self._server.start()
        await self._server.wait_for_termination()


class JsonWhenUntyped:
    """ASGI middleware: an inference request with neither a content type nor binary tensors is JSON.

    tritonclient.http sends JSON bodies without a content type; KServe would read such a body as binary tensors
    and refuse it for lacking the Inference-Header-Content-Length header."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].endswith("/infer"):
            names = {name.lower() for name, _ in scope["headers"]}
            if b"content-type" not in names and b"inference-header-content-length" not in names:
                scope = {**scope, "headers": [*scope["headers"], (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


async def refused(_, error: RequestRefused) -> JSONResponse:
    return JSONResponse(status_code=error.status, content={"error": error.reason})


async def not_an_infer_request(_, error: RequestValidationError) -> JSONResponse:
    """422 naming each place the body is wrong, without echoing its values (they may be NaN or Infinity)."""
    problems = [
        ".".join(str(part) for part in problem["loc"]) + ": " + problem["msg"] for problem in error.errors()
    ]
    return JSONResponse(
        status_code=422, content={"error": "not an inference request: " + "; ".join(problems[:5])}
    )


class EarlyExitModelServer(ModelServer):
    """One model, loaded in the background once the server listens (see the module docstring)."""

    def __init__(self, model: EarlyExitKServeModel, host: str, http_port: int, grpc_port: int):
        super().__init__(http_port=http_port, grpc_port=grpc_port, workers=1, enable_docs_url=False)
        self.model = model
        self.host = host
        self.dataplane = ReadyWhenLoaded(model_registry=self.registered_models)
        self.register_model(model)
        model.enable_latency_logging = False  # the service logs one line per request (request_line)
        app.add_exception_handler(RequestRefused, refused)
        app.add_exception_handler(RequestValidationError, not_an_infer_request)
        app.add_middleware(JsonWhenUntyped)
        app.add_api_route("/v2/models/{model_name}", self.model_metadata, methods=["GET"])

    async def model_metadata(self, model_name: str) -> dict:
        """KServe's model metadata plus `parameters` (task, policy, guarantee)."""
        if model_name != self.model.name:
            raise ModelNotFound(model_name)
        metadata = await self.dataplane.model_metadata(model_name)
        if self.model.version:
            metadata["versions"] = [self.model.version]
        metadata["parameters"] = self.model.metadata_parameters()
        return metadata

    def load_in_background(self) -> threading.Thread:
        def load() -> None:
            try:
                self.model.load()
            except Exception as error:  # nothing to serve: say why and end, so an orchestrator sees it fail
                logger.error("epee: error: cannot load %s: %s", self.model.name, error)
                os._exit(2)

        thread = threading.Thread(target=load, name="epee-load", daemon=True)
        thread.start()
        return thread

    def serve(self) -> None:
        """Listen on REST and gRPC, load the model, serve until SIGTERM/SIGINT."""
        rest = RESTServer(FASTAPI_APP_IMPORT_STRING, self.dataplane, self.model_repository_extension,
                          self.http_port, grace_period=self.grace_period, event_loop=self.event_loop,
                          timeout_keep_alive=self.timeout_keep_alive)  # fmt: skip
        rest.config.host = self.host
        self._rest_server = rest
        self._grpc_server = BoundGRPCServer(self.host, self.grpc_port, self.dataplane,
                                            self.model_repository_extension, kwargs=GRPC_LIMITS,
                                            grace_period=self.grace_period)  # fmt: skip
        self.servers = [rest.start(), self._grpc_server.start(self.max_threads)]
        self.setup_event_loop()
        self.register_signal_handler()
        self.load_in_background()
        asyncio.run(self._serve())
