"""The open-loop benchmark (`epee bench --arrival-rate`): arrivals, TorchServe's batching rule, the layer-level
contestant's answers, the report's fields. Speed is measured by the benchmark itself, never asserted here."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import DEMO_DATA, build_tiny_model

from epee_core.cli import main
from epee_core.data.text import read_examples
from epee_core.engine.inputs import Example
from epee_core.engine.policies import make_policy
from epee_core.measure import openloop

POLICY = make_policy("entropy", {"entropy_threshold": 0.3})


@pytest.fixture(scope="module")
def examples():
    """24 ADE sentences labelled with the tiny model's labels a, b, c in turn."""
    rows = read_examples(DEMO_DATA / "ade_demo_dev.jsonl", "text-classification", max_samples=24)
    return [Example(row.text, "abc"[number % 3]) for number, row in enumerate(rows)]


def test_poisson_arrivals_are_seeded_increasing_and_have_the_rate():
    times = openloop.poisson_arrivals(4000, 50.0, seed=3)
    assert times == openloop.poisson_arrivals(4000, 50.0, seed=3)
    assert all(a < b for a, b in zip(times, times[1:]))
    assert len(times) / times[-1] == pytest.approx(50.0, rel=0.1)
    assert openloop.poisson_arrivals(3, math.inf) == [0.0, 0.0, 0.0]


def test_rates_are_requests_per_second_or_fractions_of_capacity():
    assert openloop.parse_rates("10,0.5x", capacity=40.0) == [10.0, 20.0]
    with pytest.raises(ValueError, match="fast"):
        openloop.parse_rates("fast", 40.0)
    with pytest.raises(ValueError, match="positive"):
        openloop.parse_rates("0x", 40.0)


def test_a_batch_closes_when_full_or_when_the_delay_runs_out():
    """TorchServe's rule: requests already waiting join at once, later ones only within the delay."""
    batches = []

    def record(batch):
        batches.append(len(batch))
        return [(0, 1)] * len(batch)

    workload = openloop.Workload(list(range(5)), [0.0, 0.0, 0.0, 0.01, 0.5])
    openloop.serve_batches(workload, record, batch_size=2, delay_ms=50)
    assert batches == [2, 2, 1]
    batches.clear()
    openloop.serve_batches(workload, record, batch_size=8, delay_ms=50)
    assert batches == [4, 1]


def test_the_layer_level_contestant_answers_as_batch_level_epee(tokenizer, examples, monkeypatch):
    model = build_tiny_model(tokenizer)
    serve_continuously, cohort_threads = openloop.serve_continuously, []

    def recording(workload, model, policy, limits, profile=None):
        cohort_threads.append(limits.cohort_threads)
        return serve_continuously(workload, model, policy, limits, profile)

    monkeypatch.setattr(openloop, "serve_continuously", recording)
    bench = openloop.OpenLoopBench(model, examples, POLICY, batch_size=4, delays_ms=(0,), requests=24)
    workload = bench.workload(200.0, 24)
    _, batch_answers = bench.serve(openloop.Contestant("batch", POLICY.name, 0), workload)
    _, layer_answers = bench.serve(openloop.Contestant("continuous", POLICY.name), workload)
    assert layer_answers == batch_answers
    assert len({layer for _, layer in layer_answers}) > 1, "the tiny model should exit at several layers"
    side_by_side = openloop.Contestant("continuous", POLICY.name, cohort_threads=2)  # its own cohort threads
    profile: dict = {}
    assert bench.serve(side_by_side, workload, profile)[1] == batch_answers
    assert profile["steps"] > 0
    row = bench.run_all([side_by_side], 200.0, 8)[0]
    assert row["cohort_threads"] == 2 and "cohort_threads" not in bench.run(
        openloop.Contestant("batch", "full", 0), 200.0, 8
    )
    assert cohort_threads[0] == 1 and set(cohort_threads[1:]) == {2}  # the bench's limits, then its own


