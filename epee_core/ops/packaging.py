"""`epee package`: a model directory + model YAML → a TorchServe `.mar` (via `torch-model-archiver`).

Archive layout (what the handler finds in its `model_dir`):
  text_handler.py              the entry point (`--handler`; image_handler.py for image-classification)
  handlers/, epee_core/        the handler package and what a worker runs of epee_core (its public API,
                               `engine/` and `serving/`), bundled; no CLI, training or measurement code
  model/                       the model directory: config.json, model.safetensors, tokenizer or image
                               processor, exits.safetensors, epee.yaml
  <model YAML>                 `--config-file`, seen by the handler as `context.model_yaml_config`

The engine is bundled so an archive always runs the code it was built with, on any TorchServe whose Python has
the engine's dependencies (torch, transformers, safetensors, pyyaml); TorchServe puts the archive's directory
first on the worker's PYTHONPATH, so the bundled copy wins over an installed `epee_core`. Weights stay
safetensors: model directories holding pickled weights are refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import yaml

from ..engine.gate import GATE_FILE
from ..engine.model import EarlyExitModel, read_model_spec
from ..engine.onnx_layers import write_layer_graphs
from ..engine.spec import TEXT_TASKS, ConfigError, ModelSpec, parse_yaml
from ..serving.config import SCHEDULERS, ServeConfig, scheduler_keys
from ..serving.service import ARCHIVE_MODEL_DIR

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # epee_core
HANDLERS_DIR = PACKAGE_DIR.parent / "handlers"  # installed next to epee_core (pyproject packages)
# What a worker imports: the public API (epee_core/__init__.py) and the layers it is built from.
WORKER_SOURCES = ("__init__.py", "engine", "serving")
HANDLER_FOR_TASK = {
    **{task: "text_handler.py" for task in TEXT_TASKS},
    "image-classification": "image_handler.py",
}
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class PackageError(RuntimeError):
    """torch-model-archiver failed; the message carries its last lines of output."""


def _copy_sources(source: Path, target: Path, parts: tuple[str, ...] | None = None) -> None:
    """Copy the `.py` files of a package tree, or of its `parts` (files or sub-packages); no data, no caches."""
    roots = [source / part for part in parts] if parts else [source]
    for path in sorted(p for root in roots for p in ([root] if root.is_file() else root.rglob("*.py"))):
        if "__pycache__" in path.parts:
            continue
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, destination)


def _copy_model_dir(model_dir: Path, target: Path) -> None:
    pickled = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLED_SUFFIXES)
    if pickled:
        raise ConfigError(
            f"{model_dir}: pickled weights ({', '.join(pickled)}); re-save the model with safetensors"
        )
    shutil.copytree(model_dir, target, ignore=shutil.ignore_patterns("__pycache__", ".*"))


def check_inputs(model_dir: Path, config_path: Path, name: str) -> tuple[ModelSpec, ServeConfig]:
    """Validate everything the archive needs before building it; errors name the file and key."""
    if not MODEL_NAME.match(name):
        raise ConfigError(f"--name {name!r}: use letters, digits, '_', '-' and '.' (TorchServe model names)")
    spec = read_model_spec(model_dir)
    serve_config = ServeConfig.load(config_path)
    serve_config.check_model(spec, str(config_path), str(model_dir))
    if serve_config.policy.name == "gate" and not (model_dir / GATE_FILE).is_file():
        raise ConfigError(
            f"{config_path}: policy 'gate' needs {model_dir / GATE_FILE} (run `epee train-gate`)"
        )
    if spec.task not in HANDLER_FOR_TASK:
        raise ConfigError(f"{model_dir}: no TorchServe handler for task '{spec.task}' yet")
    return spec, serve_config


def check_archive(archive: str | Path) -> ServeConfig | None:
    """The model YAML inside a `.mar`, checked as a worker checks it at load (TorchServe's keys and the `epee:`
    section); None for an archive without a model YAML. Errors name the YAML and the archive."""
    archive = Path(archive)
    try:
        with zipfile.ZipFile(archive) as mar:
            manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
            config_name = manifest.get("model", {}).get("configFile")
            if not config_name:
                return None
            text = mar.read(config_name).decode("utf-8")
    except (zipfile.BadZipFile, KeyError, ValueError, AttributeError) as error:
        raise ConfigError(f"{archive}: not a TorchServe archive with a readable manifest ({error})") from None
    source = f"{config_name} in {archive}"
    return ServeConfig.from_model_yaml(parse_yaml(text, source), source)


def _archived_config(config_path: Path, target: Path, quantize: str | None, scheduler: str | None) -> Path:
    """A copy of the model YAML with `quantize` in its `epee:` section and the TorchServe keys of `scheduler`
    (either None: as the YAML says)."""
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    if quantize is not None:
        config["epee"] = {**config["epee"], "quantize": quantize}
    if scheduler is not None:
        config = scheduler_keys(config, scheduler)
    target.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return target


def archiver_command() -> list[str]:
    """`torch-model-archiver` from the running environment (next to this Python), else from PATH."""
    beside = Path(sys.executable).parent / "torch-model-archiver"
    found = str(beside) if beside.is_file() else shutil.which("torch-model-archiver")
    if not found:
        raise ConfigError("torch-model-archiver not found: pip install torch-model-archiver")
    return [found]


def package_model(
    model_dir: str | Path,
    config_path: str | Path,
    name: str,
    version: str = "1.0",
    export_path: str | Path = "model_store",
    quantize: str | None = None,
    scheduler: str | None = None,
) -> dict:
    """Build `export_path/NAME.mar` (overwriting it); returns a summary with the archive's path and size.

    `quantize` ("int8" or "none") overrides the YAML's `quantize` in the archived copy: the worker quantizes at
    load, so the archive keeps the float32 weights either way. `scheduler` ("batch" or "continuous", see
    `scheduler_keys`) overrides how TorchServe batches."""
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise ConfigError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
    model_dir, config_path, export_path = Path(model_dir), Path(config_path), Path(export_path)
    spec, serve_config = check_inputs(model_dir, config_path, name)
    handler_file = HANDLERS_DIR / HANDLER_FOR_TASK[spec.task]
    if not handler_file.is_file():
        raise ConfigError(f"{handler_file}: handler not found (is the handlers package installed?)")
    export_path.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="epee-package-") as work:
        extra = Path(work) / "extra"
        _copy_model_dir(model_dir, extra / ARCHIVE_MODEL_DIR)
        _copy_sources(PACKAGE_DIR, extra / "epee_core", WORKER_SOURCES)
        _copy_sources(HANDLERS_DIR, extra / "handlers")
        if quantize is not None or scheduler is not None:
            config_path = _archived_config(config_path, Path(work) / config_path.name, quantize, scheduler)
            serve_config = ServeConfig.load(config_path)
        if serve_config.runtime == "onnxruntime":  # exported once here, so workers load without exporting
            write_layer_graphs(EarlyExitModel.from_pretrained(model_dir), extra / ARCHIVE_MODEL_DIR)
        continuous = bool(yaml.safe_load(config_path.read_text(encoding="utf-8")).get("continuousBatching"))
        command = archiver_command() + [
            "--model-name", name,
            "--version", version,
            "--handler", str(extra / "handlers" / handler_file.name),
            "--extra-files", str(extra),
            "--config-file", str(config_path),
            "--export-path", str(export_path),
            "--force",
        ]  # fmt: skip
        # The archiver stages files in $TMPDIR/NAME: a private TMPDIR keeps concurrent runs apart.
        env = {**os.environ, "TMPDIR": work}
        completed = subprocess.run(command, capture_output=True, text=True, env=env)
    archive = export_path / f"{name}.mar"
    if completed.returncode != 0 or not archive.is_file():
        output = (completed.stderr or completed.stdout).strip().splitlines()
        raise PackageError("torch-model-archiver failed: " + " | ".join(output[-3:]))
    return {
        "archive": str(archive),
        "name": name,
        "version": version,
        "task": spec.task,
        "handler": handler_file.name,
        "policy": serve_config.policy.describe(),
        "quantize": serve_config.quantize,
        "runtime": serve_config.runtime,
        "scheduler": "continuous" if continuous else "batch",
        "size_mb": round(archive.stat().st_size / 1e6, 2),
        "seconds": round(time.perf_counter() - started, 1),
    }
