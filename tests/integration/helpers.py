"""Plain helpers for the integration tests: tiny model archives, derived configs, concurrent HTTP, metrics."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import requests
import yaml

from epee_core.cli import main
from epee_core.engine.model import EarlyExitModel
from epee_core.engine.policies import Policy
from epee_core.engine.runner import run_early_exit
from epee_core.ops.torchserve import TorchServe

ROOT = Path(__file__).resolve().parents[2]
ROOT_CONFIG = ROOT / "config.properties"
SITE_PACKAGES = Path(requests.__file__).resolve().parents[1]
# ADE-style sentences of different lengths: the text requests of the integration tests
SENTENCES = [
    "Pericardial hemorrhage due to acetylsalicylic acid.",
    "Thrombocytosis under ciprofloxacin.",
    "Hypercoagulability studies were negative.",
    "Report of two cases.",
    "A 77 year old male was referred with abdominal pain, jaundice and elevated transaminase levels.",
    "Transaminases promptly returned to normal after withdrawal of the laxative.",
    "Severe rash after amoxicillin.",
    "The patient recovered.",
]

# Hostile Open Inference Protocol bodies, kind → (raw body, expected status, fragment of the error); sent with
# `requests` next to tritonclient traffic (test_oip.py on TorchServe, test_kserve.py on `epee serve`)
HOSTILE = {
    "wrong shape": (b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "data": ["a b", "c"]}]}',
                    400, "shape [3] holds 3 elements, data has 2"),
    "wrong datatype": (b'{"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": [1.5]}]}',
                       400, "datatype must be BYTES"),
    "missing input": (b'{"inputs": [{"name": "txt", "datatype": "BYTES", "shape": [1], "data": ["Rash."]}]}',
                      400, "unknown input 'txt'"),
    "lone surrogate in a row": (
        b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["Rash.", "\\ud800 x"]}]}',
        400, "row 1: 'text' is not valid Unicode"),
    "n = 0": (b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [0], "data": []}]}', 400, "no rows"),
    "not JSON": (b'{"inputs": [', 400, "not valid JSON"),
    "too many rows": (b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [65], "data": ['
                      + b",".join([b'"Rash."'] * 65) + b"]}]}", 413, "the limit is 64"),
}  # fmt: skip


def write_model_yaml(path: Path, batch_size: int, max_batch_delay: int, **epee) -> Path:
    """A model YAML as `epee package --config` takes it: TorchServe keys + the `epee:` section."""
    config = {
        "minWorkers": 1,
        "maxWorkers": 1,
        "batchSize": batch_size,
        "maxBatchDelay": max_batch_delay,
        "responseTimeout": 60,
        "epee": epee,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def package(model_dir: Path, config: Path, name: str, store: Path, version: str = "1.0") -> Path:
    """`epee package`, as a user runs it; returns the archive."""
    assert main(["package", "--model", str(model_dir), "--config", str(config), "--name", name,
                 "--version", version, "--export-path", str(store)]) == 0  # fmt: skip
    return store / f"{name}.mar"


def package_model(
    work: Path,
    model,
    model_dir_name: str,
    config_name: str,
    name: str,
    batch_size: int,
    max_batch_delay: int,
    **epee,
) -> tuple[Path, Path, Path]:
    """`model` saved as WORK/MODEL_DIR_NAME, its model YAML WORK/CONFIG_NAME and `epee package` as NAME into
    WORK/model_store: (model directory, model YAML, model store)."""
    model_dir = work / model_dir_name
    model.save_pretrained(model_dir)
    config = write_model_yaml(work / config_name, batch_size, max_batch_delay, **epee)
    store = work / "model_store"
    package(model_dir, config, name, store)
    return model_dir, config, store


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for probe in sockets:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


def derive_config(target: Path, model_store: Path) -> Path:
    """The root config.properties on free ports (gRPC too), with absolute paths so it works from another
    directory."""
    ports = iter(free_ports(5))
    lines = []
    for line in ROOT_CONFIG.read_text(encoding="utf-8").splitlines():
        key = line.partition("=")[0].strip()
        if key in ("inference_address", "management_address", "metrics_address"):
            line = f"{key}=http://127.0.0.1:{next(ports)}"
        elif key == "metrics_config":
            line = f"metrics_config={ROOT / line.partition('=')[2].strip()}"
        elif key == "model_store":
            line = f"model_store={model_store}"
        lines.append(line)
    lines += [f"grpc_inference_port={next(ports)}", f"grpc_management_port={next(ports)}"]
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


@contextmanager
def running_torchserve(work: Path, store: Path, **options) -> Iterator[TorchServe]:
    """A TorchServe of `store` on the root config.properties at free ports (`derive_config`), run in WORK and
    stopped on exit."""
    server = TorchServe(derive_config(work / "config.properties", store), workdir=work, **options)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def clean_python(directory: Path) -> str:
    """A venv that sees torch, transformers and TorchServe but not an installed epee_core.

    Its only .pth file adds our site-packages as a plain path; the editable epee_core hook there is a .pth file
    of its own, which Python only runs inside a real site directory — so `import epee_core` fails.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(directory)], check=True)
    python = directory / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import site; print(site.getsitepackages()[0])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    (Path(site) / "epee_test_dependencies.pth").write_text(str(SITE_PACKAGES) + "\n")
    return str(python)


def post_all(url: str, calls: list[dict]) -> list[requests.Response]:
    """POST every call (requests keyword arguments) at once, so TorchServe can batch them; in call order."""
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(lambda call: requests.post(url, timeout=60, **call), calls))


METRIC_LINE = re.compile(r"^(\w+)\{(.*)\}\s+([0-9.eE+-]+)$")


def read_metrics(metrics_url: str, name: str, model: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Values of one Prometheus metric of one model, keyed by its labels (ModelName and Hostname dropped)."""
    values = {}
    for line in requests.get(f"{metrics_url}/metrics", timeout=10).text.splitlines():
        match = METRIC_LINE.match(line)
        if not match or match.group(1) != name:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
        if labels.pop("ModelName", None) == model:
            labels.pop("Hostname", None)
            values[tuple(sorted(labels.items()))] = float(match.group(3))
    return values


def wait_for_metric(metrics_url: str, name: str, model: str, expected_total: float, timeout: float = 15.0):
    """Poll until the metric's values sum to `expected_total` (the frontend ingests worker metrics from its
    log stream, a moment after the response); returns the last reading."""
    deadline = time.monotonic() + timeout
    while True:
        values = read_metrics(metrics_url, name, model)
        if sum(values.values()) >= expected_total or time.monotonic() > deadline:
            return values
        time.sleep(0.3)


def engine_answer(model: EarlyExitModel, inputs: dict, policy: Policy) -> dict:
    """The in-process engine's answer for one input: what the server's answer must equal."""
    result = run_early_exit(model, inputs, policy)
    return {
        "label": model.spec.labels[int(result.probs[0].argmax())],
        "exit_layer": int(result.exit_layer[0]),
        "probs": result.probs[0].tolist(),
    }


def engine_answers(model_dir: Path, config: Path, texts: list[str]) -> dict[str, dict]:
    """The in-process engine's answer alone for every text, under the model YAML's policy and runtime."""
    from epee_core.engine.inputs import encode_texts
    from epee_core.serving.config import ServeConfig

    serve = ServeConfig.load(config)
    model = EarlyExitModel.from_pretrained(model_dir, runtime=serve.runtime)
    policy = serve.policy
    return {
        text: engine_answer(model, encode_texts(model.tokenizer, [text], model.spec.max_length), policy)
        for text in texts
    }
