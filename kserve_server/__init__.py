"""The KServe platform: `epee serve` runs an `epee_core` service as a KServe ModelServer (OIP v2, REST and gRPC).

A thin layer, as `handlers/` is for TorchServe: `model.py` is the `kserve.Model` (OIP tensors in, the service's
answers out, its rows awaited in the layer-level scheduler), `scheduler_loop.py` the one thread that drives the
scheduler, `metrics.py` the Prometheus counters, `server.py` the ModelServer (bind address, readiness, errors,
metadata). Nothing numeric lives here; `epee_core` never imports this package (tests/test_layers.py).
"""
