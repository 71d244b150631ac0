"""Calibration: replay on cached logits equals the live runner, the choice on synthetic caches with a
known optimum, the `full` fallback, cache reuse and staleness, and the model YAML it writes."""

from __future__ import annotations

import json
import random
import re
import shutil

import pytest
import torch
import yaml
from helpers import DEMO_DATA, LABELS, NUM_LAYERS, build_tiny_model, tiny_spec

from epee_core.calibration import (
    CalibrationJob,
    CalibrationOptions,
    LayerTimes,
    LogitCache,
    ServingOptions,
    StaleCacheError,
    build_cache,
    calibrate,
    fingerprint,
    load_fresh,
    model_yaml,
    replay_policy,
    run_calibration,
)
from epee_core.calibration.pipeline import fresh_cache
from epee_core.calibration.sweep import single_thread
from epee_core.cli import main
from epee_core.data.text import read_examples
from epee_core.engine.policies import POLICIES, make_policy
from epee_core.engine.runner import run_early_exit
from epee_core.engine.signals import SIMILARITIES, divergence, layer_probs, normalised_entropy
from epee_core.engine.spec import ConfigError
from epee_core.evaluation.evaluate import prepare_batches
from epee_core.serving.config import ServeConfig

NUM_DEV = 24


def write_dev_file(path, task: str, num_samples: int = NUM_DEV, seed: int = 0):
    """Demo sentences with random labels from the tiny model's label set."""
    rng = random.Random(seed)
    labels = LABELS[task]
    with (DEMO_DATA / "ade_demo_dev.jsonl").open() as lines, path.open("w") as out:
        for _, line in zip(range(num_samples), lines):
            record = {"text": json.loads(line)["text"]}
            if task == "multi-label":
                record["labels"] = [label for label in labels if rng.random() < 0.4]
            else:
                record["label"] = rng.choice(labels)
            out.write(json.dumps(record) + "\n")
    return path


# --- replay equals the live runner -------------------------------------------------------------------------


def between(values: torch.Tensor, quantile: float) -> float:
    """A threshold halfway between two neighbouring observed values near `quantile`, so no value sits on it."""
    ordered = values.flatten().sort().values
    index = min(int(quantile * (ordered.numel() - 1)), ordered.numel() - 2)
    return float((ordered[index] + ordered[index + 1]) / 2)


def policies_for(cache: LogitCache, multi_label: bool) -> list:
    """Every policy of the registry; the known ones with thresholds placed inside the cache's own value ranges so
    exits vary."""
    probs = layer_probs(cache.logits, multi_label)
    entropy = normalised_entropy(probs, multi_label)
    confidence = torch.maximum(probs, 1 - probs).amin(-1) if multi_label else probs.amax(-1)
    policies = [
        make_policy("full"),
        make_policy("static", {"layer": 2}),
        make_policy("max_prob", {"threshold": between(confidence, 0.5)}),
        make_policy("entropy", {"entropy_threshold": between(entropy, 0.4)}),
        make_policy("patience", {"patience": 1}),
        make_policy("patience", {"patience": 2}),
        make_policy("oracle"),
    ]
    for ensemble, fast_ratio in (("last", 0.25), ("window_mean", 0.0), ("window_mean", 0.5)):
        params = {"entropy_threshold": between(entropy, 0.6), "patience": 2}
        policies.append(make_policy("epee", {**params, "fast_ratio": fast_ratio, "ensemble": ensemble}))
    for similarity in SIMILARITIES:
        gaps = divergence(probs[:-1].flatten(0, 1), probs[1:].flatten(0, 1), similarity, multi_label)
        for patience in (1, 2):
            params = {
                "similarity": similarity,
                "similarity_threshold": between(gaps, 0.5),
                "patience": patience,
            }
            policies.append(make_policy("fpabee", params))
    # Any other registry policy runs at its defaults (gate, which needs a learned gate: tests/test_gate.py).
    placed = {policy.name for policy in policies}
    others = [name for name, rule in POLICIES.items() if name not in placed and not rule.needs_gate]
    return policies + [make_policy(name) for name in others]


@pytest.fixture(scope="module", params=["text-classification", "multi-label"])
def cached_model(request, tokenizer, tmp_path_factory):
    """A tiny model, its dev batches (batch 8) and the logit cache built from them."""
    task = request.param
    model = build_tiny_model(tokenizer, task=task)
    dev_file = write_dev_file(tmp_path_factory.mktemp("dev") / "dev.jsonl", task)
    examples = read_examples(dev_file, task)
    cache = build_cache(model, prepare_batches(model, examples, 8))
    return model, examples, cache


def test_cache_holds_every_exit_for_every_sample(cached_model):
    model, examples, cache = cached_model
    assert cache.logits.shape == (model.num_layers, len(examples), len(model.spec.labels))
    assert cache.labels.shape[0] == len(examples)