def test_bench_arrival_rate_prints_every_contestant_and_the_slo_capacity(tokenizer, tmp_path, capsys):
    threads_before = torch.get_num_threads()
    model_dir = tmp_path / "model"
    build_tiny_model(tokenizer).save_pretrained(model_dir)
    config = tmp_path / "model.yaml"
    config.write_text(
        "batchSize: 4\nmaxBatchDelay: 5\nepee:\n  policy: entropy\n  entropy_threshold: 0.3\n  slo_p95_ms: 200\n"
    )
    data = tmp_path / "data.jsonl"
    rows = [json.loads(line) for line in (DEMO_DATA / "ade_demo_dev.jsonl").read_text().splitlines()[:20]]
    data.write_text("".join(json.dumps({"text": row["text"], "label": "abc"[i % 3]}) + "\n"
                            for i, row in enumerate(rows)))  # fmt: skip
    code = main(["bench", "--model", str(model_dir), "--data", str(data), "--config", str(config), "--arrival-rate", "0.5x,0.75x",
                 "--delays", "0,5", "--requests", "20", "--rounds", "2", "--output-dir", str(tmp_path / "reports"),
                 "--threads", "1", "--cohort-threads", "2", "--json"])  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["threads"], report["cohort_threads"]) == (1, 2)
    assert torch.get_num_threads() == threads_before  # the bench puts torch's setting back
    contestants = {(row["scheduler"], row["policy"], row["max_batch_delay_ms"]) for row in report["results"]}
    assert contestants == {
        ("batch", "hf", 0.0), ("batch", "hf", 5.0), ("batch", "full", 0.0), ("batch", "full", 5.0),
        ("batch", "entropy", 0.0), ("batch", "entropy", 5.0), ("continuous", "entropy", None),
    }  # fmt: skip
    for row in report["results"]:
        for key in ("rate", "p50_ms", "p95_ms", "p99_ms", "throughput", "accuracy", "avg_exit_layer"):
            assert row[key] is not None, key
        assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
    accuracy = {(row["scheduler"], row["policy"], row["rate"]): row["accuracy"] for row in report["results"]}
    for rate in report["rates"]:  # the same rows, answered as alone, whichever scheduler and threads
        rate = round(rate, 3)
        assert accuracy[("continuous", "entropy", rate)] == accuracy[("batch", "entropy", rate)]
    assert report["rates"] == pytest.approx([0.5 * report["capacity"], 0.75 * report["capacity"]], rel=1e-3)
    assert set(report["slo_capacity"]) == {"batch/hf", "batch/full", "batch/entropy", "continuous/entropy"}
    assert report["slo_p95_ms"] == 200
    assert report["recommended"]["scheduler"] in ("batch", "continuous")
    assert len(report["comparisons"]) == 2


def test_contestants_take_turns_on_the_same_requests(tokenizer, examples, monkeypatch):
    """Each round serves one slice of the requests to every contestant, the first turn rotating."""
    bench = openloop.OpenLoopBench(build_tiny_model(tokenizer), examples, POLICY, delays_ms=(0,), requests=12,
                                   rounds=3)  # fmt: skip
    served = []

    def record(contestant, workload, profile=None):
        served.append((contestant.policy, tuple(example.text for example in workload.examples)))
        return [0.01] * len(workload.arrivals), [(0, 1)] * len(workload.arrivals)

    monkeypatch.setattr(bench, "serve", record)
    contestants = [openloop.Contestant("batch", "hf", 0), openloop.Contestant("continuous", POLICY.name)]
    rows = bench.run_all(contestants, 100.0)
    assert [policy for policy, _ in served] == ["hf", "entropy", "entropy", "hf", "hf", "entropy"]
    assert served[0][1] == served[1][1] != served[2][1] == served[3][1]
    assert [row["requests"] for row in rows] == [12, 12]
