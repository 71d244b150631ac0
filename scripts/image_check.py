"""Serves a tiny model from each image built by scripts/build_images.sh and checks it (docs/images.md).

Each image runs its own ENTRYPOINT in a buildah working container with chroot isolation (`podman run` fails in
this sandbox on setrlimit), in the host's network namespace on free ports bound to 127.0.0.1. Checked per image:
the image's own HEALTHCHECK command passes, one real prediction equals the in-process engine's answer, every
server process runs as uid 1000, and the image size is printed. Servers and working containers are removed at the
end. Run through scripts/image_check.sh.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests")]

from helpers import build_tiny_model  # noqa: E402
from integration.helpers import engine_answers, free_ports, package, write_model_yaml  # noqa: E402

STORAGE_DRIVER = os.environ.get("STORAGE_DRIVER", "vfs")
TORCHSERVE_TAG = os.environ.get("TORCHSERVE_TAG", "epee-serve:cpu")
KSERVE_TAG = os.environ.get("KSERVE_TAG", "epee-serve-kserve:cpu")
MODEL = "tiny"
TEXT = "Severe rash after amoxicillin."
NON_ROOT_UID = 1000
START_TIMEOUT = 300.0


BUILDAH = ["buildah", "--storage-driver", STORAGE_DRIVER]


def buildah(*args: str) -> str:
    return subprocess.run([*BUILDAH, *args], check=True, capture_output=True, text=True).stdout


def run_in(container: str, volumes: list[str], command: list[str]) -> list[str]:
    """The `buildah run` command line: `command` in `container`, chroot isolation, `volumes` bind-mounted."""
    mounts = [arg for volume in volumes for arg in ("--volume", volume)]
    return [*BUILDAH, "run", "--isolation", "chroot", *mounts, container, "--", *command]


def image_config(tag: str) -> dict:
    """The image's Docker config: Entrypoint, Cmd, User, Healthcheck."""
    return json.loads(buildah("inspect", "--type", "image", tag))["Docker"]["config"]


def image_size(tag: str) -> str:
    return buildah("images", "--format", "{{.Size}}", tag).strip()


def tiny_model(work: Path) -> tuple[Path, Path, Path]:
    """A tiny random text model as a model directory, its model YAML and its `epee package` archive's store."""
    from transformers import AutoTokenizer

    from epee_core.engine.backbones import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    models = work / "models"
    model_dir = models / "model"
    build_tiny_model(tokenizer).save_pretrained(model_dir)
    config = write_model_yaml(models / "serve.yaml", 4, 5, task="text-classification", policy="epee")
    store = work / "model-store"
    package(model_dir, config, MODEL, store)
    for path in work.rglob("*"):  # safetensors files are written 0600: the servers run as uid 1000
        path.chmod(0o755 if path.is_dir() else 0o644)
    return model_dir, config, store


def server_processes(root: psutil.Process) -> list[psutil.Process]:
    """The processes of the image's command, not buildah's own (`buildah run` and its chroot helpers, named
    "memfd:buildah-…", run as root)."""
    return [p for p in root.children(recursive=True) if not p.name().startswith(("buildah", "memfd:buildah"))]


@contextmanager
def running(tag: str, volumes: list[str], command: list[str], log: Path):
    """`command` running in a fresh working container of `tag`; yields (container, buildah's process)."""
    container = buildah("from", "--pull=never", tag).strip()
    with log.open("w") as output:
        process = subprocess.Popen(
            run_in(container, volumes, command),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield container, process
    finally:
        stop(process)
        buildah("rm", container)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the image's first process (tini, which forwards it to the server's group), as `docker stop`
    does; SIGKILL to whatever is left after 60 s, buildah's own processes last."""
    if process.poll() is not None:
        return
    everything = psutil.Process(process.pid).children(recursive=True)
    served = server_processes(psutil.Process(process.pid))
    pids = {p.pid for p in served}
    for first in [p for p in served if p.ppid() not in pids]:
        first.terminate()
    _, alive = psutil.wait_procs(served, timeout=60)
    for leftover in alive:
        leftover.kill()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    _, alive = psutil.wait_procs(everything, timeout=10)
    for leftover in alive:
        leftover.kill()


def healthcheck(container: str, config: dict, volumes: list[str], port: int) -> subprocess.CompletedProcess:
    """The image's HEALTHCHECK command, run inside the running container (its REST port moved to `port`)."""
    test = [arg.replace(":8080/", f":{port}/") for arg in config["Healthcheck"]["Test"][1:]]
    return subprocess.run(run_in(container, volumes, test), capture_output=True, text=True, timeout=60)