@pytest.mark.parametrize("batch_size", [1, 8])
def test_replay_gives_the_live_runners_exit_layers_and_predictions(cached_model, batch_size):
    model, examples, cache = cached_model
    policies = policies_for(cache, model.multi_label)
    batches = prepare_batches(model, examples, batch_size)
    for policy in policies:
        with single_thread():  # tiny tensors: threads only add overhead
            live = [run_early_exit(model, inputs, policy, labels) for inputs, labels in batches]
        live_exit = torch.cat([result.exit_layer for result in live])
        live_pred = torch.cat([result.predictions(model.multi_label) for result in live])
        replayed = replay_policy(policy, cache.logits, model.multi_label, cache.labels)
        assert torch.equal(replayed.exit_layer, live_exit), policy.describe()
        assert torch.equal(replayed.predictions(model.multi_label), live_pred), policy.describe()
        torch.testing.assert_close(replayed.probs, torch.cat([r.probs for r in live]), atol=1e-5, rtol=1e-4)


def test_replay_policies_exit_at_varied_layers(cached_model):
    """Guards the test above: with thresholds inside the value ranges, early-exit rules really fire."""
    model, _, cache = cached_model
    early = [
        policy.describe()
        for policy in policies_for(cache, model.multi_label)
        if policy.name not in ("full", "static")
        and 1 < len(replay_policy(policy, cache.logits, model.multi_label, cache.labels).exit_layer.unique())
    ]
    assert len(early) >= 8, early


# --- the choice on synthetic caches ------------------------------------------------------------------------

SYNTHETIC_SPEC = tiny_spec(hidden_size=8)


def synthetic_cache(groups: list[tuple[int, list[tuple[int, float]]]], gold: int = 0) -> LogitCache:
    """`groups`: (number of samples, per layer (predicted class, logit margin)); every sample's gold is `gold`."""
    rows = []
    for count, layers in groups:
        logits = torch.zeros(len(layers), 1, len(SYNTHETIC_SPEC.labels))
        for index, (predicted, margin) in enumerate(layers):
            logits[index, 0, predicted] = margin
        rows += [logits] * count
    logits = torch.cat(rows, dim=1)
    return LogitCache(logits, torch.full((logits.shape[1],), gold, dtype=torch.long))


EASY = (50, [(0, 10.0)] * 4)
HARD = (50, [(1, 2.0), (1, 2.0), (0, 10.0), (0, 10.0)])


def test_calibrate_returns_the_known_optimum():
    # Easy rows are right and sure from layer 1; hard rows (50-99) are wrong and unsure (p = 0.79) at layers 1-2,
    # then right and sure. Keeping accuracy means hard rows exit at 3, easy rows at 1 (the oracle's average).
    cache = synthetic_cache([EASY, HARD])
    result = calibrate(cache, SYNTHETIC_SPEC, CalibrationOptions(max_accuracy_drop=0.01))

    assert result.full.calibration.metric == 1.0
    assert result.chosen.policy.name != "full"
    assert result.chosen.calibration.metric == 1.0
    hard_share = float((result.split.calibration >= 50).float().mean())
    assert result.chosen.calibration.avg_exit_layer == pytest.approx(1.0 + 2.0 * hard_share, abs=1e-4)
    assert result.chosen.calibration.avg_exit_layer == result.oracle.calibration.avg_exit_layer
    exit_layer = replay_policy(result.chosen.policy, cache.logits, False).exit_layer
    assert exit_layer.tolist() == [1] * 50 + [3] * 50
    assert result.chosen.held_back.metric == 1.0
    assert result.warnings == []


def test_calibrate_finds_patience_when_early_exits_are_confidently_wrong():
    # Every exit is equally sure, so confidence rules cannot tell rows apart; hard rows change their mind at
    # layers 1-2 and settle at 3. Patience 1 exits easy rows at 2 and hard rows at 4: 0.8·2 + 0.2·4 = 2.4,
    # while a static exit would need layer 3 to stay correct.
    easy = (80, [(0, 8.0)] * 4)
    hard = (20, [(1, 8.0), (2, 8.0), (0, 8.0), (0, 8.0)])  # rows 80-99
    result = calibrate(synthetic_cache([easy, hard]), SYNTHETIC_SPEC, CalibrationOptions())

    assert result.chosen.policy == make_policy("patience", {"patience": 1})
    assert result.chosen.calibration.metric == 1.0
    hard_share = float((result.split.calibration >= 80).float().mean())
    assert result.chosen.calibration.avg_exit_layer == pytest.approx(2.0 + 2.0 * hard_share, abs=1e-4)
    assert result.chosen in result.frontier


def test_target_speedup_picks_the_most_accurate_setting_that_is_fast_enough():
    cache = synthetic_cache([EASY, HARD])
    result = calibrate(cache, SYNTHETIC_SPEC, CalibrationOptions(target_speedup=1.5))
    assert result.chosen.calibration.layer_speedup >= 1.5
    assert result.chosen.calibration.metric == 1.0
    # 4x on a 4-layer model means exiting everything at layer 1, where hard rows are wrong.
    result = calibrate(cache, SYNTHETIC_SPEC, CalibrationOptions(target_speedup=4.0))
    assert result.chosen.calibration.avg_exit_layer == 1.0
    assert result.chosen.calibration.metric == pytest.approx(
        float((result.split.calibration < 50).float().mean())
    )


