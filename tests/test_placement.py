"""Where a worker puts the model (docs/operations.md, "GPU workers"), run on the CPU: the `dtype` key, the device
TorchServe's `gpu_id` selects, the handler's placement with a fake context, engine inputs following the model's
device and dtype, and scripts/gpu_check.sh on a host without CUDA."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import build_tiny_model

import epee_core.serving.service as serving
from epee_core.engine.inputs import encode_texts
from epee_core.engine.model import EarlyExitModel
from epee_core.engine.runner import run_bucketed, run_early_exit
from epee_core.engine.spec import ConfigError
from epee_core.serving.config import ServeConfig
from epee_core.serving.service import TextService

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "Pericardial hemorrhage due to acetylsalicylic acid.",
    "Report of two cases.",
    "Rash after penicillin.",
]
JSON = {"body": {"content-type": "application/json"}}


# --- the dtype key and the device --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["float16", "bfloat16", "float32"])
def test_dtype_takes_the_three_float_types(value):
    assert ServeConfig.from_section({"dtype": value}).dtype == value


@pytest.mark.parametrize(("value", "message"), [("fp16", "'dtype' must be one of"), ("int8", "must be one of"),
                                                (16, "'dtype' must be")])  # fmt: skip
def test_dtype_refuses_anything_else(value, message):
    with pytest.raises(ConfigError, match=message):
        ServeConfig.from_section({"dtype": value}, source="m.yaml 'epee:'")


def test_a_gpu_id_places_the_model_on_that_gpu_when_cuda_is_there():
    config = ServeConfig.from_section({"dtype": "float16"})
    assert config.placement(1, cuda_available=True) == (torch.device("cuda", 1), torch.float16)
    assert config.placement("0", cuda_available=True) == (torch.device("cuda", 0), torch.float16)
    assert ServeConfig().placement(0, cuda_available=True) == (torch.device("cuda", 0), torch.float32)


def test_without_cuda_or_without_a_gpu_id_the_model_stays_on_the_cpu_in_float32(caplog):
    config = ServeConfig.from_section({"dtype": "bfloat16"})
    with caplog.at_level(logging.WARNING):
        assert config.placement(0, cuda_available=False) == (torch.device("cpu"), torch.float32)
        assert config.placement(None, cuda_available=True) == (torch.device("cpu"), torch.float32)
    assert "dtype bfloat16 needs a GPU" in caplog.text
    caplog.clear()
    assert ServeConfig().placement(None, cuda_available=False) == (torch.device("cpu"), torch.float32)
    assert caplog.text == ""  # float32 on the CPU is no reason to warn


# --- the handler, with a fake TorchServe context ------------------------------------------------------------------


class FakeContext(SimpleNamespace):
    """What `initialize` reads of TorchServe's context."""


def fake_context(tmp_path: Path, tokenizer, gpu_id, dtype: str | None = None, **extra) -> FakeContext:
    build_tiny_model(tokenizer).save_pretrained(tmp_path / "model")
    section = {"task": "text-classification", **({"dtype": dtype} if dtype else {}), **extra}
    properties = {"model_dir": str(tmp_path), **({"gpu_id": gpu_id} if gpu_id is not None else {})}
    return FakeContext(model_name="tiny", manifest={"model": {"modelVersion": "3.1"}},
                       model_yaml_config={"epee": section}, system_properties=properties)  # fmt: skip


def test_handler_with_a_gpu_id_but_no_cuda_serves_from_the_cpu(tmp_path, tokenizer, monkeypatch, caplog):
    handlers = pytest.importorskip("handlers.text_handler")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    handler = handlers.TextHandler()
    with caplog.at_level(logging.INFO):
        handler.initialize(fake_context(tmp_path, tokenizer, gpu_id=0, dtype="float16"))
    model = handler.service.model
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    assert "device cpu, dtype float32" in caplog.text  # the line scripts/gpu_check.sh looks for
    assert (handler.service.model_name, handler.service.model_version) == ("tiny", "3.1")


def test_handler_with_a_gpu_id_and_cuda_loads_onto_that_gpu(tmp_path, tokenizer, monkeypatch):
    """CUDA pretended: the handler asks the loader for cuda:{gpu_id} in the YAML's dtype (no GPU is touched)."""
    handlers = pytest.importorskip("handlers.text_handler")
    base = sys.modules["handlers.base"]
    asked = {}
    load = EarlyExitModel.from_pretrained

    def loader(directory, device="cpu", dtype=None, quantize="none", runtime="torch"):
        asked.update(device=device, dtype=dtype, quantize=quantize, runtime=runtime)
        return load(directory)  # built on the CPU: this host has no GPU

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(base.EarlyExitModel, "from_pretrained", staticmethod(loader))
    context = fake_context(tmp_path, tokenizer, gpu_id=1, dtype="bfloat16", runtime="onnxruntime")
    handlers.TextHandler().initialize(context)
    # ONNX Runtime layers run on the CPU only: the GPU worker keeps torch
    expected = {
        "device": torch.device("cuda", 1),
        "dtype": torch.bfloat16,
        "quantize": "none",
        "runtime": "torch",
    }
    assert asked == expected


