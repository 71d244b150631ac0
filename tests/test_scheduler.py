"""The layer-level scheduler keeps the runner's invariant under continuous batching: every row gets the prediction
and exit layer it gets alone, whatever it ran beside and whenever it arrived (hypothesis over arrival schedules,
for every backbone, BERT also with its layers in ONNX Runtime, and every servable policy), within its limits and with failures kept to their own request."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import build_tiny_model, random_batch, random_pixels, single_row
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epee_core.engine.gate import GATE_FEATURES, ExitGate
from epee_core.engine.onnx_layers import use_runtime
from epee_core.engine.policies import SERVABLE_POLICIES, make_policy
from epee_core.engine.runner import run_early_exit
from epee_core.serving.config import ServeConfig
from epee_core.serving.scheduler import LayerScheduler, SchedulerLimits, pad_inputs

KINDS = ["bert", "albert", "gpt2", "vit"]
# settings under which the tiny models' exits fire at mixed layers; a servable policy missing here runs with its
# registry defaults
PARAMS = {
    "static": {"layer": 2},
    "max_prob": {"threshold": 0.9},
    "entropy": {"entropy_threshold": 0.3},
    "patience": {"patience": 1},
    "epee": {"entropy_threshold": 0.4, "patience": 1, "ensemble": "window_mean"},
    "fpabee": {"similarity": "kl", "similarity_threshold": 0.5, "patience": 1},
    "gate": {"gate_threshold": 0.7},
}
POLICIES = [make_policy(name, PARAMS.get(name, {})) for name in SERVABLE_POLICIES]
NUM_ROWS = 16


def confidence_gate() -> ExitGate:
    """A gate that trusts the exit's confidence (feature 0) only."""
    num_features = len(GATE_FEATURES)
    weights = torch.zeros(num_features)
    weights[0] = 8.0
    return ExitGate.from_params(torch.zeros(num_features), torch.ones(num_features), weights, -6.0)


class Setup:
    """A tiny model, its single-row inputs and a cache of their results alone (short repr for hypothesis)."""

    def __init__(self, model, rows):
        self.model, self.rows, self.cache = model, rows, {}

    def __iter__(self):
        return iter((self.model, self.rows, self.cache))

    def __repr__(self) -> str:
        return f"Setup({self.model.spec.backbone})"


@pytest.fixture(scope="module")
def setups(tokenizer):
    """Per backbone: the tiny model and NUM_ROWS single-row inputs of mixed lengths."""
    built = {}
    for kind in KINDS:
        model = build_tiny_model(tokenizer, kind=kind)
        model.exit_gate = confidence_gate()
        if model.backbone.modality == "image":
            pixels = random_pixels(NUM_ROWS, seed=5)["pixel_values"]
            rows = [{"pixel_values": pixels[row : row + 1]} for row in range(NUM_ROWS)]
        else:
            batch = random_batch(NUM_ROWS, len(tokenizer), max_len=24, seed=5)
            rows = [single_row(batch, row) for row in range(NUM_ROWS)]
        built[kind] = Setup(model, rows)
    onnx_model = use_runtime(build_tiny_model(tokenizer, kind="bert"), "onnxruntime")
    onnx_model.exit_gate = confidence_gate()
    built["bert-onnxruntime"] = Setup(onnx_model, built["bert"].rows)  # layers in ONNX Runtime
    return built


def alone(setup, row: int, policy_index: int):
    """The exit layer and probabilities of one row run alone through `run_early_exit` (cached)."""
    model, rows, cache = setup
    key = (row, policy_index)
    if key not in cache:
        result = run_early_exit(model, rows[row], POLICIES[policy_index])
        cache[key] = (int(result.exit_layer[0]), result.probs[0])
    return cache[key]


request = st.tuples(
    st.integers(0, 2),  # steps to wait before it arrives (after the previous request)
    st.lists(st.integers(0, NUM_ROWS - 1), min_size=1, max_size=3),  # its rows
    st.integers(0, len(POLICIES) - 1),  # its policy
)
limits = st.builds(
    SchedulerLimits,
    max_rows_in_flight=st.integers(1, 12),
    max_admit_rows=st.integers(1, 6),
    max_step_tokens=st.integers(1, 400),
    max_cohorts=st.integers(1, 4),
    cohort_threads=st.integers(1, 2),
)


