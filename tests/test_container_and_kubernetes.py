"""Offline checks of the container recipe (docker/) and the Kubernetes manifests (kubernetes/).

No Docker daemon and no cluster here: images are linted (hadolint), never built; manifests are rendered
(`kubectl kustomize`) and schema-checked (`kubernetes-validate --strict`), never applied. Each tool check also
runs on a deliberately broken copy, to show it can fail. The last tests start a real TorchServe from
docker/config.properties (on 127.0.0.1 and free ports) and run the health check (epee_core.ops.health) against it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import yaml
from helpers import StubHandler

from epee_core.ops import health
from epee_core.ops.torchserve import read_properties

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
KUBE = ROOT / "kubernetes"
DOCKER_CONFIG = DOCKER / "config.properties"
KUSTOMIZATIONS = sorted(path.parent.relative_to(KUBE).as_posix() for path in KUBE.rglob("kustomization.yaml"))
SERVING_OVERLAYS = ["overlays/cpu", "overlays/gpu"]
BIN = Path(sys.executable).parent
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl is not installed: kustomizations not rendered"
)


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def tool(name: str) -> str:
    """A dev-extra tool (pip install -e ".[dev]"): next to this Python, else on PATH; missing is a failure."""
    found = BIN / name if (BIN / name).exists() else shutil.which(name)
    assert found, f"{name} not found: install the dev extra (pip install -e '.[dev]')"
    return str(found)


def run(*command: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, **kwargs)


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess:
    return run(tool("hadolint"), "--no-color", "--failure-threshold", "warning", str(dockerfile))


def render(kustomization: str) -> str:
    result = run(KUBECTL, "kustomize", str(KUBE / kustomization))
    assert result.returncode == 0, result.stderr
    return result.stdout


def validate(manifest: Path) -> subprocess.CompletedProcess:
    return run(tool("kubernetes-validate"), "--strict", str(manifest))


def documents(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def one(docs: list[dict], kind: str) -> dict:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(pod_spec: dict, name: str) -> dict:
    return next(c for c in pod_spec["containers"] if c["name"] == name)


# --- the container recipe ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.kserve", "Dockerfile.model"])
def test_dockerfiles_pass_hadolint_at_the_warning_threshold(dockerfile):
    result = hadolint(DOCKER / dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr


BREAKAGES = {  # hadolint rule (warning level or above) -> the same Dockerfile, broken so that it applies
    "DL3008": lambda text: re.sub(r"(openjdk-17-jre-headless|tini)=\S+", r"\1", text),  # apt unpinned
    "DL3002": lambda text: text.replace("USER 1000:1000", "USER root"),  # runs as root
    "DL3042": lambda text: text.replace("pip install --no-cache-dir", "pip install"),  # pip cache kept
}


@pytest.mark.parametrize("rule", sorted(BREAKAGES))
def test_hadolint_refuses_a_broken_copy_of_the_dockerfile(tmp_path, rule):
    original = (DOCKER / "Dockerfile").read_text(encoding="utf-8")
    broken = BREAKAGES[rule](original)
    assert broken != original
    (tmp_path / "Dockerfile").write_text(broken, encoding="utf-8")
    result = hadolint(tmp_path / "Dockerfile")
    assert result.returncode != 0 and rule in result.stdout, result.stdout


def dockerfile_env(text: str) -> dict[str, str]:
    env = {}
    for block in re.findall(r"^ENV (.+?)(?<!\\)$", text, flags=re.M | re.S):
        for key, value in re.findall(r"(\w+)=(\S+)", block.replace("\\\n", " ")):
            env[key] = value
    return env


def test_the_image_puts_config_probe_and_metrics_config_where_the_config_and_manifests_expect_them():
    text = (DOCKER / "Dockerfile").read_text(encoding="utf-8")
    env = dockerfile_env(text)
    config = read_properties(DOCKER_CONFIG)
    assert "COPY --chown=1000:1000 docker/config.properties " + env["TS_CONFIG_FILE"] in text
    assert "COPY handlers/metrics.yaml /opt/epee-serve/" in text
    assert config["metrics_config"] == "/opt/epee-serve/metrics.yaml"
    assert "HEALTHCHECK" in text and 'CMD ["python", "-m", "epee_core.ops.health"]' in text
    assert re.search(r"^USER 1000:1000$", text, flags=re.M)  # numeric, so runAsNonRoot can verify it
    assert 'ENTRYPOINT ["/usr/bin/tini", "-g", "--"]' in text
    assert 'CMD ["torchserve", "--foreground", "--ncs"]' in text
    exposed = {int(port) for port in re.search(r"^EXPOSE (.+)$", text, flags=re.M).group(1).split()}
    assert exposed == {port_of(config["inference_address"]), port_of(config["metrics_address"])}
    # CPU wheels by default; the CUDA variant is the same recipe with another index
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert "ARG BASE_IMAGE=python:3.11-slim-bookworm" in text
    # the build context sends only what the image copies
    ignore = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    for source in ("pyproject.toml", "README.md", "epee_core/", "handlers/", "docker/config.properties"):
        assert f"!{source}" in ignore


# --- the TorchServe config of the container ------------------------------------------------------------------


def test_container_config_keeps_the_root_configs_limits_and_fixes_models_at_start():
    root, container_config = read_properties(ROOT / "config.properties"), read_properties(DOCKER_CONFIG)
    for key in ("allowed_urls", "default_workers_per_model", "job_queue_size", "default_response_timeout",
                "max_request_size", "metrics_mode", "vmargs"):  # fmt: skip
        assert container_config[key] == root[key], key
    assert container_config["inference_address"] == "http://0.0.0.0:8080"
    assert container_config["management_address"] == "http://127.0.0.1:8081"
    assert container_config["metrics_address"] == "http://0.0.0.0:8082"
    assert (
        container_config["grpc_inference_address"]
        == container_config["grpc_management_address"]
        == "127.0.0.1"
    )
    assert container_config["load_models"] == "all"
    assert container_config["enable_model_api"] == "false"
    assert container_config["disable_token_authorization"] == "true"
    assert container_config["number_of_gpu"] == "0"
    assert container_config["model_store"] == "/mnt/models/model-store"


def test_the_kustomize_copies_of_the_config_are_docker_config_properties():
    original = DOCKER_CONFIG.read_text(encoding="utf-8")
    assert (KUBE / "base" / "config.properties").read_text(encoding="utf-8") == original
    assert (KUBE / "kserve" / "config.properties").read_text(encoding="utf-8") == original
    gpu = read_properties(KUBE / "overlays" / "gpu" / "config.properties")
    assert gpu == {**read_properties(DOCKER_CONFIG), "number_of_gpu": "1"}


# --- rendering and schema validation ---------------------------------------------------------------------------


def test_the_kustomizations_are_the_expected_ones():
    assert KUSTOMIZATIONS == ["base", "kserve", "kserve-modelserver", "overlays/cpu", "overlays/gpu"]


@needs_kubectl
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_kustomization_renders_and_passes_kubernetes_validate_strict(tmp_path, kustomization):
    rendered = render(kustomization)
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(rendered, encoding="utf-8")
    result = validate(manifest)
    assert result.returncode == 0, result.stdout + result.stderr
    # kubernetes-validate exits 0 on a kind it has no schema for (it only warns): insist that every resource
    # was really checked, except KServe's InferenceService, checked by the kserve test below instead.
    lines = result.stdout.splitlines()
    for doc in documents(rendered):
        resource = f"{doc['kind'].lower()}/{doc['metadata']['name']}"
        passed = any("passed for resource " + resource + " " in line for line in lines)
        if doc["kind"] == "InferenceService":
            assert not passed and any(
                "Couldn't find schema for kind InferenceService" in line for line in lines
            )
        else:
            assert passed, f"{resource} was not validated:\n{result.stdout}"


@needs_kubectl
def test_kubernetes_validate_strict_refuses_a_broken_copy_of_the_manifests(tmp_path):
    docs = documents(render("overlays/cpu"))
    probe = container(one(docs, "Deployment")["spec"]["template"]["spec"], "torchserve")
    probe["readinessProbes"] = probe.pop("readinessProbe")  # a typo: an unknown field
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump_all(docs), encoding="utf-8")
    result = validate(broken)
    assert result.returncode != 0 and "ERROR" in result.stdout and "readinessProbes" in result.stdout
    # and a wrong type
    docs = documents(render("overlays/cpu"))
    one(docs, "Deployment")["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] = "yes"
    broken.write_text(yaml.safe_dump_all(docs), encoding="utf-8")
    assert validate(broken).returncode != 0


# KServe's v1beta1 PredictorSpec = ComponentExtensionSpec fields + an inlined core PodSpec (+ model/framework
# specs, unused here). These are the ComponentExtensionSpec fields this project sets, with their types
# (KServe SDK docs: V1beta1ComponentExtensionSpec); everything else must be PodSpec.
KSERVE_COMPONENT_FIELDS = {"minReplicas": int, "maxReplicas": int, "scaleMetric": str, "scaleTarget": int}


def predictor_as_pod_template(isvc: dict) -> dict:
    """The predictor's PodSpec part as a core/v1 PodTemplate, for kubernetes-validate --strict."""
    pod_spec = {
        key: value for key, value in isvc["spec"]["predictor"].items() if key not in KSERVE_COMPONENT_FIELDS
    }
    template = {"metadata": {"labels": {"app.kubernetes.io/name": "epee-serve"}}, "spec": pod_spec}
    return {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": "predictor"},
        "template": template,
    }


