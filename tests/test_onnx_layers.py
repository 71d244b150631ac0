"""Layers in ONNX Runtime (engine/onnx_layers.py): every backbone exports and answers as torch does, a row's exit
does not depend on its batch-mates, torch stays for training and the stock forward, and every command and the
worker take `runtime`."""

from __future__ import annotations

import json
import shutil
import zipfile

import pytest
import torch
import yaml
from helpers import build_tiny_model, calibrate_tiny, random_batch, random_pixels, single_row

from epee_core.calibration.cache import LogitCache
from epee_core.cli import main
from epee_core.engine import onnx_layers
from epee_core.engine.model import EarlyExitModel
from epee_core.engine.onnx_layers import OnnxRuntimeLayers, resolve_runtime, use_runtime, write_layer_graphs
from epee_core.engine.policies import make_policy
from epee_core.engine.quantize import quantize_model
from epee_core.engine.runner import run_bucketed, run_early_exit
from epee_core.engine.spec import ConfigError
from epee_core.serving.config import ServeConfig


def inputs_for(model: EarlyExitModel, batch_size: int = 8) -> dict[str, torch.Tensor]:
    if model.backbone.modality == "image":
        return random_pixels(batch_size, seed=3)
    return random_batch(batch_size, len(model.tokenizer), max_len=30, seed=3)


@pytest.mark.parametrize("kind", ["bert", "albert", "gpt2", "vit"])
def test_every_backbone_answers_in_onnxruntime_as_in_torch(tokenizer, kind):
    model = build_tiny_model(tokenizer, kind=kind)
    inputs = inputs_for(model)
    with torch.inference_mode():
        reference = model.forward_all_exits(inputs)
        stock = model.stock_logits(inputs)
    use_runtime(model, "onnxruntime")
    assert model.runtime == "onnxruntime" and isinstance(model.backbone.layer_runtime, OnnxRuntimeLayers)
    with torch.inference_mode():
        logits = model.forward_all_exits(inputs)
        torch.testing.assert_close(model.stock_logits(inputs), stock, rtol=0, atol=0)  # still torch
    assert not torch.equal(logits, reference)  # other arithmetic (so this is not torch running) ...
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)  # ... with the same answers
    policy = make_policy("entropy", {"entropy_threshold": 0.3})
    use_runtime(model, "torch")  # "torch" changes nothing: the runtime stays attached
    ours = run_bucketed(model, inputs, policy)
    model.backbone.layer_runtime = None
    theirs = run_bucketed(model, inputs, policy)
    assert torch.equal(ours.exit_layer, theirs.exit_layer)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_a_row_exits_where_it_exits_alone(tokenizer, kind):
    model = use_runtime(build_tiny_model(tokenizer, kind=kind), "onnxruntime")
    batch = inputs_for(model, 12)
    policy = make_policy("entropy", {"entropy_threshold": 0.3})
    batched = run_bucketed(model, batch, policy, overhead_tokens=4)
    assert len(set(batched.exit_layer.tolist())) > 1  # rows leave at different layers: compaction ran
    for row in range(12):
        alone = run_early_exit(model, single_row(batch, row), policy)
        assert batched.exit_layer[row] == alone.exit_layer[0], f"row {row}"
        torch.testing.assert_close(batched.probs[row], alone.probs[0], atol=1e-5, rtol=1e-4)


def test_sessions_follow_the_torch_thread_count(tokenizer):
    model = use_runtime(build_tiny_model(tokenizer), "onnxruntime")
    inputs = inputs_for(model, 2)
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            model.forward_all_exits(inputs)
    finally:
        torch.set_num_threads(previous)
    runtime = model.backbone.layer_runtime
    assert {1, 2} <= set(runtime._sessions)
    assert runtime.sessions(2)[0].get_session_options().intra_op_num_threads == 2


def test_runtime_is_float32_on_the_cpu_only(tokenizer):
    with pytest.raises(ConfigError, match="one of torch, onnxruntime"):
        use_runtime(build_tiny_model(tokenizer), "tensorrt")
    with pytest.raises(ConfigError, match="does not combine with quantize int8"):
        use_runtime(quantize_model(build_tiny_model(tokenizer), "int8"), "onnxruntime")
    with pytest.raises(ConfigError, match="float32 on the CPU"):
        use_runtime(build_tiny_model(tokenizer).to(torch.bfloat16), "onnxruntime")