def test_impossible_budget_chooses_full_and_says_why():
    # Half the rows are wrong, and sure of it, until the last layer: any early exit loses about half of them.
    late = (50, [(1, 10.0), (1, 10.0), (1, 10.0), (0, 10.0)])
    result = calibrate(
        synthetic_cache([EASY, late]), SYNTHETIC_SPEC, CalibrationOptions(max_accuracy_drop=0.01)
    )

    assert result.chosen.policy.name == "full"
    assert result.choice.feasible == 0
    assert "no early-exit setting keeps accuracy within 0.01 of full" in result.choice.reason
    assert "serving full depth" in result.choice.reason
    assert result.chosen.calibration.avg_exit_layer == 4.0


def test_unreachable_speedup_chooses_full_and_says_why():
    cache = synthetic_cache([(10, [(0, 10.0)] * 4)])
    result = calibrate(cache, SYNTHETIC_SPEC, CalibrationOptions(target_speedup=5.0))
    assert result.chosen.policy.name == "full"
    assert "no setting reaches 5.0x fewer layers" in result.choice.reason
    assert "the fastest reaches 4.00x" in result.choice.reason


def test_held_back_slice_never_influences_the_choice_but_is_checked():
    cache = synthetic_cache([EASY, HARD])
    first = calibrate(cache, SYNTHETIC_SPEC, CalibrationOptions(seed=3))
    held = first.split.held_back
    assert held is not None and len(held) == 30
    assert set(first.split.calibration.tolist()).isdisjoint(held.tolist())
    assert first.warnings == []
    # Held-back hard rows turn sure of the wrong class at layers 1-2: the chosen rule now exits them early and
    # wrong, while full stays right. The choice (made on the calibration slice) stays the same ...
    held_hard = held[held >= 50]
    changed = LogitCache(cache.logits.clone(), cache.labels)
    changed.logits[:2, held_hard, 1] = 10.0
    second = calibrate(changed, SYNTHETIC_SPEC, CalibrationOptions(seed=3))
    assert second.chosen.policy == first.chosen.policy
    assert second.chosen.calibration == first.chosen.calibration
    # ... and the held-back check reports the damage.
    assert second.full.held_back.metric == 1.0
    assert second.chosen.held_back.metric == pytest.approx(1 - len(held_hard) / len(held))
    assert any("on the held-back slice but 0.0000 on the calibration slice" in w for w in second.warnings)
    assert any("more than the budget 0.01" in w for w in second.warnings)


def test_a_slice_that_is_just_harder_raises_no_warning():
    # Held-back rows all wrong at every layer: full and the choice lose the same, so the paired check is quiet.
    cache = synthetic_cache([EASY, HARD])
    held = calibrate(cache, SYNTHETIC_SPEC, CalibrationOptions(seed=3)).split.held_back
    labels = cache.labels.clone()
    labels[held] = 2
    result = calibrate(LogitCache(cache.logits, labels), SYNTHETIC_SPEC, CalibrationOptions(seed=3))
    assert result.chosen.held_back.metric == result.full.held_back.metric == 0.0
    assert result.warnings == []


def test_unknown_metric_for_the_task_is_a_clear_error():
    cache = synthetic_cache([(10, [(0, 10.0)] * 4)])
    with pytest.raises(ValueError, match="--metric example_f1: task text-classification reports accuracy"):
        calibrate(cache, SYNTHETIC_SPEC, CalibrationOptions(metric="example_f1"))


# --- cache file: reuse and staleness -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def dev_file(tmp_path_factory):
    return write_dev_file(tmp_path_factory.mktemp("dev") / "dev.jsonl", "text-classification")


def test_cache_file_is_reused_without_running_the_model(model_dir, dev_file, tmp_path, monkeypatch):
    job = CalibrationJob(
        str(model_dir), str(dev_file), str(tmp_path / "out.yaml"), cache_path=str(tmp_path / "c")
    )
    built, timing, status = fresh_cache(job, batch_size=8)
    assert status == "built"
    assert timing.batch_size == 8 and len(timing.layer_ms) == 4

    def no_model(*args, **kwargs):
        raise AssertionError("a fresh cache must not load the model")

    monkeypatch.setattr("epee_core.calibration.pipeline.EarlyExitModel.from_pretrained", no_model)
    reused, reused_timing, status = fresh_cache(job, batch_size=8)
    assert status == "reused"
    assert torch.equal(reused.logits, built.logits) and torch.equal(reused.labels, built.labels)
    assert reused_timing == timing