def wait_healthy(container: str, config: dict, volumes: list[str], port: int, process, log: Path) -> float:
    """Seconds until the image's health check passes; fails if the server exits or the timeout passes."""
    start = time.monotonic()
    while time.monotonic() - start < START_TIMEOUT:
        if process.poll() is not None:
            raise SystemExit(f"the server exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        if healthcheck(container, config, volumes, port).returncode == 0:
            return time.monotonic() - start
        time.sleep(3)
    raise SystemExit(f"not healthy after {START_TIMEOUT:.0f} s:\n{log.read_text()[-3000:]}")


def check_user(config: dict, process) -> list[int]:
    """The image's USER and the uid of every server process; both must be the non-root uid."""
    assert config["User"].split(":")[0] == str(NON_ROOT_UID), f"USER is {config['User']!r}"
    uids = sorted({p.uids().real for p in server_processes(psutil.Process(process.pid))})
    assert uids == [NON_ROOT_UID], f"server processes run as uids {uids}"
    return uids


def local_properties(text: str, ports: list[int]) -> str:
    """docker/config.properties with every listener on 127.0.0.1 and the free `ports` (inference, management,
    metrics, gRPC inference, gRPC management)."""
    inference, management, metrics, grpc_inference, grpc_management = ports
    text = (
        text.replace("http://0.0.0.0:8080", f"http://127.0.0.1:{inference}")
        .replace("http://127.0.0.1:8081", f"http://127.0.0.1:{management}")
        .replace("http://0.0.0.0:8082", f"http://127.0.0.1:{metrics}")
    )
    return text + f"grpc_inference_port={grpc_inference}\ngrpc_management_port={grpc_management}\n"


def check_torchserve(work: Path, store: Path, expected: dict) -> dict:
    """The TorchServe image: docker/config.properties with 127.0.0.1 and free ports, the .mar in the model store."""
    ports = free_ports(5)
    properties = work / "config.properties"
    properties.write_text(
        local_properties((ROOT / "docker" / "config.properties").read_text("utf-8"), ports), "utf-8"
    )
    inference = ports[0]
    config = image_config(TORCHSERVE_TAG)
    volumes = [
        f"{properties}:/home/model-server/config/config.properties:ro",
        f"{store}:/mnt/models/model-store:ro",
    ]
    log = work / "torchserve.log"
    with running(TORCHSERVE_TAG, volumes, config["Entrypoint"] + config["Cmd"], log) as (container, process):
        seconds = wait_healthy(container, config, volumes, inference, process, log)
        answer = requests.post(
            f"http://127.0.0.1:{inference}/predictions/{MODEL}", json={"text": TEXT}, timeout=60
        )
        assert answer.status_code == 200, answer.text
        label = answer.json()["label"]
        uids = check_user(config, process)
    assert label == expected["label"], (label, expected)
    return {"healthy_after_s": round(seconds, 1), "label": label, "uids": uids}


def check_kserve(work: Path, model_dir: Path, config_path: Path, expected: dict) -> dict:
    """The KServe image: its ENTRYPOINT (`epee serve`) with the model directory and model YAML mounted."""
    http, grpc = free_ports(2)
    config = image_config(KSERVE_TAG)
    volumes = [f"{model_dir.parent}:/mnt/models:ro"]
    arguments = ["--model", f"/mnt/models/{model_dir.name}", "--config", f"/mnt/models/{config_path.name}",
                 "--name", MODEL, "--host", "127.0.0.1", "--http-port", str(http), "--grpc-port", str(grpc)]  # fmt: skip
    log = work / "kserve.log"
    with running(KSERVE_TAG, volumes, config["Entrypoint"] + arguments, log) as (container, process):
        seconds = wait_healthy(container, config, volumes, http, process, log)
        body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [TEXT]}]}
        answer = requests.post(f"http://127.0.0.1:{http}/v2/models/{MODEL}/infer", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        outputs = {output["name"]: output["data"] for output in answer.json()["outputs"]}
        uids = check_user(config, process)
    assert outputs["label"] == [expected["label"]], (outputs, expected)
    return {"healthy_after_s": round(seconds, 1), "label": outputs["label"][0], "uids": uids}


def main(platforms: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="epee-image-check.") as directory:
        work = Path(directory)
        work.chmod(0o755)  # the servers run as uid 1000 and read the mounted model and config from here
        model_dir, config_path, store = tiny_model(work)
        expected = engine_answers(model_dir, config_path, [TEXT])[TEXT]
        checks = {
            "torchserve": (TORCHSERVE_TAG, lambda: check_torchserve(work, store, expected)),
            "kserve": (KSERVE_TAG, lambda: check_kserve(work, model_dir, config_path, expected)),
        }
        for platform in platforms:
            tag, check = checks[platform]
            result = check()
            print(f"{platform}: {tag} size {image_size(tag)}; healthy after {result['healthy_after_s']} s; "
                  f"prediction {result['label']!r} = engine's; server uids {result['uids']}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["torchserve", "kserve"]))