def test_runtime_is_a_checked_serving_key():
    assert ServeConfig.from_section({"runtime": "onnxruntime"}).runtime == "onnxruntime"
    assert ServeConfig.from_section({}).runtime == "torch"
    with pytest.raises(ConfigError, match="'runtime' must be one of torch, onnxruntime"):
        ServeConfig.from_section({"runtime": "onnx"})
    with pytest.raises(ConfigError, match="does not combine with quantize"):
        ServeConfig.from_section({"runtime": "onnxruntime", "quantize": "int8"})
    config = ServeConfig.from_section({"runtime": "onnxruntime"})
    assert config.runtime_on(torch.device("cpu")) == "onnxruntime"
    assert config.runtime_on(torch.device("cuda", 0)) == "torch"  # one archive serves CPU and GPU replicas


def test_auto_means_onnxruntime_for_float32_when_installed(monkeypatch):
    assert resolve_runtime("auto", "none") == "onnxruntime"
    assert resolve_runtime("auto", "int8") == "torch"  # int8 keeps its own kernels
    assert resolve_runtime("torch", "none") == "torch"
    monkeypatch.setattr(onnx_layers.importlib.util, "find_spec", lambda name: None)
    assert resolve_runtime("auto", "none") == "torch"


def test_calibrate_writes_the_runtime_and_bench_and_evaluate_read_it(tiny_model_dir, tmp_path, capsys):
    model_dir = tiny_model_dir
    output, cache = calibrate_tiny(model_dir, tmp_path, "--runtime", "onnxruntime")
    data = tmp_path / "dev.jsonl"
    capsys.readouterr()
    assert yaml.safe_load(output.read_text())["epee"]["runtime"] == "onnxruntime"
    assert LogitCache.load(cache).fingerprint["runtime"] == "onnxruntime"  # a torch cache is not reused
    argv = ["bench", "--model", str(model_dir), "--data", str(data), "--config", str(output),
            "--policies", "full", "--batch-sizes", "8", "--threads", "1", "--output-dir", str(tmp_path), "--json"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["runtime"] == "onnxruntime" and report["quantize"] == "none"
    assert [row["policy"] for row in report["results"]] == ["full", "hf"]
    assert main(["evaluate", "--model", str(model_dir), "--data", str(data), "--config", str(output),
                 "--runtime", "torch", "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["accuracy"] >= 0
    argv = ["package", "--model", str(model_dir), "--config", str(output), "--name", "tiny-ort",
            "--export-path", str(tmp_path / "store"), "--json"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["runtime"] == "onnxruntime"
    with zipfile.ZipFile(summary["archive"]) as archive:  # exported once, at packaging
        names = set(archive.namelist())
        assert {"model/onnx/manifest.json", "model/onnx/layer-0.onnx"} <= names


def test_a_worker_reads_the_packaged_graphs_and_exports_only_when_they_are_stale(
    tiny_model_dir, tmp_path, monkeypatch
):
    directory = tmp_path / "model"
    shutil.copytree(tiny_model_dir, directory)
    write_layer_graphs(EarlyExitModel.from_pretrained(directory), directory)
    exported = []
    real_export = onnx_layers.export_layer
    monkeypatch.setattr(
        onnx_layers, "export_layer", lambda *args: exported.append(args) or real_export(*args)
    )
    model = EarlyExitModel.from_pretrained(directory, runtime="onnxruntime")
    assert exported == []  # read, not exported
    inputs = inputs_for(model, 4)
    reference = EarlyExitModel.from_pretrained(directory).forward_all_exits(inputs)
    torch.testing.assert_close(model.forward_all_exits(inputs), reference, rtol=1e-4, atol=1e-4)
    spec = directory / "config.json"  # other weights: the graphs no longer match
    spec.write_text(spec.read_text() + "\n")
    EarlyExitModel.from_pretrained(directory, runtime="onnxruntime")
    assert len(exported) == model.num_layers