def drive(scheduler: LayerScheduler, schedule, rows) -> dict:
    """Submit each request at its arrival step and step until everything finished; returns key → Finished."""
    arrivals, step = [], 0
    for number, (gap, request_rows, policy_index) in enumerate(schedule):
        step += gap
        arrivals.append((step, number, request_rows, policy_index))
    finished, step = {}, 0
    while arrivals or not scheduler.idle:
        while arrivals and arrivals[0][0] <= step:
            _, number, request_rows, policy_index = arrivals.pop(0)
            inputs = pad_inputs([rows[row] for row in request_rows])
            scheduler.submit(number, inputs, POLICIES[policy_index])
        for done in scheduler.step():
            assert done.key not in finished, "a request finished twice"
            finished[done.key] = done
        step += 1
        assert step < 1000, "the scheduler stopped making progress"
    return finished


@pytest.mark.parametrize("kind", [*KINDS, "bert-onnxruntime"])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schedule=st.lists(request, min_size=1, max_size=8), step_limits=limits)
def test_every_row_gets_what_it_gets_alone_whatever_the_arrival_schedule(setups, kind, schedule, step_limits):
    setup = setups[kind]
    model, rows, _ = setup
    finished = drive(LayerScheduler(model, step_limits), schedule, rows)
    assert sorted(finished) == list(range(len(schedule)))
    for number, (_, request_rows, policy_index) in enumerate(schedule):
        done = finished[number]
        assert done.error is None
        assert len(done.rows) == len(request_rows)
        for result, row in zip(done.rows, request_rows):
            exit_layer, probs = alone(setup, row, policy_index)
            assert result.exit_layer == exit_layer, f"request {number} row {row} {POLICIES[policy_index]}"
            torch.testing.assert_close(torch.tensor(result.probs), probs, atol=1e-5, rtol=1e-4)


def test_a_request_leaves_at_its_exit_step_not_with_its_slowest_batch_mate(setups):
    """Requests admitted together answer at different steps: each at the step of its own exit layer."""
    model, rows, _ = setups["bert"]
    policy = make_policy("entropy", PARAMS["entropy"])
    layers = {row: alone(setups["bert"], row, POLICIES.index(policy))[0] for row in range(NUM_ROWS)}
    early, late = min(layers, key=layers.get), max(layers, key=layers.get)
    assert layers[early] < layers[late], "the tiny model needs rows with different exit layers"
    scheduler = LayerScheduler(model)
    scheduler.submit("early", rows[early], policy)
    scheduler.submit("late", rows[late], policy)
    answered_at = {}
    while not scheduler.idle:
        for done in scheduler.step():
            answered_at[done.key] = scheduler.steps
    assert answered_at == {"early": layers[early], "late": layers[late]}


def test_a_request_that_arrives_mid_flight_starts_at_the_next_step(setups):
    model, rows, _ = setups["bert"]
    full = make_policy("full")
    scheduler = LayerScheduler(model)
    scheduler.submit("first", rows[0], full)
    scheduler.step()
    scheduler.submit("second", rows[1], full)
    scheduler.step()
    assert sorted(cohort.depth for cohort in scheduler.cohorts) == [1, 2]


def test_admission_keeps_rows_in_flight_within_the_limit(setups):
    model, rows, _ = setups["bert"]
    full = make_policy("full")
    scheduler = LayerScheduler(model, SchedulerLimits(max_rows_in_flight=3, max_admit_rows=2))
    for row in range(6):
        scheduler.submit(row, rows[row], full)
    seen = []
    while not scheduler.idle:
        scheduler.step()
        seen.append(scheduler.rows_in_flight)
    assert max(seen) == 3
    assert seen[0] == 2


def test_new_requests_wait_and_gather_while_max_cohorts_run(setups):
    model, rows, _ = setups["bert"]
    full = make_policy("full")
    scheduler = LayerScheduler(model, SchedulerLimits(max_cohorts=1))
    scheduler.submit("first", rows[0], full)
    scheduler.step()
    scheduler.submit("second", rows[1], full)
    scheduler.submit("third", rows[2], full)
    scheduler.step()
    assert [cohort.depth for cohort in scheduler.cohorts] == [2] and len(scheduler.waiting) == 2
    while scheduler.cohorts[0].depth < model.num_layers - 1:
        scheduler.step()
    scheduler.step()  # the first request leaves, and the two waiting ones start together in the same step
    assert [cohort.depth for cohort in scheduler.cohorts] in ([1], [1, 1])
    assert sum(len(cohort.group.rows) for cohort in scheduler.cohorts) == 2
    assert not scheduler.waiting