def test_stale_cache_is_detected_when_the_model_changes(model_dir, dev_file, tmp_path, tokenizer):
    changed_dir = tmp_path / "model"
    shutil.copytree(model_dir, changed_dir)
    cache_path = tmp_path / "cache.safetensors"
    job = CalibrationJob(
        str(changed_dir), str(dev_file), str(tmp_path / "out.yaml"), cache_path=str(cache_path)
    )
    old, _, _ = fresh_cache(job, batch_size=8)

    build_tiny_model(tokenizer, seed=1).save_pretrained(changed_dir)  # retrained: new weights, same shape
    with pytest.raises(StaleCacheError, match="model directory changed"):
        load_fresh(cache_path, fingerprint(changed_dir, dev_file, None))
    messages = []
    rebuilt, _, status = fresh_cache(job, batch_size=8, notify=messages.append)
    assert status.startswith("rebuilt (stale: the model directory changed")
    assert "stale calibration cache" in messages[0]
    assert not torch.equal(rebuilt.logits, old.logits)
    assert load_fresh(cache_path, fingerprint(changed_dir, dev_file, None)).fingerprint == rebuilt.fingerprint


def test_stale_cache_is_detected_when_the_data_or_sample_count_changes(model_dir, dev_file, tmp_path):
    cache_path = tmp_path / "cache.safetensors"
    job = CalibrationJob(
        str(model_dir), str(dev_file), str(tmp_path / "out.yaml"), cache_path=str(cache_path)
    )
    fresh_cache(job, batch_size=8)
    with pytest.raises(StaleCacheError, match="--max-samples was None, now 10"):
        load_fresh(cache_path, fingerprint(model_dir, dev_file, 10))
    other_data = write_dev_file(tmp_path / "other.jsonl", "text-classification", seed=1)
    with pytest.raises(StaleCacheError, match="the data file changed"):
        load_fresh(cache_path, fingerprint(model_dir, other_data, None))


def test_cache_file_holds_tensors_only(model_dir, dev_file, tmp_path):
    from safetensors import safe_open

    cache_path = tmp_path / "cache.safetensors"
    fresh_cache(CalibrationJob(str(model_dir), str(dev_file), "x.yaml", cache_path=str(cache_path)), 8)
    with safe_open(str(cache_path), framework="pt") as handle:
        assert set(handle.keys()) == {"logits", "labels", "lengths"}
        assert json.loads(handle.metadata()["fingerprint"])["model_sha256"]


# --- output: model YAML, report, plot, CLI -----------------------------------------------------------------


def test_model_yaml_of_every_policy_is_accepted_by_serve_config():
    for policy in [make_policy("full"), make_policy("epee", {"ensemble": "window_mean", "patience": 3})]:
        config = model_yaml(SYNTHETIC_SPEC, policy, ServingOptions(batch_size=4, scheduler="batch"))
        serve = ServeConfig.from_section(config["epee"])
        assert serve.policy == policy
        assert {"minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout"} <= set(config)
        assert config["batchSize"] == 4 and "continuousBatching" not in config


def test_model_yaml_for_the_continuous_scheduler_turns_on_torchserves_continuous_batching():
    config = model_yaml(
        SYNTHETIC_SPEC, make_policy("entropy"), ServingOptions(batch_size=4, scheduler="continuous")
    )
    assert config["continuousBatching"] is True
    assert config["batchSize"] == ServeConfig().max_rows_in_flight and config["maxBatchDelay"] == 1


def test_calibrated_yaml_defaults_to_the_benchmarks_choice():
    from epee_core.calibration.model_yaml import DEFAULT_MAX_BATCH_DELAY, DEFAULT_SCHEDULER

    config = model_yaml(SYNTHETIC_SPEC, make_policy("entropy"), ServingOptions())
    assert bool(config.get("continuousBatching")) == (DEFAULT_SCHEDULER == "continuous")
    batch = model_yaml(SYNTHETIC_SPEC, make_policy("entropy"), ServingOptions(scheduler="batch"))
    assert batch["maxBatchDelay"] == DEFAULT_MAX_BATCH_DELAY