# --- the engine follows the model's device and dtype -----------------------------------------------------------------


def test_from_pretrained_places_and_casts_the_weights(tmp_path, tokenizer):
    build_tiny_model(tokenizer).save_pretrained(tmp_path / "m")
    model = EarlyExitModel.from_pretrained(tmp_path / "m", device="cpu", dtype=torch.bfloat16)
    assert model.device == torch.device("cpu") and model.dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert EarlyExitModel.from_pretrained(tmp_path / "m").dtype == torch.float32


def test_the_service_moves_engine_inputs_to_the_models_device(tokenizer, monkeypatch):
    model = build_tiny_model(tokenizer)
    seen = []

    def recording_run(model, inputs, policy, labels=None):
        seen.extend(tensor.device for tensor in inputs.values())
        return run_bucketed(model, inputs, policy, labels)

    monkeypatch.setattr(serving, "run_bucketed", recording_run)
    svc = TextService(model, ServeConfig.from_section({}))
    assert svc.device == torch.device("cpu")
    assert svc.answer([{"body": {"text": TEXTS[0]}}], [JSON])[0].status == 200
    assert seen and set(seen) == {model.device}


def test_a_half_precision_model_runs_and_answers_in_float32(tokenizer):
    """bfloat16 weights (CPU here, a GPU in production): the runner's masks, policy state and outputs follow the
    hidden states; probabilities come back float32 and the rows still exit where they would alone."""
    model = build_tiny_model(tokenizer).to(torch.bfloat16)
    policy = ServeConfig.from_section({}).policy
    batch = encode_texts(tokenizer, TEXTS, 64)
    together = run_bucketed(model, batch, policy)
    assert together.probs.dtype == torch.float32 and together.entropy.dtype == torch.float32
    assert torch.isfinite(together.probs).all()
    for row, text in enumerate(TEXTS):
        alone = run_early_exit(model, encode_texts(tokenizer, [text], 64), policy)
        assert int(together.exit_layer[row]) == int(alone.exit_layer[0])
    svc = TextService(model, ServeConfig.from_section({}))
    answer = svc.answer([{"body": {"text": TEXTS[0]}}], [JSON])[0]
    assert answer.status == 200 and sum(answer.body["probabilities"].values()) == pytest.approx(1.0, abs=1e-2)


# --- scripts/gpu_check.sh ------------------------------------------------------------------------------------------


def test_gpu_check_says_so_and_passes_on_a_host_without_cuda(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    completed = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=120)  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert "no CUDA device" in completed.stdout and "skipped" in completed.stdout


def test_handler_quantizes_at_load_when_the_yaml_says_int8(tmp_path, tokenizer, caplog):
    handlers = pytest.importorskip("handlers.text_handler")
    from epee_core.engine.quantize import Int8Linear

    handler = handlers.TextHandler()
    with caplog.at_level(logging.INFO):
        handler.initialize(fake_context(tmp_path, tokenizer, gpu_id=None, quantize="int8"))
    assert any(isinstance(module, Int8Linear) for module in handler.service.model.backbone.modules())
    assert "quantize int8" in caplog.text
    (answer,) = handler.service.answer([{"body": {"text": "Rash after penicillin."}}], [{}])
    assert answer.status == 200 and answer.body["exit_layer"] >= 1


def test_handler_runs_onnxruntime_layers_when_the_yaml_says_so(tmp_path, tokenizer, caplog):
    handlers = pytest.importorskip("handlers.text_handler")
    handler = handlers.TextHandler()
    with caplog.at_level(logging.INFO):
        handler.initialize(fake_context(tmp_path, tokenizer, gpu_id=None, runtime="onnxruntime"))
    assert handler.service.model.runtime == "onnxruntime"
    assert handler.service.model.backbone.layer_runtime is not None
    assert "runtime onnxruntime" in caplog.text
    (answer,) = handler.service.answer([{"body": {"text": "Rash after penicillin."}}], [{}])
    assert answer.status == 200 and answer.body["exit_layer"] >= 1