@needs_kubectl
def test_the_kserve_predictor_validates_strictly_as_a_pod_template_and_its_kserve_fields_by_hand(tmp_path):
    isvc = one(documents(render("kserve")), "InferenceService")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "hpa"
    assert set(isvc["spec"]) == {"predictor"}
    predictor = isvc["spec"]["predictor"]
    for key, kind in KSERVE_COMPONENT_FIELDS.items():
        assert isinstance(predictor[key], kind), key
    assert predictor["scaleMetric"] in {"cpu", "memory"}  # what HPA (RawDeployment) supports
    assert 0 < predictor["minReplicas"] <= predictor["maxReplicas"]
    server = container(predictor, "kserve-container")  # the name KServe's storage initializer looks for
    assert any(env["name"] == "STORAGE_URI" for env in server["env"])
    # KServe mounts the download at /mnt/models: model_store must be below it, and not mounted by us
    assert read_properties(KUBE / "kserve" / "config.properties")["model_store"].startswith("/mnt/models/")
    assert all(mount["mountPath"] != "/mnt/models" for mount in server["volumeMounts"])

    template = tmp_path / "predictor.yaml"
    template.write_text(yaml.safe_dump(predictor_as_pod_template(isvc)), encoding="utf-8")
    result = validate(template)
    assert result.returncode == 0 and "passed for resource podtemplate/predictor" in result.stdout, (
        result.stdout
    )

    # the derivation refuses a typo: an unknown predictor field ends up in the PodSpec
    isvc["spec"]["predictor"]["minReplica"] = 2
    template.write_text(yaml.safe_dump(predictor_as_pod_template(isvc)), encoding="utf-8")
    result = validate(template)
    assert result.returncode != 0 and "minReplica" in result.stdout