@pytest.fixture
def caller_threads():
    """The calling thread's torch threads, restored after the test."""
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def test_cohort_threads_run_a_steps_cohorts_side_by_side(setups, monkeypatch, caller_threads):
    """With two cohort threads, a lone cohort's layer runs on the calling thread with that thread's torch threads;
    two cohorts in flight run their layers in the same step side by side, one torch thread each, and leave the
    caller's setting alone; and a newcomer is admitted from the cohorts in flight before the step (it waits while
    two run)."""
    model, rows, _ = setups["bert"]
    full = make_policy("full")
    calls: list[tuple[str, int]] = []  # (thread, torch threads) per layer call
    layer = model.backbone.layer
    both_running = threading.Barrier(2, timeout=10)  # broken (an error) unless two layer calls overlap
    checking = [True]

    def recording_layer(*args):
        name = threading.current_thread().name
        calls.append((name.rsplit("_", 1)[0], torch.get_num_threads()))
        if name.startswith("epee-cohort") and checking[0]:
            both_running.wait()
        return layer(*args)

    monkeypatch.setattr(model.backbone, "layer", recording_layer)
    torch.set_num_threads(2)  # the caller's (a worker's) setting
    scheduler = LayerScheduler(model, SchedulerLimits(max_cohorts=2, cohort_threads=2))
    scheduler.submit("first", rows[0], full)
    scheduler.step()
    assert calls == [("MainThread", 2)]  # alone: on the caller's thread, with its threads
    scheduler.submit("second", rows[1], full)
    scheduler.step()
    assert sorted(cohort.depth for cohort in scheduler.cohorts) == [1, 2]
    assert calls[1:] == [("epee-cohort", 1)] * 2  # side by side: one core each
    assert torch.get_num_threads() == 2  # the pool's threads set only their own
    checking[0] = False
    scheduler.submit("third", rows[2], full)
    scheduler.step()
    assert sorted(cohort.depth for cohort in scheduler.cohorts) == [2, 3] and len(scheduler.waiting) == 1


def test_an_oversized_request_runs_alone_when_nothing_else_is_in_flight(setups):
    model, rows, _ = setups["bert"]
    scheduler = LayerScheduler(
        model, SchedulerLimits(max_rows_in_flight=1, max_admit_rows=1, max_step_tokens=1)
    )
    scheduler.submit("big", pad_inputs(rows[:3]), make_policy("full"))
    finished = []
    while not scheduler.idle:
        finished += scheduler.step()
    assert [done.key for done in finished] == ["big"] and finished[0].error is None


class _Poisoned(Exception):
    pass


def test_a_request_that_breaks_a_layer_fails_alone(setups, monkeypatch):
    """A layer call that raises on one request's rows fails that request only; its cohort-mates finish with what
    they get alone."""
    model, rows, _ = setups["bert"]
    policy = make_policy("full")
    poison_length = int(rows[3]["attention_mask"].sum())
    assert all(int(rows[r]["attention_mask"].sum()) != poison_length for r in (0, 1))
    layer = model.backbone.layer

    def fragile_layer(index, hidden, bias):
        if index == 1 and hidden.shape[1] == poison_length and hidden.shape[0] == 1:
            raise _Poisoned("this row breaks layer 2")
        if index == 1 and hidden.shape[0] > 1:
            raise _Poisoned("a batch holding the bad row breaks layer 2")
        return layer(index, hidden, bias)

    monkeypatch.setattr(model.backbone, "layer", fragile_layer)
    scheduler = LayerScheduler(model)
    for key, row in (("a", 0), ("bad", 3), ("b", 1)):
        scheduler.submit(key, rows[row], policy)
    finished = {}
    while not scheduler.idle:
        finished.update({done.key: done for done in scheduler.step()})
    monkeypatch.undo()
    assert isinstance(finished["bad"].error, _Poisoned)
    for key, row in (("a", 0), ("b", 1)):
        assert finished[key].error is None
        assert finished[key].rows[0].exit_layer == alone(setups["bert"], row, POLICIES.index(policy))[0]


def test_cohort_threads_default_to_the_workers_threads(caller_threads):
    """A model YAML without `cohort_threads` gives the scheduler as many cohort threads as the worker has torch
    threads (`num_threads`, else torch's setting when the limits are read); an explicit value wins."""
    torch.set_num_threads(2)
    assert ServeConfig.from_section({}).scheduler_limits.cohort_threads == 2
    assert ServeConfig.from_section({"num_threads": 1}).scheduler_limits.cohort_threads == 1
    assert (
        ServeConfig.from_section({"num_threads": 2, "cohort_threads": 1}).scheduler_limits.cohort_threads == 1
    )
    torch.set_num_threads(1)
    assert ServeConfig.from_section({}).scheduler_limits.cohort_threads == 1
