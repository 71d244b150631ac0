"""Is this TorchServe serving every archive of its model store? Exit 0 if so, 1 (with the reason) if not.

The image's HEALTHCHECK and the Kubernetes startup and readiness probes run it inside the container. GET /ping
alone cannot tell: in TorchServe 0.12 it answers 200 "Healthy" unless some registered model has fewer
"healthy" workers than its minWorkers, and a worker counts as healthy while it is still starting and loading
its model (and while it restarts, until it has been failing for the model's maxRetryTimeoutInSec). /ping is
also 200 with no model registered at all: an empty model store, or an archive that failed to load (TorchServe
logs "Failed to load model" and starts without it). Measured and read from the 0.12 jar: docs/kubernetes.md.

So this check requires, from the TorchServe config file ($TS_CONFIG_FILE, or the path given as argument):

1. GET <inference_address>/ping answers 200;
2. model_store holds at least one .mar, and GET <management_address>/models lists each of them;
3. each registered model has at least max(1, minWorkers) workers whose status is READY (model loaded).

The management API listens on 127.0.0.1: this runs inside the container as `python -m epee_core.ops.health`.
It imports nothing heavy (no torch): `epee_core` loads its public API lazily.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

from .torchserve import read_properties

DEFAULT_CONFIG = "/home/model-server/config/config.properties"
TIMEOUT = 4.0


def local_url(address: str) -> str:
    """A listen address as a URL this container can call (0.0.0.0 means "every interface": use loopback)."""
    return address.rstrip("/").replace("://0.0.0.0", "://127.0.0.1")


def get(url: str, headers: dict[str, str]) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def management_headers(workdir: Path) -> dict[str, str]:
    """With token authorization on, TorchServe writes key_file.json into its working directory."""
    key_file = workdir / "key_file.json"
    if not key_file.is_file():
        return {}
    key = json.loads(key_file.read_text(encoding="utf-8"))["management"]["key"]
    return {"Authorization": f"Bearer {key}"}


def check(config_path: Path, workdir: Path) -> str | None:
    """None if ready, otherwise why not."""
    config = read_properties(config_path)
    inference = local_url(config.get("inference_address", "http://127.0.0.1:8080"))
    management = local_url(config.get("management_address", "http://127.0.0.1:8081"))
    store = Path(config.get("model_store", "model_store"))
    if not store.is_absolute():
        store = workdir / store
    try:
        status, body = get(f"{inference}/ping", {})
        if status != 200:
            return f"/ping answered {status}: {body[:200].decode('utf-8', 'replace')}"
        archives = sorted(path.name for path in store.glob("*.mar")) if store.is_dir() else []
        if not archives:
            return f"no .mar archive in the model store {store}"
        headers = management_headers(workdir)
        status, body = get(f"{management}/models?limit=1000", headers)
        if status != 200:
            return f"{management}/models answered {status}: {body[:200].decode('utf-8', 'replace')}"
        models = json.loads(body).get("models", [])
        missing = [name for name in archives if name not in {model.get("modelUrl") for model in models}]
        if missing:
            return f"archives in {store} not registered (failed to load?): {', '.join(missing)}"
        for model in models:
            name = model["modelName"]
            status, body = get(f"{management}/models/{quote(name)}", headers)
            if status != 200:
                return f"describing {name} answered {status}"
            described = json.loads(body)[0]
            ready = sum(worker.get("status") == "READY" for worker in described.get("workers", []))
            needed = max(1, int(described.get("minWorkers", 1)))
            if ready < needed:
                return f"model {name}: {ready} of {needed} workers READY (still loading, or failing)"
    except (OSError, ValueError, KeyError, IndexError) as error:  # refused, timed out, unexpected answer
        return f"TorchServe not answering as expected: {error!r}"
    return None


def main(argv: list[str]) -> int:
    config_path = Path(argv[0] if argv else os.environ.get("TS_CONFIG_FILE", DEFAULT_CONFIG))
    problem = check(config_path, Path.cwd())
    if problem:
        print(f"not ready: {problem}", file=sys.stderr)
        return 1
    print("ready")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
