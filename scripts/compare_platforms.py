"""The same Locust clinical-day load against TorchServe and against `epee serve` (KServe), one after the other.

    python scripts/compare_platforms.py --model DIR --config YAML --data-dir DATA [--peak-users 16] [--duration 90]

One model directory and model YAML: `epee package` + TorchServe (the root config.properties on free loopback ports,
dynamic batching as the YAML says), then `epee serve` on free loopback ports (the layer-level scheduler); each gets a
short warm-up and then `epee loadtest run` with the same shape, users and payloads (`--platform`). Prints the two
runs' p50/p95 side by side and writes REPORTS/{torchserve,kserve}_* (Locust CSV/HTML). Heavy: run it under
`flock /tmp/cpu.lock` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from integration.helpers import free_ports, package, running_torchserve  # noqa: E402

from epee_core.cli import main  # noqa: E402
from epee_core.measure.loadtest import stats_result  # noqa: E402
from epee_core.ops.management import ManagementClient  # noqa: E402

NAME = "ade"
WARMUP_TEXT = {"text": "Severe rash after amoxicillin."}


def loadtest(args, platform: str, host: str, key_file: Path | None) -> dict:
    command = ["loadtest", "run", "--platform", platform, "--host", host, "--text-model", NAME,
               "--peak-users", str(args.peak_users), "--duration", str(args.duration), "--data-dir", args.data_dir,
               "--output-dir", str(args.reports), "--name", platform, "--slo", "", "--json",
               "--key-file", str(key_file or args.reports / "no-key-file.json")]  # fmt: skip
    main(command)  # exit 2 only for SLO violations, and there is no SLO here
    return stats_result(args.reports / platform, None)["stats"]


def warm(url: str, body: dict, headers: dict, count: int = 20) -> None:
    for _ in range(count):
        requests.post(url, json=body, headers=headers, timeout=60).raise_for_status()


def torchserve_run(args) -> dict:
    work = args.reports / "torchserve-work"
    work.mkdir(parents=True, exist_ok=True)
    store = work / "model_store"
    package(Path(args.model), Path(args.config), NAME, store)
    with running_torchserve(work, store) as server:
        client = ManagementClient(server.management_url, server.keys["management"], timeout=300)
        client.register(f"{NAME}.mar", name=NAME)
        warm(f"{server.inference_url}/predictions/{NAME}", WARMUP_TEXT, server.auth())
        return loadtest(args, "torchserve", server.inference_url, work / "key_file.json")


def kserve_run(args) -> dict:
    http_port, grpc_port = free_ports(2)
    log = (args.reports / "kserve-server.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "epee_core.cli", "serve", "--model", args.model, "--config",
                               args.config, "--name", NAME, "--host", "127.0.0.1", "--http-port", str(http_port),
                               "--grpc-port", str(grpc_port)], stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        body = {
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [WARMUP_TEXT["text"]]}]
        }
        warm(f"{url}/v2/models/{NAME}/infer", body, {})
        return loadtest(args, "kserve", url, None)
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model directory")
    parser.add_argument("--config", required=True, help="model YAML (TorchServe keys + epee: section)")
    parser.add_argument(
        "--data-dir", required=True, help="folder of ade/ and mtsamples/ (the Locust payloads)"
    )
    parser.add_argument(
        "--peak-users", type=int, default=16, help="users at the ward-round peak (default 16)"
    )
    parser.add_argument("--duration", type=int, default=90, help="seconds per run (default 90)")
    parser.add_argument(
        "--reports", type=Path, default=Path("load_tests/reports/platforms"), help="output folder"
    )
    args = parser.parse_args()
    args.reports.mkdir(parents=True, exist_ok=True)
    results = {"torchserve": torchserve_run(args), "kserve": kserve_run(args)}
    (args.reports / "platforms.json").write_text(json.dumps(results, indent=2))
    keys = sorted({key for stats in results.values() for key in stats})
    print("\n" + f"{'':16}" + "".join(f"{name:>12}" for name in results))
    for key in keys:
        print(f"{key:16}" + "".join(f"{stats.get(key, float('nan')):>12.1f}" for stats in results.values()))


if __name__ == "__main__":
    main_cli()
