"""int8 on CPU (engine/quantize.py): the layer-wise runner works unchanged on every backbone, answers stay close to
float32, a row's exit does not depend on its batch-mates, and every command and the worker take `quantize`."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch
import yaml
from helpers import build_tiny_model, calibrate_tiny, labelled_rows, random_batch, random_pixels, single_row

from epee_core.cli import main
from epee_core.engine import quantize as quantize_module
from epee_core.engine.model import EarlyExitModel
from epee_core.engine.policies import make_policy
from epee_core.engine.quantize import Int8Linear, int8_kernel, quantize_model
from epee_core.engine.runner import run_bucketed, run_early_exit
from epee_core.engine.spec import ConfigError
from epee_core.serving.config import ServeConfig

KINDS = ["bert", "albert", "gpt2", "vit"]


def inputs_for(model: EarlyExitModel, batch_size: int = 8) -> dict[str, torch.Tensor]:
    if model.backbone.modality == "image":
        return random_pixels(batch_size, seed=5)
    return random_batch(batch_size, len(model.tokenizer), max_len=30, seed=5)


@pytest.fixture(params=quantize_module.KERNELS)
def kernel(request, monkeypatch):
    """Each int8 kernel in turn, whatever this CPU would choose."""
    monkeypatch.setattr(quantize_module, "int8_kernel", lambda: request.param)
    return request.param


def test_int8_linear_is_close_to_the_float_product(kernel):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    x = torch.randn(10, 64)
    error = (Int8Linear.from_linear(linear)(x) - linear(x)).abs().max()
    assert 0 < error < 0.05 * linear(x).abs().max()  # quantized (not equal), but close


def test_the_fbgemm_kernel_is_the_exact_7_bit_per_token_product(monkeypatch):
    """The fence row pins fbgemm's range: its answer is exactly (x / s rounded to [-63, 63]) · W_int8ᵀ, per token."""
    monkeypatch.setattr(quantize_module, "int8_kernel", lambda: "fbgemm")
    torch.manual_seed(1)
    linear = torch.nn.Linear(96, 40)
    module = Int8Linear.from_linear(linear)
    x = torch.randn(17, 96) * torch.logspace(-2, 2, 17)[:, None]  # rows of very different sizes
    scale = x.abs().amax(1, keepdim=True) / 63
    expected = (x / scale).round().double() @ module.weight_t.double()
    expected = (expected.float() * scale * module.weight_scale) + linear.bias
    torch.testing.assert_close(module(x), expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(module(x[3:4]), module(x)[3:4], rtol=0, atol=0)  # alone == in the batch


def test_the_kernel_follows_the_cpu_flags_unless_forced(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    real_path = quantize_module.Path
    monkeypatch.setattr(
        quantize_module, "Path", lambda name: cpuinfo if name == "/proc/cpuinfo" else real_path(name)
    )
    monkeypatch.delenv("EPEE_INT8_KERNEL", raising=False)
    for flags, chosen in (("fpu sse2 avx2 fma", "fbgemm"), ("fpu sse2 avx2 avx512_vnni", "int_mm"),
                          ("fp asimd", "int_mm")):  # fmt: skip
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        int8_kernel.cache_clear()
        assert int8_kernel() == chosen, flags
    monkeypatch.setenv("EPEE_INT8_KERNEL", "int_mm")
    int8_kernel.cache_clear()
    assert int8_kernel() == "int_mm"
    monkeypatch.setenv("EPEE_INT8_KERNEL", "vnni")
    int8_kernel.cache_clear()
    with pytest.raises(ValueError, match="EPEE_INT8_KERNEL='vnni'"):
        int8_kernel()
    monkeypatch.delenv("EPEE_INT8_KERNEL")
    int8_kernel.cache_clear()


@pytest.mark.parametrize("kind", KINDS)
def test_every_backbone_runs_in_int8_close_to_float32(tokenizer, kind, kernel):
    model = build_tiny_model(tokenizer, kind=kind)
    inputs = inputs_for(model)
    reference = run_bucketed(model, inputs, make_policy("full")).probs
    quantize_model(model, "int8")
    assert model.quantization == "int8"
    assert any(isinstance(module, Int8Linear) for module in model.backbone.modules())
    assert not any(isinstance(module, Int8Linear) for module in model.exits.modules())  # heads stay float32
    probs = run_bucketed(model, inputs, make_policy("full")).probs
    assert torch.equal(probs.argmax(-1), reference.argmax(-1))
    assert (probs - reference).abs().max() < 0.1  # random tiny models with sharpened heads: the worst case


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_an_int8_row_exits_where_it_exits_alone(tokenizer, kind, kernel):
    """Per-token activation scales: a row's int8 arithmetic does not depend on the rest of its batch."""
    model = quantize_model(build_tiny_model(tokenizer, kind=kind), "int8")
    batch = inputs_for(model, 12)
    policy = make_policy("entropy", {"entropy_threshold": 0.3})
    batched = run_bucketed(model, batch, policy, overhead_tokens=4)
    for row in range(12):
        alone = run_early_exit(model, single_row(batch, row), policy)
        assert batched.exit_layer[row] == alone.exit_layer[0], f"row {row}"
        torch.testing.assert_close(batched.probs[row], alone.probs[0], atol=1e-4, rtol=1e-3)


def test_quantize_is_a_checked_serving_key():
    assert ServeConfig.from_section({"quantize": "int8"}).quantize == "int8"
    assert ServeConfig.from_section({}).quantize == "none"
    with pytest.raises(ConfigError, match="'quantize' must be one of none, int8"):
        ServeConfig.from_section({"quantize": "int4"})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("quantize") / "tiny"
    build_tiny_model(tokenizer).save_pretrained(directory)
    return directory


def test_bench_in_int8_keeps_the_float32_stock_row(model_dir, tmp_path, capsys):
    data = labelled_rows(tmp_path / "dev.jsonl", 24)
    argv = ["bench", "--model", str(model_dir), "--data", str(data), "--policies", "full,entropy",
            "--batch-sizes", "8", "--threads", "1", "--quantize", "int8", "--output-dir", str(tmp_path), "--json"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["quantize"] == "int8"
    assert [row["policy"] for row in report["results"]] == ["full", "entropy", "hf"]
    assert all(row["throughput_vs_hf"] > 0 for row in report["results"])


def test_calibrate_in_int8_judges_against_float32_and_the_yaml_says_int8(model_dir, tmp_path, capsys):
    output, cache = calibrate_tiny(model_dir, tmp_path, "--quantize", "int8")
    capsys.readouterr()
    assert yaml.safe_load(output.read_text())["epee"]["quantize"] == "int8"
    from epee_core.calibration.cache import LogitCache

    stored = LogitCache.load(cache)
    fp32 = EarlyExitModel.from_pretrained(model_dir)
    assert stored.reference is not None and stored.fingerprint["quantize"] == "int8"
    assert not torch.equal(stored.reference, stored.logits[-1])  # int8's last exit differs from float32's ...
    torch.testing.assert_close(
        stored.reference, stored.full_depth_logits[-1]
    )  # ... which `full` is judged by
    assert fp32.quantization == "none"


def test_evaluate_takes_quantize_from_the_yaml_and_package_can_set_it(model_dir, tmp_path, capsys):
    data = labelled_rows(tmp_path / "dev.jsonl", 16)
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "minWorkers: 1\nmaxWorkers: 1\nbatchSize: 4\nmaxBatchDelay: 20\nepee:\n  policy: full\n"
    )
    assert main(["evaluate", "--model", str(model_dir), "--data", str(data), "--config", str(config),
                 "--quantize", "int8", "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["accuracy"] >= 0
    argv = ["package", "--model", str(model_dir), "--config", str(config), "--name", "tiny8",
            "--export-path", str(tmp_path / "store"), "--quantize", "int8", "--json"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["quantize"] == "int8"
    with zipfile.ZipFile(summary["archive"]) as archive:
        assert yaml.safe_load(archive.read("tiny.yaml"))["epee"]["quantize"] == "int8"
    assert "quantize" not in yaml.safe_load(config.read_text())["epee"]  # the user's file is left alone
