"""`epee bench`: the ratio math, and a real side-by-side run of every policy on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import DEMO_DATA, build_tiny_model

from epee_core.cli import main
from epee_core.measure.bench import add_ratios, default_policy_names, realised_saving


def row(policy: str, samples_per_second: float, layer_speedup: float) -> dict:
    return {"policy": policy, "samples_per_second": samples_per_second, "layer_speedup": layer_speedup}


def test_realised_saving_is_one_when_wall_time_falls_like_the_layers():
    assert realised_saving(measured_speedup=2.0, layer_speedup=2.0) == pytest.approx(1.0)


def test_realised_saving_is_the_share_of_the_layer_saving_that_became_time():
    # half the layers skipped (theoretical saving 50 %), a quarter of the time saved (4/3 ×): half realised
    assert realised_saving(measured_speedup=4 / 3, layer_speedup=2.0) == pytest.approx(0.5)


def test_realised_saving_is_negative_when_early_exit_costs_more_than_it_saves():
    assert realised_saving(measured_speedup=0.8, layer_speedup=1.5) < 0


def test_realised_saving_is_undefined_when_no_layer_is_skipped():
    assert realised_saving(measured_speedup=1.02, layer_speedup=1.0) is None


def test_ratios_are_relative_to_full_and_oracle():
    rows = add_ratios([row("full", 100.0, 1.0), row("epee", 180.0, 2.0), row("oracle", 300.0, 4.0)])
    full, epee, oracle = rows
    assert (full["throughput_vs_full"], full["throughput_vs_oracle"]) == (1.0, pytest.approx(1 / 3, abs=1e-4))
    assert (epee["throughput_vs_full"], epee["throughput_vs_oracle"]) == (1.8, 0.6)
    assert epee["realised_saving"] == pytest.approx((1 - 1 / 1.8) / 0.5, abs=1e-4)
    assert oracle["throughput_vs_oracle"] == 1.0 and full["realised_saving"] is None


def test_ratios_are_none_when_full_or_oracle_was_not_run():
    (epee,) = add_ratios([row("epee", 180.0, 2.0)])
    assert (epee["throughput_vs_full"], epee["throughput_vs_oracle"], epee["realised_saving"]) == (None,) * 3


def test_default_policies_hold_the_yaml_policy_once():
    assert default_policy_names("epee") == ["full", "epee", "patience", "entropy", "oracle"]
    assert default_policy_names("patience") == ["full", "patience", "entropy", "oracle"]


@pytest.fixture(scope="module")
def bench_inputs(tmp_path_factory, tokenizer):
    """A tiny saved model (labels a, b, c) and 24 real ADE sentences labelled round-robin with them."""
    work = tmp_path_factory.mktemp("bench")
    model_dir = work / "tiny-model"
    build_tiny_model(tokenizer).save_pretrained(model_dir)
    sentences = [json.loads(line)["text"] for line in (DEMO_DATA / "ade_demo_dev.jsonl").open()][:24]
    data = work / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"text": text, "label": "abc"[i % 3]}) + "\n" for i, text in enumerate(sentences))
    )
    return model_dir, data, work


def run_bench_cli(capsys, model_dir, data, output_dir, *extra: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(
        ["bench", "--model", str(model_dir), "--data", str(data), "--output-dir", str(output_dir), *extra]
    )
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_bench_runs_every_policy_at_every_batch_size_and_writes_json_and_markdown(bench_inputs, capsys):
    model_dir, data, work = bench_inputs
    threads_before = torch.get_num_threads()
    code, out, _ = run_bench_cli(
        capsys, model_dir, data, work / "out", "--batch-sizes", "1,4", "--threads", "1", "--json"
    )
    assert code == 0
    report = json.loads(out)
    assert report["num_threads"] == 1 and torch.get_num_threads() == threads_before
    assert report["num_samples"] == 24 and report["batch_sizes"] == [1, 4]
    names = ["full", "epee", "patience", "entropy", "oracle"]
    assert [(r["batch_size"], r["policy"]) for r in report["results"]] == [
        (b, n) for b in (1, 4) for n in [*names, "hf"]
    ]
    for result in report["results"]:
        assert result["batch_ms_p50"] <= result["batch_ms_p95"] and result["samples_per_second"] > 0
    by_key = {(r["batch_size"], r["policy"]): r for r in report["results"]}
    for batch_size in (1, 4):
        full, oracle = by_key[batch_size, "full"], by_key[batch_size, "oracle"]
        assert (full["avg_exit_layer"], full["throughput_vs_full"], oracle["throughput_vs_oracle"]) == (
            4,
            1,
            1,
        )
        assert all(oracle["accuracy"] >= by_key[batch_size, name]["accuracy"] for name in names)
        stock = by_key[batch_size, "hf"]  # the plain Hugging Face forward answers as full depth does
        assert (stock["accuracy"], stock["avg_exit_layer"], stock["throughput_vs_hf"]) == (
            full["accuracy"],
            4,
            1,
        )
        assert full["throughput_vs_hf"] > 0
    for name in names:  # the runner's batch invariance: same exits and answers at batch 1 and 4
        assert by_key[1, name]["exit_layer_counts"] == by_key[4, name]["exit_layer_counts"]
        assert by_key[1, name]["accuracy"] == by_key[4, name]["accuracy"]
    json_path, markdown_path = report["written"]
    assert json.loads(open(json_path).read())["results"] == report["results"]
    markdown = open(markdown_path).read()
    assert "## batch size 1" in markdown and "## batch size 4" in markdown and "| oracle |" in markdown
    assert "| hf |" in markdown and "× hf" in markdown


def test_bench_takes_the_policy_and_threads_from_the_model_yaml(bench_inputs, capsys):
    model_dir, data, work = bench_inputs
    config = work / "model.yaml"
    config.write_text("epee:\n  policy: patience\n  patience: 1\n  num_threads: 1\n")
    code, out, _ = run_bench_cli(
        capsys, model_dir, data, work / "out", "--config", str(config), "--batch-sizes", "8", "--json"
    )
    assert code == 0
    report = json.loads(out)
    assert report["num_threads"] == 1
    assert [r["policy"] for r in report["results"]] == ["full", "patience", "entropy", "oracle", "hf"]
    assert report["results"][1]["params"]["patience"] == 1


def test_bench_refuses_a_policy_named_twice_in_one_line(bench_inputs, capsys):
    model_dir, data, work = bench_inputs
    code, _, err = run_bench_cli(capsys, model_dir, data, work / "out", "--policies", "full,epee,full")
    assert code == 2 and "names a policy twice" in err and err.count("\n") == 1


def test_bench_refuses_bad_batch_sizes_in_one_line(bench_inputs, capsys):
    model_dir, data, work = bench_inputs
    code, _, err = run_bench_cli(capsys, model_dir, data, work / "out", "--batch-sizes", "8,zero")
    assert code == 2 and "--batch-sizes expects" in err
