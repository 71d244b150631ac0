"""Distributed Locust runs (load_tests/README.md, "Distributed runs"): `epee loadtest run --processes 2 --hosts A,B`
for a few seconds against two stub replicas on 127.0.0.1, and the 127.0.0.1 guard on every host."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import Counter
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import DEMO_DATA, StubHandler

from epee_core.cli import main
from epee_core.measure.loadtest import LOCUSTFILE, LoadRun, LoadTestError, check_distribution

ANSWER = json.dumps(
    {
        "label": "a",
        "probabilities": {"a": 1.0},
        "exit_layer": 1,
        "num_layers": 4,
        "entropy": 0.0,
        "policy": "epee",
    }
).encode()


class Replica:
    """A stub inference API on 127.0.0.1: answers every POST /predictions/... like the handler, counts them."""

    def __init__(self):
        self.hits: Counter[str] = Counter()
        replica = self

        class Handler(StubHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                replica.hits[self.path] += 1
                self.send_json(200, ANSWER)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Replica:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.shutdown()
        self.server.server_close()


def data_dir(directory: Path) -> Path:
    """ade/dev.jsonl (the embedded ADE sentences) and mtsamples/notes.jsonl (a few long notes made of them)."""
    (directory / "ade").mkdir(parents=True)
    (directory / "mtsamples").mkdir()
    lines = (DEMO_DATA / "ade_demo_dev.jsonl").read_text().splitlines()
    (directory / "ade" / "dev.jsonl").write_text("\n".join(lines[:50]) + "\n")
    notes = [" ".join(json.loads(line)["text"] for line in lines[start : start + 20]) for start in (0, 20)]
    (directory / "mtsamples" / "notes.jsonl").write_text(
        "".join(json.dumps({"text": n}) + "\n" for n in notes)
    )
    return directory


def test_two_worker_processes_spread_the_users_over_two_replicas(tmp_path, capsys):
    with Replica() as first, Replica() as second:
        code = main(["loadtest", "run", "--processes", "2", "--hosts", f"{first.url},{second.url}",
                     "--text-model", "stub", "--peak-users", "4", "--duration", "6", "--data-dir",
                     str(data_dir(tmp_path / "data")), "--output-dir", str(tmp_path / "reports"), "--slo", "",
                     "--key-file", str(tmp_path / "none.json"), "--json"])  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    assert result["processes"] == 2 and result["hosts"] == [first.url, second.url]
    stats = result["stats"]
    print(f"\n2 workers, 2 replicas: {stats['requests']} requests; replica hits {sum(first.hits.values())} + "
          f"{sum(second.hits.values())}")  # fmt: skip
    assert stats["requests"] > 0 and stats["failures"] == 0
    assert sum(first.hits.values()) > 0 and sum(second.hits.values()) > 0  # both replicas got load
    assert sum(first.hits.values()) + sum(second.hits.values()) >= stats["requests"]
    assert set(first.hits) | set(second.hits) <= {"/predictions/stub"}
    log = Path(result["files"]["log"]).read_text()
    assert "2 workers connected" in log  # Locust's master saw both worker processes


@pytest.mark.parametrize(
    ("processes", "hosts", "message"),
    [
        (0, ["http://127.0.0.1:8080", "http://10.0.0.5:8080"], "only target http://127.0.0.1"),
        (0, ["http://127.0.0.1:8080", "http://localhost:8081"], "only target http://127.0.0.1"),
        (2, ["http://127.0.0.1:8080", "http://127.0.0.1:8080"], "named twice"),
        (17, [], "--processes must be between 0"),
        (-1, [], "--processes must be between 0"),
        (0, [f"http://127.0.0.1:{port}" for port in range(9000, 9033)], "at most 32 hosts"),
    ],
)
def test_distribution_is_bounded_and_local_only(processes, hosts, message):
    with pytest.raises(LoadTestError, match=message):
        check_distribution(processes, hosts)


def test_the_cli_refuses_a_remote_replica_before_starting_locust(tmp_path, capsys):
    code = main(["loadtest", "run", "--hosts", "http://127.0.0.1:9,http://192.0.2.1:8080", "--text-model", "m",
                 "--duration", "5", "--output-dir", str(tmp_path), "--slo", ""])  # fmt: skip
    assert code == 2 and "only target http://127.0.0.1" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # no Locust ran


def test_the_locustfile_itself_refuses_a_remote_target_host(tmp_path):
    locust = Path(sys.executable).parent / "locust"
    completed = subprocess.run(
        [str(locust), "-f", str(LOCUSTFILE), "--headless", "-H", "http://127.0.0.1:9", "-u", "1", "-t", "5s",
         "--target-hosts", "http://127.0.0.1:9,http://192.0.2.1:8080", "--csv", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert completed.returncode == 2 and "only target http://127.0.0.1" in completed.stderr


def test_the_master_listens_on_127_0_0_1_only():
    run = LoadRun(host="http://127.0.0.1:9", models={"--text-model": "m"}, peak_users=2, duration=5,
                  prefix=Path("run"), processes=2, master_port=5599)  # fmt: skip
    command = run.command()
    assert command[command.index("--processes") + 1] == "2"
    assert command[command.index("--master-bind-host") + 1] == "127.0.0.1"
    assert (
        command[command.index("--master-bind-port") + 1]
        == command[command.index("--master-port") + 1]
        == "5599"
    )
    assert "--processes" not in LoadRun(host="http://127.0.0.1:9", models={}, peak_users=1, duration=5,
                                        prefix=Path("run")).command()  # fmt: skip
