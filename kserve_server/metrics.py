"""Prometheus counters of `epee serve`, named as the TorchServe handler's model metrics (handlers/metrics.yaml).

They join KServe's own metrics on the server's `/metrics`. prometheus_client exposes a counter with a `_total`
suffix: `EpeeExitLayerRequests_total` here is TorchServe's `EpeeExitLayerRequests` (docs/kserve.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import Counter

if TYPE_CHECKING:
    from epee_core import Answer

EXIT_LAYER = Counter(
    "EpeeExitLayerRequests",
    "rows answered, by the layer they exited at",
    ["ModelName", "Policy", "ExitLayer"],
)
LAYERS_RUN = Counter("EpeeLayersRun", "backbone layers run, summed over answered rows", ["ModelName"])
LAYERS_SAVED = Counter(
    "EpeeLayersSaved", "backbone layers skipped by early exits, summed over answered rows", ["ModelName"]
)
ISOLATED = Counter(
    "EpeeIsolatedFailures", "requests failed alone after their engine call raised", ["ModelName", "Status",
                                                                                      "ErrorType"]
)  # fmt: skip


def record(model_name: str, answer: Answer, num_layers: int) -> None:
    """What the TorchServe handler counts for one answer: its rows' exit layers, layers run and saved, and an
    isolated failure."""
    if answer.failure is not None:
        ISOLATED.labels(model_name, str(answer.status), answer.failure).inc()
    for exit_layer in answer.row_exit_layers:
        EXIT_LAYER.labels(model_name, answer.policy, str(exit_layer)).inc()
        LAYERS_RUN.labels(model_name).inc(exit_layer)
        LAYERS_SAVED.labels(model_name).inc(num_layers - exit_layer)