def test_run_calibration_writes_yaml_report_and_plot(model_dir, dev_file, tmp_path):
    output = tmp_path / "serve.yaml"
    job = CalibrationJob(
        str(model_dir),
        str(dev_file),
        str(output),
        plot=str(tmp_path / "pareto.png"),
        serving=ServingOptions(batch_size=4, scheduler="batch"),
    )
    summary = run_calibration(job, notify=lambda message: None)

    serve = ServeConfig.load(output)
    assert serve.policy.name == summary["chosen"]["policy"]
    assert serve.policy.params == summary["chosen"]["params"]
    written = yaml.safe_load(output.read_text())
    assert written["batchSize"] == 4 and written["epee"]["task"] == "text-classification"
    report = json.loads((tmp_path / "serve.report.json").read_text())
    assert len(report["settings"]) == report["num_settings"] > 200
    assert report["frontier"] and report["timing"]["batch_size"] == 4
    assert "settings" not in summary
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_calibrate_prints_one_json_object(model_dir, dev_file, tmp_path, capsys):
    output = tmp_path / "serve.yaml"
    args = ["calibrate", "--model", str(model_dir), "--data", str(dev_file), "--output", str(output)]
    flags = [
        "--cache",
        str(tmp_path / "cache.st"),
        "--target-speedup",
        "1.5",
        "--guarantee",
        "none",
        "--json",
    ]
    assert main([*args, *flags]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["constraint"] == {"target_speedup": 1.5}
    assert report["cache"]["status"] == "built"
    ServeConfig.load(output)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--metric", "example_f1", "--guarantee", "none"], "--metric example_f1: task text-classification"),
        (["--target-speedup", "0.5"], "--target-speedup must be greater than 1"),
        (["--max-accuracy-drop", "-0.1"], "--max-accuracy-drop must be in [0, 1)"),
        (["--target-speedup", "2"], "cannot be combined with --target-speedup: use --guarantee none"),
        (["--metric", "macro_f1"], "--guarantee accuracy bounds the drop of accuracy"),
        (["--guarantee", "sure"], "--guarantee must be one of accuracy, consistency, none"),
        (["--held-back-fraction", "0"], "--held-back-fraction must be above 0"),
        (["--risk", "0"], "--risk must be in (0, 1)"),
    ],
)
def test_cli_calibrate_user_errors_are_one_line(model_dir, dev_file, tmp_path, capsys, extra, message):
    args = [
        "calibrate",
        "--model",
        str(model_dir),
        "--data",
        str(dev_file),
        "--output",
        str(tmp_path / "o.yaml"),
    ]
    assert main(args + extra) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("epee: error: ") and message in error


# --- images plug in through the same path ------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_model_and_data(tmp_path_factory):
    """A tiny ViT model directory (labels "0", "1", "2" as MedMNIST class ids) and a `.npz` with a `val` split."""
    import numpy as np
    from helpers import build_tiny_model

    directory = tmp_path_factory.mktemp("vit")
    model = build_tiny_model(kind="vit")
    model.spec.labels = ["0", "1", "2"]
    model.save_pretrained(directory / "model")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (NUM_DEV, 16, 16), dtype=np.uint8)
    images = (images * rng.uniform(0.1, 1.0, (NUM_DEV, 1, 1))).astype(np.uint8)  # rows differ in contrast
    labels = rng.integers(0, 3, (NUM_DEV, 1), dtype=np.uint8)
    np.savez(directory / "data.npz", val_images=images, val_labels=labels)
    return directory / "model", directory / "data.npz"


def test_image_model_replay_equals_live_and_calibrates(image_model_and_data, tmp_path):
    from epee_core.calibration.pipeline import labelled_batches
    from epee_core.engine.model import EarlyExitModel

    model_dir, data = image_model_and_data
    model = EarlyExitModel.from_pretrained(model_dir)
    batches = labelled_batches(model, str(data), None, 8)
    cache = build_cache(model, batches)
    for policy in policies_for(cache, multi_label=False):
        live = [run_early_exit(model, inputs, policy, labels) for inputs, labels in batches]
        replayed = replay_policy(policy, cache.logits, False, cache.labels)
        assert torch.equal(replayed.exit_layer, torch.cat([r.exit_layer for r in live])), policy.describe()
        assert torch.equal(replayed.predictions(False), torch.cat([r.predictions(False) for r in live]))

    output = tmp_path / "vit.yaml"
    summary = run_calibration(CalibrationJob(str(model_dir), str(data), str(output)), notify=lambda m: None)
    assert summary["num_samples"] == NUM_DEV
    serve = ServeConfig.load(output)
    assert serve.task == "image-classification" and serve.max_length is None
    assert serve.policy.name == summary["chosen"]["policy"]


def test_cost_model_is_not_skewed_by_one_slow_layer_timing():
    """Identical layers timed 1.5, 1.5, 1.5 and 150 ms (a busy machine): the estimate uses the median layer."""
    timing = LayerTimes(
        batch_size=8, seq_len=16, embed_ms=1.0, layer_ms=[1.5, 1.5, 1.5, 150.0], head_ms=[0.5] * 4
    )
    assert timing.full_ms == pytest.approx(1.0 + 4 * 2.0)
    # half the rows leave after layer 1, half after layer 3: average exit layer 2
    assert timing.batch_ms(torch.tensor([1, 1, 3, 3])) == pytest.approx(1.0 + 2 * 2.0)


# --- certified calibration ---------------------------------------------------------------------------------

