"""Load-test tools without a server: Locust CSV parsing and the SLO check, the clinical-day shape, payloads drawn
from data files, and the refusals (non-local host, unbounded run)."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from epee_core.cli import main
from epee_core.engine.spec import ConfigError
from epee_core.measure.loadtest import (
    LOCUSTFILE,
    LoadRun,
    LoadTestError,
    require_local,
    run_locust,
    stop_on_signals,
)
from epee_core.measure.locust_stats import check_slo, load_slo, read_history, read_stats

LOAD_TESTS = LOCUSTFILE.parent


def load_module(name: str):
    """A module of load_tests/ (they import each other by plain name, as Locust puts that folder on sys.path)."""
    spec = importlib.util.spec_from_file_location(name, LOAD_TESTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shape = load_module("shape")
payloads = load_module("payloads")

STATS_HEADER = (
    "Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,"
    "Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%"
)


def write_stats(prefix: Path, requests: int, failures: int, rps: float, p95: int, p99: int) -> Path:
    """A `PREFIX_stats.csv` as Locust 2.x writes it: one request type and the Aggregated row."""
    row = f"{requests},{failures},40,45.5,10,{p99 + 10},120,{rps},0.0,40,50,60,70,80,{p95},{p99 - 5},{p99},{p99},{p99},{p99}"
    prefix.with_name(prefix.name + "_stats.csv").write_text(
        "\n".join([STATS_HEADER, f"POST,text: ADE sentence,{row}", f",Aggregated,{row}"]) + "\n"
    )
    return prefix


def write_slo(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- Locust stats and the SLO check -----------------------------------------------------------------------------------


def test_read_stats_takes_the_aggregated_row_and_each_request_type(tmp_path):
    stats = read_stats(write_stats(tmp_path / "run", requests=200, failures=2, rps=3.5, p95=480, p99=900))
    assert set(stats) == {"Aggregated", "text: ADE sentence"}
    total = stats["Aggregated"]
    assert (total.requests, total.failures, total.rps, total.p95_ms, total.p99_ms) == (200, 2, 3.5, 480, 900)
    assert total.failure_rate == 0.01


def test_slo_holds_when_every_objective_is_met(tmp_path):
    stats = read_stats(write_stats(tmp_path / "run", 200, 0, 3.5, 480, 900))["Aggregated"]
    slo = {"p95_ms": 500, "p99_ms": 900, "max_failure_rate": 0.0, "min_rps": 3.0}
    assert check_slo(stats, slo) == []


@pytest.mark.parametrize(
    "objective, value, fragment",
    [
        ("p95_ms", 400, "p95 latency 480 ms > 400 ms"),
        ("p99_ms", 800, "p99 latency 900 ms > 800 ms"),
        ("max_failure_rate", 0.005, "failure rate 1.00% (2 of 200) > 0.50%"),
        ("min_rps", 5, "throughput 3.50 requests/s < 5.00"),
    ],
)
def test_each_violated_objective_is_named(tmp_path, objective, value, fragment):
    stats = read_stats(write_stats(tmp_path / "run", 200, 2, 3.5, 480, 900))["Aggregated"]
    assert check_slo(stats, {objective: value}) == [fragment]


def test_a_run_without_requests_never_passes(tmp_path):
    stats = read_stats(write_stats(tmp_path / "run", 0, 0, 0.0, 0, 0))["Aggregated"]
    assert check_slo(stats, {"max_failure_rate": 0.5}) == ["no request was made"]


def test_slo_file_rejects_unknown_keys_and_negative_values(tmp_path):
    assert load_slo(write_slo(tmp_path / "ok.yaml", "p95_ms: 500\nmin_rps: 1\n")) == {
        "p95_ms": 500,
        "min_rps": 1,
    }
    with pytest.raises(ConfigError, match="unknown key 'p90_ms'"):
        load_slo(write_slo(tmp_path / "bad.yaml", "p90_ms: 500\n"))
    with pytest.raises(ConfigError, match="'max_failure_rate' must be a non-negative number"):
        load_slo(write_slo(tmp_path / "bad.yaml", "max_failure_rate: -1\n"))


def test_the_repository_slo_file_is_valid():
    assert set(load_slo(LOAD_TESTS / "slo.yaml")) == {"p95_ms", "p99_ms", "max_failure_rate", "min_rps"}


def test_check_command_exits_2_naming_the_violation_and_0_when_met(tmp_path, capsys):
    prefix = write_stats(tmp_path / "run", 200, 0, 3.5, 480, 900)
    assert main(["loadtest", "check", "--csv", str(prefix), "--slo", str(LOAD_TESTS / "slo.yaml")]) == 0
    strict = write_slo(tmp_path / "strict.yaml", "p95_ms: 100\n")
    capsys.readouterr()
    assert main(["loadtest", "check", "--csv", str(prefix), "--slo", str(strict), "--json"]) == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out)["slo_violations"] == ["p95 latency 480 ms > 100 ms"]
    assert captured.err.startswith("epee: error: SLO violated: p95 latency 480 ms")


def test_read_history_keeps_the_aggregated_seconds_and_blanks_empty_windows(tmp_path):
    header = "Timestamp,User Count,Type,Name,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%,"
    header += (
        "Total Request Count,Total Failure Count,Total Median Response Time,Total Average Response Time,"
    )
    header += "Total Min Response Time,Total Max Response Time,Total Average Content Size"
    rows = [
        "100,0,,Aggregated,0.0,0.0,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,0,0,0,0.0,0,0,0",
        "101,1,,Aggregated,0.0,0.0,0,0,0,0,0,0,0,0,0,0,0,1,0,48,48,48,48,0",
        "102,2,POST,text: ADE sentence,1.0,0.0,40,40,40,40,40,50,50,50,50,50,50,2,0,40,40,40,40,0",
        "102,2,,Aggregated,1.0,0.0,40,40,40,40,40,50,50,50,50,50,50,2,0,40,40,40,40,0",
    ]
    (tmp_path / "run_stats_history.csv").write_text("\n".join([header, *rows]) + "\n")
    history = read_history(tmp_path / "run")
    assert history["seconds"] == [0.0, 1.0, 2.0] and history["users"] == [0.0, 1.0, 2.0]
    assert history["p95_ms"][2] == 50 and history["rps"] == [0.0, 0.0, 1.0]
    assert np.isnan(history["p50_ms"][0]) and np.isnan(history["p50_ms"][1])  # no response in the window yet


# --- the clinical-day shape ------------------------------------------------------------------------------------


def test_clinical_day_ramps_up_holds_bursts_to_the_peak_and_tails_off():
    users = [shape.users_at(second, peak_users=20, duration=100) for second in range(100)]
    assert users[0] == 2 and users[20] == 12 and users[35] == 12  # morning ramp, then clinic hours
    assert max(users) == 20 and all(users[s] == 20 for s in range(55, 71))  # the ward-round burst
    assert users[80] == 12 and users[99] < 4  # afternoon clinic, evening tail
    assert users.index(20) == 55 and min(users) >= 1


def test_clinical_day_ends_at_its_duration():
    assert shape.users_at(99.9, 8, 100) is not None and shape.users_at(100, 8, 100) is None


def test_clinical_day_scales_with_the_peak():
    small = [shape.users_at(s, 10, 60) for s in range(60)]
    large = [shape.users_at(s, 1000, 60) for s in range(60)]
    assert all(abs(big / 100 - little) <= 1 for big, little in zip(large, small))


def test_phases_are_named_in_order():
    names = [shape.phase_at(second, 100) for second in (5, 30, 60, 80, 95)]
    assert names == ["morning ramp", "clinic hours", "ward-round burst", "afternoon clinic", "evening tail"]


@pytest.mark.parametrize("peak, duration", [(0, 60), (shape.MAX_PEAK_USERS + 1, 60), (4, 0), (4, 10**6)])
def test_unbounded_runs_are_refused(peak, duration):
    with pytest.raises(ValueError):
        shape.check_bounds(peak, duration)


# --- payloads from the data files ------------------------------------------------------------------------------


def test_text_and_relation_payloads_are_request_bodies(tmp_path):
    (tmp_path / "ade.jsonl").write_text(
        '{"text": "Rash after amoxicillin.", "label": 1}\n{"text": " ", "label": 0}\n'
    )
    (tmp_path / "ddi.jsonl").write_text(
        '{"text": "A with B.", "head": "A", "tail": "B", "relation": "effect"}\n'
    )
    assert payloads.text_payloads(tmp_path / "ade.jsonl") == [{"text": "Rash after amoxicillin."}]
    assert payloads.relation_payloads(tmp_path / "ddi.jsonl") == [
        {"text": "A with B.", "head": "A", "tail": "B"}
    ]


def test_images_become_pngs_of_the_same_pixels(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "xray.npz", val_images=images, val_labels=np.zeros((3, 1)))
    encoded = payloads.png_payloads(tmp_path / "xray.npz")
    assert len(encoded) == 3 and all(png[:8] == b"\x89PNG\r\n\x1a\n" for png in encoded)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encoded[1]))), images[1])


@pytest.mark.parametrize(
    ("payload", "inputs"),
    [
        ({"text": "Rash."}, ("text",)),
        ({"text": "A with B.", "head": "A", "tail": "B"}, ("text", "head", "tail")),
    ],
)
def test_a_payload_for_kserve_is_the_oip_request_the_service_reads_back(payload, inputs):
    from epee_core.serving.oip import decode_request

    decoded = decode_request(payloads.oip_request(payload, "full"), inputs, multi_label=False)
    assert decoded.rows == [payload] and decoded.override == {"policy": "full"}


def test_a_png_for_kserve_is_one_base64_image_row():
    import base64

    body = payloads.oip_request(b"\x89PNG...")
    assert body == {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                "data": [base64.b64encode(b"\x89PNG...").decode()]}]}  # fmt: skip


def test_a_missing_data_file_names_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match="set --data-dir"):
        payloads.data_file(tmp_path, "long")


# --- refusals --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["http://10.0.0.5:8080", "https://127.0.0.1:8443", "http://localhost:8080"])
def test_only_127_0_0_1_is_a_target(url):
    with pytest.raises(LoadTestError, match="only target http://127.0.0.1"):
        require_local(url)


def test_the_locustfile_itself_refuses_another_host_before_any_request(tmp_path):
    locust = Path(sys.executable).parent / "locust"
    completed = subprocess.run(
        [str(locust), "-f", str(LOCUSTFILE), "--headless", "-H", "http://192.0.2.1:8080", "-u", "1", "-t", "5s",
         "--csv", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert completed.returncode == 2 and "only target http://127.0.0.1" in completed.stderr
    assert (
        tmp_path / "run_stats.csv"
    ).read_text() == ""  # Locust opened its CSV files, then nothing happened


def test_a_server_that_never_answers_costs_each_user_one_timeout_not_the_run(tmp_path):
    """A request TorchServe loses (docs/operations.md, Faults) must become a failure after --request-timeout, and
    the user goes on: with no timeout the one user would hang on its first request for the whole run."""
    for kind in ("short", "long"):
        path = tmp_path / payloads.DATA_FILES[kind]
        path.parent.mkdir(parents=True)
        path.write_text('{"text": "Rash after amoxicillin.", "label": 1}\n')
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never reads nor answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        locust = Path(sys.executable).parent / "locust"
        completed = subprocess.run(
            [str(locust), "-f", str(LOCUSTFILE), "--headless", "-H", f"http://127.0.0.1:{silent.getsockname()[1]}",
             "-u", "1", "-t", "6s", "--request-timeout", "0.5", "--wait-min", "0", "--wait-max", "0.1",
             "--data-dir", str(tmp_path), "--key-file", str(tmp_path / "none.json"), "--csv", str(tmp_path / "run")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    stats = read_stats(tmp_path / "run")["Aggregated"]
    assert stats.requests >= 3 and stats.failures == stats.requests, completed.stderr[-2000:]
    assert 400 <= stats.max_ms < 2000


def test_an_unbounded_run_is_refused_with_the_locust_log(tmp_path):
    run = LoadRun(
        host="http://127.0.0.1:9",
        models={"--text-model": "any"},
        peak_users=shape.MAX_PEAK_USERS + 1,
        duration=5,
        prefix=tmp_path / "run",
    )
    with pytest.raises(LoadTestError, match="peak users must be between 1 and"):
        run_locust(run)


def test_sigterm_becomes_an_interrupt_so_cleanup_runs():
    previous = signal.getsignal(signal.SIGTERM)
    cleaned = []
    with pytest.raises(KeyboardInterrupt):
        with stop_on_signals():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # interrupted by the handler
            finally:
                cleaned.append(True)
    assert cleaned == [True] and signal.getsignal(signal.SIGTERM) == previous
