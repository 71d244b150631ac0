"""The wiring of scripts/build_images.sh and scripts/image_check.sh, without building anything (a build takes many
minutes and several GB: docs/images.md). hadolint of the Dockerfiles is in test_container_and_kubernetes.py."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from epee_core.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
BUILD = ROOT / "scripts" / "build_images.sh"
CHECK = ROOT / "scripts" / "image_check.sh"
PYPROJECT = ROOT / "pyproject.toml"
SERVING_DOCKERFILES = ["Dockerfile", "Dockerfile.kserve"]

sys.path.insert(0, str(ROOT / "scripts"))
import image_check  # noqa: E402


def script_default(name: str) -> str:
    """`NAME=${NAME:-default}` in scripts/build_images.sh."""
    match = re.search(rf"^{name}=\$\{{{name}:-([^}}]+)\}}$", BUILD.read_text(encoding="utf-8"), flags=re.M)
    assert match, f"{name} has no default in {BUILD.name}"
    return match.group(1)


def instruction(dockerfile: str, name: str) -> list[str]:
    """Every `NAME ...` line of a Dockerfile (continuations joined)."""
    text = (DOCKER / dockerfile).read_text(encoding="utf-8").replace("\\\n", " ")
    return re.findall(rf"^{name} (.+)$", text, flags=re.M)


def exec_form(dockerfile: str, name: str) -> list[str]:
    (line,) = instruction(dockerfile, name)
    return json.loads(line.removeprefix("CMD "))


@pytest.mark.parametrize("script", [BUILD, CHECK])
def test_the_scripts_parse_as_sh_and_are_executable(script):
    result = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert script.stat().st_mode & 0o111


def test_sh_n_refuses_a_broken_copy_of_the_build_script(tmp_path):
    broken = tmp_path / "build.sh"
    broken.write_text(BUILD.read_text(encoding="utf-8").replace("    esac\n", "", 1), encoding="utf-8")
    assert subprocess.run(["sh", "-n", str(broken)], capture_output=True).returncode != 0


@pytest.mark.parametrize("dockerfile", SERVING_DOCKERFILES)
def test_every_stage_starts_from_the_base_the_script_makes_when_it_is_missing(dockerfile):
    assert f"BASE_IMAGE={script_default('BASE_IMAGE')}" in instruction(dockerfile, "ARG")
    stages = instruction(dockerfile, "FROM")
    assert len(stages) == 2 and all(stage.split()[0] == "${BASE_IMAGE}" for stage in stages), stages


def test_the_script_builds_both_dockerfiles_under_the_tags_the_check_serves():
    text = BUILD.read_text(encoding="utf-8")
    built = dict(re.findall(r'bud_image "\$(\w+)" (docker/\S+)', text))
    assert built == {"TORCHSERVE_TAG": "docker/Dockerfile", "KSERVE_TAG": "docker/Dockerfile.kserve"}
    assert all((ROOT / path).is_file() for path in built.values())
    assert script_default("TORCHSERVE_TAG") == image_check.TORCHSERVE_TAG
    assert script_default("KSERVE_TAG") == image_check.KSERVE_TAG


def test_the_build_never_pulls_and_builds_in_chroot_isolation():
    (bud,) = [line for line in BUILD.read_text(encoding="utf-8").splitlines() if "buildah bud" in line]
    words = shlex.split(bud.replace("\\", ""))
    assert {"--pull=never", "--isolation", "chroot", "--format", "docker"} <= set(words)


def test_the_build_context_admits_every_package_the_dockerfiles_copy():
    include = re.search(r"^include = (\[.*\])$", PYPROJECT.read_text(encoding="utf-8"), flags=re.M).group(1)
    patterns = {pattern.rstrip("*") for pattern in json.loads(include)}
    admitted = {
        line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line[:1] == "!"
    }
    assert patterns <= admitted
    copied = {line.split()[0] for line in instruction("Dockerfile.kserve", "COPY") if "--from" not in line}
    assert patterns <= copied, copied


def test_the_kserve_entrypoint_is_epee_serve_and_its_default_arguments_parse():
    assert '\nepee = "epee_core.cli:main"\n' in PYPROJECT.read_text(encoding="utf-8")
    entrypoint = exec_form("Dockerfile.kserve", "ENTRYPOINT")
    assert entrypoint == ["/usr/bin/tini", "-g", "--", "epee", "serve"]
    arguments = build_parser().parse_args(["serve", *exec_form("Dockerfile.kserve", "CMD")])
    assert arguments.run.__name__ == "run_serve"
    assert (arguments.model, arguments.config) == ("/mnt/models/model", "/mnt/models/serve.yaml")


def test_the_kserve_image_runs_what_the_inference_service_runs():
    (service,) = yaml.safe_load_all(
        (ROOT / "kubernetes/kserve-modelserver/inferenceservice.yaml").read_text()
    )
    (container,) = service["spec"]["predictor"]["containers"]
    assert container["image"] == image_check.KSERVE_TAG.split(":")[0]
    pod = build_parser().parse_args(container["args"])
    image = build_parser().parse_args(["serve", *exec_form("Dockerfile.kserve", "CMD")])
    assert (pod.model, pod.config, pod.http_port, pod.grpc_port) == (
        image.model, image.config, image.http_port, image.grpc_port)  # fmt: skip
    assert [int(port) for port in instruction("Dockerfile.kserve", "EXPOSE")[0].split()] == [
        image.http_port, image.grpc_port]  # fmt: skip


def test_the_kserve_health_check_asks_readiness_on_the_cmd_port_which_the_check_can_move():
    (line,) = instruction("Dockerfile.kserve", "HEALTHCHECK")
    test = json.loads(line.split(" CMD ", 1)[1])
    port = build_parser().parse_args(["serve", *exec_form("Dockerfile.kserve", "CMD")]).http_port
    assert f"http://127.0.0.1:{port}/v2/health/ready" in test[-1]
    assert f":{port}/" in test[-1]  # image_check.healthcheck moves exactly this to the free port


@pytest.mark.parametrize("dockerfile", SERVING_DOCKERFILES)
def test_the_images_run_as_the_uid_the_check_expects(dockerfile):
    assert instruction(dockerfile, "USER") == [f"{image_check.NON_ROOT_UID}:{image_check.NON_ROOT_UID}"]


def test_both_images_pin_the_same_tini_from_the_same_base():
    pins = [set(re.findall(r"tini=\S+", " ".join(instruction(name, "RUN")))) for name in SERVING_DOCKERFILES]
    assert pins[0] == pins[1] and len(pins[0]) == 1


def test_the_torchserve_check_moves_every_listener_of_the_container_config_to_127_0_0_1_and_free_ports():
    ports = [50001, 50002, 50003, 50004, 50005]
    text = image_check.local_properties((DOCKER / "config.properties").read_text(encoding="utf-8"), ports)
    properties = dict(re.findall(r"^(\w+)=(.*)$", text, flags=re.M))
    listeners = {key: value for key, value in properties.items() if key.endswith("_address")}
    assert {key: value for key, value in listeners.items() if not key.startswith("grpc")} == {
        "inference_address": "http://127.0.0.1:50001",
        "management_address": "http://127.0.0.1:50002",
        "metrics_address": "http://127.0.0.1:50003",
    }
    assert (listeners["grpc_inference_address"], listeners["grpc_management_address"]) == (
        "127.0.0.1",
        "127.0.0.1",
    )
    assert (properties["grpc_inference_port"], properties["grpc_management_port"]) == ("50004", "50005")