GUARANTEE_KEYS = {"kind", "epsilon", "delta", "bound", "n", "method"}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"guarantee": "coverage"}, "--guarantee must be one of accuracy, consistency, none"),
        ({"guarantee": "accuracy", "risk": 1.0}, "--risk must be in (0, 1)"),
        ({"guarantee": "accuracy", "risk": 0.001}, "--risk must exceed 0.001 with --guarantee accuracy"),
        ({"guarantee": "accuracy", "target_speedup": 2.0}, "use --guarantee none with --target-speedup"),
        ({"guarantee": "consistency", "held_back_fraction": 0.0}, "--held-back-fraction must be above 0"),
        ({"guarantee": "accuracy", "metric": "macro_f1"}, "use --guarantee consistency"),
    ],
)
def test_options_refuse_a_guarantee_they_cannot_keep(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        CalibrationOptions(**options).check()
    CalibrationOptions(**{**options, "guarantee": "none", "risk": 0.1}).check()  # fine without a guarantee


def certifying(guarantee: str = "accuracy", **extra) -> CalibrationOptions:
    return CalibrationOptions(guarantee=guarantee, held_back_fraction=0.6, **extra)


def test_certified_choice_on_a_cache_large_enough():
    # EASY / HARD as above, 1000 rows each: the optimum (easy rows leave at 1, hard at 3) loses no row, so on
    # 1200 test rows its accuracy drop is certified below 0.01 (a drop of 0.01 would show ~12 rows lost).
    cache = synthetic_cache([(1000, EASY[1]), (1000, HARD[1])])
    result = calibrate(cache, SYNTHETIC_SPEC, certifying())

    assert result.certificate["certified"] and result.choice.feasible >= 1
    exit_layer = replay_policy(result.chosen.policy, cache.logits, False).exit_layer
    assert exit_layer.tolist() == [1] * 1000 + [3] * 1000
    guarantee = result.guarantee
    assert set(guarantee) == GUARANTEE_KEYS | {"consistency_bound", "exit_counts"}
    assert guarantee["kind"] == "accuracy"
    # the drift detector's reference: how every dev row exited under the chosen setting
    assert guarantee["exit_counts"] == [1000, 0, 1000] + [0] * (cache.num_layers - 3)
    assert (guarantee["epsilon"], guarantee["delta"], guarantee["n"]) == (0.01, 0.1, 1200)
    # the chosen setting agrees with full depth on every test row: Clopper-Pearson gives 1 - 0.1^(1/1200)
    assert guarantee["consistency_bound"] == pytest.approx(1 - 0.1 ** (1 / 1200), abs=2e-6)
    assert guarantee["bound"] <= 0.01 and "learn-then-test" in guarantee["method"]
    assert result.choice.reason.startswith("accuracy risk ≤ 0.01 certified with probability ≥ 0.9")
    report = result.report(include_settings=False)
    assert report["guarantee"] == guarantee and report["certificate"]["test_rows"] == 1200
    tested = [step for step in report["certificate"]["path"] if step["pvalue"] is not None]
    assert (
        tested[0]["pvalue"] <= 0.1
    )  # the sequence starts at its safest setting and goes on while tests pass
    chosen = next(step for step in tested if step["setting"] == result.chosen.policy.describe())
    assert chosen["pvalue"] <= 0.1
    ServeConfig.from_section(
        model_yaml(SYNTHETIC_SPEC, result.chosen.policy, ServingOptions(), guarantee)["epee"]
    )


def test_certification_on_too_few_rows_serves_full_and_says_why():
    # The same rows, 100 of them: with 60 test rows even no row lost cannot rule out a drop of 0.01.
    result = calibrate(synthetic_cache([EASY, HARD]), SYNTHETIC_SPEC, certifying())
    assert result.chosen.policy.name == "full"
    assert not result.certificate["certified"] and result.choice.feasible == 0
    assert "no setting certified" in result.choice.reason and "serving full depth" in result.choice.reason
    assert result.guarantee["bound"] == 0.0 and result.guarantee["n"] == 60  # full's drop against itself
    # without a guarantee the same cache gives the old, uncertified choice
    assert (
        calibrate(synthetic_cache([EASY, HARD]), SYNTHETIC_SPEC, CalibrationOptions()).chosen.policy.name
        != "full"
    )


def test_consistency_certifies_on_data_without_labels():
    cache = synthetic_cache([(1000, EASY[1]), (1000, HARD[1])], gold=2)  # full depth always wrong
    unlabelled = cache.labelled_by_full_depth(multi_label=False)
    assert not unlabelled.labelled and unlabelled.labels.tolist() == [0] * 2000
    result = calibrate(unlabelled, SYNTHETIC_SPEC, certifying("consistency"))
    assert result.certificate["certified"] and result.guarantee["kind"] == "consistency"
    assert result.chosen.calibration.metric == 1.0  # agreement with full depth
    assert result.report(include_settings=False)["labels"].startswith("none")
    with pytest.raises(ValueError, match="only --guarantee consistency"):
        calibrate(unlabelled, SYNTHETIC_SPEC, certifying("accuracy"))
    # with labels, consistency ignores them: full is always wrong, early exits agree with it
    assert calibrate(cache, SYNTHETIC_SPEC, certifying("consistency")).certificate["certified"]


def test_an_unlabelled_cache_file_stays_unlabelled(tmp_path):
    unlabelled = synthetic_cache([EASY]).labelled_by_full_depth(multi_label=False)
    unlabelled.save(tmp_path / "cache.safetensors")
    assert not LogitCache.load(tmp_path / "cache.safetensors").labelled


def calibrate_cli(capsys, model_dir, data, output, *extra) -> dict:
    capsys.readouterr()
    args = ["calibrate", "--model", str(model_dir), "--data", str(data), "--output", str(output), *extra]
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_calibrate_certifies_by_default_and_the_yaml_carries_the_guarantee(
    model_dir, dev_file, tmp_path, capsys
):
    output = tmp_path / "serve.yaml"
    report = calibrate_cli(capsys, model_dir, dev_file, output, "--cache", str(tmp_path / "c.st"))
    assert set(report["guarantee"]) == GUARANTEE_KEYS | {"exit_counts"}
    assert report["guarantee"]["kind"] == "accuracy" and report["guarantee"]["delta"] == 0.1
    assert report["guarantee"]["exit_counts"] == [0] * (NUM_LAYERS - 1) + [
        NUM_DEV
    ]  # full depth served: every row at the last
    assert report["split"]["held_back_fraction"] == 0.6 and report["guarantee"]["n"] == round(0.6 * NUM_DEV)
    # 14 test rows cannot certify a drop of 0.01: full depth, and why
    assert report["chosen"]["policy"] == "full" and not report["certificate"]["certified"]
    assert "no setting certified" in report["reason"] or "no candidate" in report["reason"]
    text = output.read_text()
    guarantee_lines = [line for line in text.splitlines() if line.startswith("# guarantee: ")]
    assert len(guarantee_lines) == 1 and "serving full depth" in guarantee_lines[0]
    assert yaml.safe_load(text)["epee"]["guarantee"] == report["guarantee"]
    assert ServeConfig.load(output).guarantee_header.startswith(
        "accuracy-drop<=0.01; risk=0.1; bound=0; n=14;"
    )

    # the human output says it too, and --guarantee none keeps the uncertified choice of before
    assert main(["calibrate", "--model", str(model_dir), "--data", str(dev_file), "--output", str(output),
                 "--cache", str(tmp_path / "c.st")]) == 0  # fmt: skip
    assert "guarantee: serving full depth" in capsys.readouterr().out
    old = calibrate_cli(
        capsys, model_dir, dev_file, output, "--cache", str(tmp_path / "c.st"), "--guarantee", "none"
    )
    options = CalibrationOptions()  # the library default is the old behaviour
    expected = run_calibration(
        CalibrationJob(str(model_dir), str(dev_file), str(tmp_path / "lib.yaml"), options=options),
        notify=lambda message: None,
    )
    assert old["guarantee"] is None and "certificate" not in old and old["split"]["held_back_fraction"] == 0.3
    assert old["chosen"]["setting"] == expected["chosen"]["setting"]
    assert "guarantee" not in yaml.safe_load(output.read_text())["epee"]
    assert "# guarantee" not in output.read_text()


def test_cli_consistency_certifies_on_a_jsonl_without_labels(model_dir, dev_file, tmp_path, capsys):
    data = tmp_path / "texts.jsonl"
    data.write_text(
        "".join(json.dumps({"text": json.loads(line)["text"]}) + "\n" for line in dev_file.open())
    )
    output = tmp_path / "serve.yaml"
    # a generous budget, so that 14 test rows can certify it
    report = calibrate_cli(
        capsys, model_dir, data, output, "--guarantee", "consistency", "--max-accuracy-drop", "0.5"
    )
    assert report["labels"].startswith("none") and report["full"]["dev"]["metric"] == 1.0
    assert report["certificate"]["certified"] and report["chosen"]["policy"] != "full"
    assert report["guarantee"]["kind"] == "consistency" and report["guarantee"]["bound"] <= 0.5
    header = [line for line in output.read_text().splitlines() if line.startswith("# guarantee: ")]
    assert header == [f"# guarantee: disagreement with full depth <= 0.5 with probability >= 0.9 over the "
                      f"calibration sample (n=14 test rows, {report['guarantee']['method']}); upper bound "
                      f"{report['guarantee']['bound']:.4g}"]  # fmt: skip
    assert ServeConfig.load(output).guarantee_header.startswith("disagreement<=0.5; risk=0.1; bound=")

    capsys.readouterr()
    args = ["calibrate", "--model", str(model_dir), "--data", str(data), "--output", str(output)]
    assert main(args) == 2  # accuracy needs labels: one line that says what to do
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "no row has a 'label' field" in error and "--guarantee consistency" in error


# --- serving the guarantee ----------------------------------------------------------------------------------

GUARANTEE = {
    "kind": "accuracy",
    "epsilon": 0.01,
    "delta": 0.1,
    "bound": 0.0082,
    "n": 1200,
    "method": "learn-then-test, fixed-sequence; exact test",
}


def test_serve_config_accepts_a_guarantee_and_makes_its_header():
    serve = ServeConfig.from_section({"policy": "full", "guarantee": GUARANTEE})
    assert serve.guarantee == GUARANTEE
    assert serve.guarantee_header == (
        "accuracy-drop<=0.01; risk=0.1; bound=0.0082; n=1200; method=learn-then-test, fixed-sequence; exact test"
    )
    assert ServeConfig.from_section({"policy": "full"}).guarantee_header is None
    odd = ServeConfig.from_section({"guarantee": {**GUARANTEE, "method": "Berger–Boos\ntest"}})
    assert odd.guarantee_header.endswith("method=Berger\\u2013Boos test")  # one line of ASCII


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"delta": 1.5}, "'guarantee.delta' must be in [0.0, 1.0]"),
        ({"bound": 0.02}, "exceeds 'guarantee.epsilon' 0.01: not a certified guarantee"),
        ({"n": 0}, "'guarantee.n' must be a positive integer"),
        ({"n": True}, "'guarantee.n' must be int"),
        ({"epsilon": "0.01"}, "'guarantee.epsilon' must be int or float"),
        ({"kind": "coverage"}, "'guarantee.kind' must be one of accuracy, consistency"),
        ({"alpha": 0.1}, "unknown key 'alpha'"),
        ({"method": " "}, "'guarantee.method' must not be empty"),
    ],
)
def test_serve_config_refuses_a_bad_guarantee(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ServeConfig.from_section({"guarantee": {**GUARANTEE, **change}}, source="m.yaml 'epee:'")
    missing = {key: value for key, value in GUARANTEE.items() if key != "bound"}
    with pytest.raises(ValueError, match="missing key 'bound'"):
        ServeConfig.from_section({"guarantee": missing})
    with pytest.raises(ValueError, match="'guarantee' must be dict"):
        ServeConfig.from_section({"guarantee": "accuracy"})


def test_handler_sends_the_guarantee_on_every_answer():
    from types import SimpleNamespace

    from epee_core import Answer
    from handlers.base import GUARANTEE_HEADER, EarlyExitHandler

    class Context:
        def __init__(self):
            self.headers = {}

        def set_response_content_type(self, index, value):
            pass

        def set_response_header(self, index, name, value):
            self.headers.setdefault(index, {})[name] = value

        def set_response_status(self, *args, **kwargs):
            pass

        def get_request_id(self, index):
            return f"r{index}"

    handler = EarlyExitHandler()
    answers = [Answer(200, {"label": "a"}), Answer(400, {"error": "bad"})]
    for section, expected in (({"guarantee": GUARANTEE}, True), ({}, False)):
        handler.context = Context()
        config = ServeConfig.from_section(section)  # the service's header: the config's until an alarm
        handler.service = SimpleNamespace(config=config, guarantee_header=config.guarantee_header)
        handler.respond(answers, "batch")
        sent = [handler.context.headers[index].get(GUARANTEE_HEADER) for index in range(2)]
        assert sent == [ServeConfig.from_section(section).guarantee_header] * 2
        assert (sent[0] is not None) == expected and (not expected or sent[0].isascii())


def test_policies_option_restricts_the_families_searched():
    cache = synthetic_cache([(1000, EASY[1]), (1000, HARD[1])])
    result = calibrate(cache, SYNTHETIC_SPEC, certifying(policies=("entropy",)))
    assert {entry["policy"] for entry in result.report(include_settings=True)["settings"]} == {"entropy"}
    with pytest.raises(ConfigError, match="--policies must name one or more of"):
        certifying(policies=("warp",)).check()


def test_an_accuracy_budget_that_leaves_the_task_f1_behind_is_flagged():
    # 995 rows of class a, right and sure at every layer; 5 rows of class b, surely called a until the last layer.
    # Exiting everything at layer 1 costs 0.5 % accuracy (within the 1-point budget) but all of class b's F1.
    logits = torch.zeros(4, 1000, len(SYNTHETIC_SPEC.labels))
    logits[:, :, 0] = 10.0
    logits[3, 995:, 0], logits[3, 995:, 1] = 0.0, 10.0
    labels = torch.zeros(1000, dtype=torch.long)
    labels[995:] = 1
    result = calibrate(LogitCache(logits, labels), SYNTHETIC_SPEC, CalibrationOptions(max_accuracy_drop=0.01))
    assert result.chosen.calibration.avg_exit_layer < 4.0
    assert result.dev["full"].metric - result.dev["chosen"].metric <= 0.01
    (warning,) = [w for w in result.warnings if w.startswith("macro_f1 of the chosen setting")]
    assert "more than the budget 0.01 set on accuracy" in warning
    # Budgeting the F1 itself raises no such warning.
    assert not any(
        w.startswith("macro_f1 of")
        for w in calibrate(
            LogitCache(logits, labels), SYNTHETIC_SPEC, CalibrationOptions(metric="macro_f1")
        ).warnings
    )