@needs_kubectl
def test_the_documented_manifests_in_docs_kubernetes_md_pass_kubernetes_validate_strict(tmp_path):
    text = (ROOT / "docs" / "kubernetes.md").read_text(encoding="utf-8")
    snippets = [
        block for block in re.findall(r"```yaml\n(.*?)```", text, flags=re.S) if "apiVersion:" in block
    ]
    assert snippets
    for index, snippet in enumerate(snippets):
        manifest = tmp_path / f"snippet{index}.yaml"
        manifest.write_text(snippet, encoding="utf-8")
        result = validate(manifest)
        assert result.returncode == 0 and "passed for resource" in result.stdout, snippet + result.stdout


# --- what the rendered manifests must contain ---------------------------------------------------------------------


def assert_secure(pod_spec: dict, name: str, writable: tuple[str, ...] | None = None) -> None:
    """Non-root, no privilege escalation, a read-only root; `writable` (default: where TorchServe writes) are
    size-limited emptyDirs."""
    assert pod_spec["securityContext"]["runAsNonRoot"] is True
    assert pod_spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod_spec["automountServiceAccountToken"] is False
    for each in pod_spec["containers"] + pod_spec.get("initContainers", []):
        context = each["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, each["name"]
        assert context["readOnlyRootFilesystem"] is True, each["name"]
        assert context["capabilities"]["drop"] == ["ALL"], each["name"]
    server = container(pod_spec, name)
    volumes = {volume["name"]: volume for volume in pod_spec["volumes"]}
    mounts = {mount["mountPath"]: volumes[mount["name"]] for mount in server["volumeMounts"]}
    # a read-only root needs writable emptyDirs where TorchServe writes (LOG_LOCATION and /tmp)
    if writable is None:
        writable = (
            "/tmp",
            dockerfile_env((DOCKER / "Dockerfile").read_text(encoding="utf-8"))["LOG_LOCATION"],
        )
    for path in writable:
        assert "emptyDir" in mounts[path], path
        assert "sizeLimit" in mounts[path]["emptyDir"], path


def assert_probes_and_ports_match_the_config(pod_spec: dict, name: str, config: dict[str, str]) -> None:
    server = container(pod_spec, name)
    inference, metrics = port_of(config["inference_address"]), port_of(config["metrics_address"])
    ports = {port.get("name", str(port["containerPort"])): port["containerPort"] for port in server["ports"]}
    assert port_of(config["management_address"]) not in ports.values()  # 127.0.0.1 only: never exposed
    assert inference in ports.values()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probe in server, probe
    liveness = server["livenessProbe"]["httpGet"]
    assert liveness["path"] == "/ping"
    assert ports.get(liveness["port"], liveness["port"]) == inference
    checker = ["python", "-m", "epee_core.ops.health"]
    assert server["readinessProbe"]["exec"]["command"] == checker
    assert server["startupProbe"]["exec"]["command"] == checker
    env = {item["name"]: item["value"] for item in server["env"]}
    config_mount = next(
        m for m in server["volumeMounts"] if m["mountPath"] == str(Path(env["TS_CONFIG_FILE"]).parent)
    )
    configmap = next(v for v in pod_spec["volumes"] if v["name"] == config_mount["name"])["configMap"]["name"]
    assert configmap.startswith("epee-serve-config")
    assert (
        env["TS_CONFIG_FILE"]
        == dockerfile_env((DOCKER / "Dockerfile").read_text(encoding="utf-8"))["TS_CONFIG_FILE"]
    )
    # drain: the endpoint is removed during preStop, then SIGTERM; the grace period must cover the sleep
    sleep = server["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep" and int(sleep[1]) + 10 <= pod_spec["terminationGracePeriodSeconds"]
    if "metrics" in ports:
        assert ports["metrics"] == metrics


@needs_kubectl
@pytest.mark.parametrize("overlay", SERVING_OVERLAYS)
def test_the_overlays_render_hpa_probes_non_root_pdb_network_policy_matching_the_config(overlay):
    docs = documents(render(overlay))
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert "replicas" not in deployment["spec"]  # the HPA owns it
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}  # fmt: skip
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert (
        "cpu" in container(pod["spec"], "torchserve")["resources"]["requests"]
    )  # utilisation needs a request

    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert one(docs, "Service")["spec"]["selector"].items() <= labels.items()
    policy = one(docs, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    allowed_ports = {port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]}
    assert allowed_ports == {"http", "metrics"}

    configmap = one(docs, "ConfigMap")
    config_file = KUBE / overlay / "config.properties"
    config = read_properties(config_file if config_file.exists() else DOCKER_CONFIG)
    rendered_config = configmap["data"]["config.properties"]
    assert rendered_config == (config_file if config_file.exists() else DOCKER_CONFIG).read_text(
        encoding="utf-8"
    )
    assert_secure(pod["spec"], "torchserve")
    assert_probes_and_ports_match_the_config(pod["spec"], "torchserve", config)
    service_ports = {port["name"]: port for port in one(docs, "Service")["spec"]["ports"]}
    assert service_ports["http"]["port"] == port_of(config["inference_address"])
    assert service_ports["metrics"]["port"] == port_of(config["metrics_address"])

    # the model archive: the init container fills the volume that model_store lies in
    (init,) = pod["spec"]["initContainers"]
    models_mount = next(m for m in init["volumeMounts"])
    assert config["model_store"].startswith(models_mount["mountPath"] + "/")
    server_mount = next(
        m for m in container(pod["spec"], "torchserve")["volumeMounts"] if m["name"] == models_mount["name"]
    )
    assert server_mount["mountPath"] == models_mount["mountPath"] and server_mount["readOnly"] is True

    server = container(pod["spec"], "torchserve")
    if overlay == "overlays/gpu":
        assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert config["number_of_gpu"] == "1"
        assert pod["spec"]["tolerations"] and pod["spec"]["nodeSelector"]
        assert server["image"].endswith("-cuda")
    else:
        assert "nvidia.com/gpu" not in server["resources"].get("limits", {})
        assert config["number_of_gpu"] == "0"
        assert server["image"].endswith("-cpu")


@needs_kubectl
def test_the_kserve_predictor_has_the_same_probes_ports_and_security_as_the_deployment():
    predictor = one(documents(render("kserve")), "InferenceService")["spec"]["predictor"]
    assert_secure(predictor, "kserve-container")
    assert_probes_and_ports_match_the_config(predictor, "kserve-container", read_properties(DOCKER_CONFIG))


@needs_kubectl
def test_the_epee_serve_predictor_runs_epee_serve_probes_oip_health_and_keeps_the_conventions(tmp_path):
    docs = documents(render("kserve-modelserver"))
    isvc = one(docs, "InferenceService")
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "hpa"
    predictor = isvc["spec"]["predictor"]
    for key, kind in KSERVE_COMPONENT_FIELDS.items():
        assert isinstance(predictor[key], kind), key
    # the HPA KServe creates: the same bounds and target as kubernetes/base/hpa.yaml
    base_hpa = one(
        documents((KUBE / "base" / "hpa.yaml").read_text(encoding="utf-8")), "HorizontalPodAutoscaler"
    )
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (base_hpa["spec"]["minReplicas"],
                                                                    base_hpa["spec"]["maxReplicas"])  # fmt: skip
    (metric,) = base_hpa["spec"]["metrics"]
    assert (predictor["scaleMetric"], predictor["scaleTarget"]) == ("cpu", metric["resource"]["target"]
                                                                    ["averageUtilization"])  # fmt: skip
    server = container(predictor, "kserve-container")
    command = server["command"] + server["args"]
    assert command[:4] == ["python", "-m", "epee_core.cli", "serve"]
    options = dict(zip(command[4::2], command[5::2]))
    assert options["--model"].startswith("/mnt/models/") and options["--config"].startswith("/mnt/models/")
    assert any(env["name"] == "STORAGE_URI" for env in server["env"])
    assert all(mount["mountPath"] != "/mnt/models" for mount in server["volumeMounts"])  # KServe mounts it
    (port,) = server["ports"]
    assert port["containerPort"] == int(options["--http-port"]) == 8080
    probes = {name: server[name]["httpGet"] for name in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert {probe["port"] for probe in probes.values()} == {8080}
    assert probes["startupProbe"]["path"] == probes["readinessProbe"]["path"] == "/v2/health/ready"
    assert probes["livenessProbe"]["path"] == "/v2/health/live"
    sleep = server["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep" and int(sleep[1]) + 10 <= predictor["terminationGracePeriodSeconds"]
    assert_secure(predictor, "kserve-container", writable=("/tmp",))
    assert "cpu" in server["resources"]["requests"]  # the HPA's utilisation needs a request

    pod_labels = {"serving.kserve.io/inferenceservice": isvc["metadata"]["name"]}  # KServe labels its pods
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == pod_labels and pdb["spec"]["maxUnavailable"] == 1
    policy = one(docs, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == pod_labels
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"} and policy["spec"]["egress"] == []
    assert {port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]} == {8080}

    template = tmp_path / "predictor.yaml"
    template.write_text(yaml.safe_dump(predictor_as_pod_template(isvc)), encoding="utf-8")
    result = validate(template)
    assert result.returncode == 0 and "passed for resource podtemplate/predictor" in result.stdout, (
        result.stdout
    )


# --- the health check (epee_core.ops.health) -------------------------------------------------------------------


class FakeTorchServe:
    """/ping, /models and /models/NAME as TorchServe 0.12 answers them, from a dict the test changes."""

    def __init__(self):
        self.ping_status = 200
        self.models: dict[str, list[str]] = {}  # name -> worker statuses
        state = self

        class Handler(StubHandler):
            def do_GET(self):  # noqa: N802
                if self.path == "/ping":
                    self.answer(
                        state.ping_status, {"status": "Healthy" if state.ping_status == 200 else "Unhealthy"}
                    )
                elif self.path.startswith("/models?"):
                    self.answer(
                        200, {"models": [{"modelName": n, "modelUrl": f"{n}.mar"} for n in state.models]}
                    )
                elif self.path.startswith("/models/") and self.path[8:] in state.models:
                    workers = [
                        {"id": str(9000 + i), "status": s} for i, s in enumerate(state.models[self.path[8:]])
                    ]
                    self.answer(200, [{"modelName": self.path[8:], "minWorkers": 1, "workers": workers}])
                else:
                    self.answer(404, {"code": 404})

            def answer(self, status, body):
                self.send_json(status, json.dumps(body).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def fake_torchserve():
    fake = FakeTorchServe()
    yield fake
    fake.server.shutdown()


def test_healthcheck_is_ready_only_when_every_archive_is_registered_with_ready_workers(
    tmp_path, fake_torchserve
):
    healthcheck = health
    store = tmp_path / "store"
    store.mkdir()
    config = tmp_path / "config.properties"
    config.write_text(
        f"inference_address=http://0.0.0.0:{fake_torchserve.port}\n"
        f"management_address=http://127.0.0.1:{fake_torchserve.port}\nmodel_store={store}\n",
        encoding="utf-8",
    )

    def problem():
        return healthcheck.check(config, tmp_path)

    assert "no .mar archive" in problem()  # /ping is 200 with no model at all: not ready
    (store / "ade.mar").write_bytes(b"archive")
    assert "not registered" in problem()  # an archive that failed to load
    fake_torchserve.models["ade"] = ["UNLOADING"]  # registered, its worker still loading
    assert "0 of 1 workers READY" in problem()
    fake_torchserve.models["ade"] = ["READY"]
    assert problem() is None
    assert healthcheck.main([str(config)]) == 0
    fake_torchserve.ping_status = 500
    assert "/ping answered 500" in problem()
    assert healthcheck.main([str(config)]) == 1
    fake_torchserve.server.shutdown()
    fake_torchserve.server.server_close()
    assert "not answering" in problem()


# --- a real TorchServe started from docker/config.properties ------------------------------------------------------


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for each in sockets:
        each.bind(("127.0.0.1", 0))
    ports = [each.getsockname()[1] for each in sockets]
    for each in sockets:
        each.close()
    return ports


def local_copy_of_the_container_config(target: Path, store: Path) -> Path:
    """docker/config.properties with 127.0.0.1 and free ports (gRPC too), this machine's paths; nothing else."""
    ports = iter(free_ports(5))
    lines = []
    for line in DOCKER_CONFIG.read_text(encoding="utf-8").splitlines():
        key = line.partition("=")[0]
        if key in ("inference_address", "management_address", "metrics_address"):
            line = f"{key}=http://127.0.0.1:{next(ports)}"
        elif key == "model_store":
            line = f"model_store={store}"
        elif key == "metrics_config":
            line = f"metrics_config={ROOT / 'handlers' / 'metrics.yaml'}"  # what the image copies there
        lines.append(line)
    lines += [f"grpc_inference_port={next(ports)}", f"grpc_management_port={next(ports)}"]
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


class ContainerLikeServer:
    """`torchserve --foreground --ncs` with the image's environment (TS_CONFIG_FILE, LOG_LOCATION)."""

    def __init__(self, workdir: Path, store: Path):
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.config = local_copy_of_the_container_config(workdir / "config.properties", store)
        properties = read_properties(self.config)
        self.inference, self.management = properties["inference_address"], properties["management_address"]
        env = dict(os.environ, TS_CONFIG_FILE=str(self.config), LOG_LOCATION=str(workdir / "logs"),
                   METRICS_LOCATION=str(workdir / "logs"))  # fmt: skip
        self.output = open(workdir / "torchserve.out", "w")  # a file, never a pipe (NOTES.md)
        launcher = "from ts.model_server import start; start()"
        self.process = subprocess.Popen(
            [sys.executable, "-c", launcher, "--foreground", "--ncs"],
            cwd=workdir, env=env, stdout=self.output, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def healthcheck(self) -> subprocess.CompletedProcess:
        return run(sys.executable, "-m", "epee_core.ops.health", str(self.config), cwd=self.workdir)

    def wait(self, condition, timeout: float = 180.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if condition():
                    return
            except requests.ConnectionError:
                pass
            assert self.process.poll() is None, (self.workdir / "torchserve.out").read_text()
            time.sleep(0.3)
        raise AssertionError(f"timed out; log: {self.workdir / 'logs'}")

    def stop(self):
        os.killpg(self.process.pid, signal.SIGTERM)  # the launcher does not forward signals: the whole group
        self.process.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and run("pgrep", "-g", str(self.process.pid)).returncode == 0:
            time.sleep(0.3)
        self.output.close()


@pytest.fixture
def container_like_server(tmp_path):
    servers = []

    def start(store: Path) -> ContainerLikeServer:
        servers.append(ContainerLikeServer(tmp_path / f"server{len(servers)}", store))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.mark.integration
def test_container_config_ping_is_healthy_with_an_empty_model_store_but_the_healthcheck_is_not(
    tmp_path, container_like_server
):
    store = tmp_path / "empty-store"
    store.mkdir()
    server = container_like_server(store)
    server.wait(lambda: requests.get(f"{server.inference}/ping", timeout=5).status_code == 200)
    assert requests.get(f"{server.inference}/ping", timeout=5).json() == {"status": "Healthy"}
    assert requests.get(f"{server.management}/models", timeout=5).json() == {"models": []}
    result = server.healthcheck()
    assert result.returncode == 1 and "no .mar archive" in result.stderr


@pytest.mark.integration
def test_container_config_serves_the_store_without_registration_token_or_model_api(
    tmp_path, container_like_server, tokenizer
):
    from conftest import build_tiny_model

    from epee_core.cli import main

    store = tmp_path / "store"
    build_tiny_model(tokenizer).save_pretrained(tmp_path / "tiny")
    (tmp_path / "tiny.yaml").write_text(
        yaml.safe_dump(
            {
                "minWorkers": 1,
                "maxWorkers": 1,
                "batchSize": 4,
                "maxBatchDelay": 50,
                "responseTimeout": 60,
                "epee": {"policy": "epee"},
            }
        ),  # fmt: skip
        encoding="utf-8",
    )
    assert main(["package", "--model", str(tmp_path / "tiny"), "--config", str(tmp_path / "tiny.yaml"),
                 "--name", "tiny", "--export-path", str(store)]) == 0  # fmt: skip
    # a truncated archive, cut in the middle of its largest entry: TorchServe's unzip (a ZipInputStream) then
    # fails. A cut between entries, or bytes that are no zip at all, unzip to a partial or empty model that
    # TorchServe registers anyway (its worker never loads)
    data = (store / "tiny.mar").read_bytes()
    with zipfile.ZipFile(store / "tiny.mar") as archive:
        largest = max(archive.infolist(), key=lambda info: info.compress_size)
    (store / "broken.mar").write_bytes(data[: largest.header_offset + 200 + largest.compress_size // 2])

    server = container_like_server(store)
    describe = f"{server.management}/models/tiny"
    server.wait(
        lambda: [w["status"] for w in requests.get(describe, timeout=5).json()[0]["workers"]] == ["READY"]
    )
    # load_models=all registered tiny.mar with the YAML's batching, and skipped the broken archive, yet /ping is
    # Healthy: only the healthcheck notices
    described = requests.get(describe, timeout=5).json()[0]
    assert (described["batchSize"], described["maxBatchDelay"], described["minWorkers"]) == (4, 50, 1)
    assert requests.get(f"{server.inference}/ping", timeout=5).status_code == 200
    result = server.healthcheck()
    assert result.returncode == 1 and "broken.mar" in result.stderr
    (store / "broken.mar").unlink()
    assert server.healthcheck().returncode == 0

    # no token needed (token authorization is off), registration refused (model API off)
    answer = requests.post(f"{server.inference}/predictions/tiny", json={"text": "Severe rash after amoxicillin."},
                           timeout=60)  # fmt: skip
    assert answer.status_code == 200 and answer.json()["label"] in {"a", "b", "c"}
    assert not (server.workdir / "key_file.json").exists()
    refused = requests.post(f"{server.management}/models", params={"url": "tiny.mar"}, timeout=10)
    assert refused.status_code >= 400
