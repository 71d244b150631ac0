"""Start and stop a local TorchServe for `epee demo` and the integration tests.

`torchserve --start` leaves a Java server that inherits stdout/stderr, so its output goes to a log file (a pipe
would hang the caller). TorchServe keeps its pid file (and unpacked archives) in TMPDIR: with `private_tmp` each
server gets its own, under logs/tmp/<inference port>, so several servers can run side by side from one directory
(tests, load comparisons); without it a plain `torchserve --stop` finds the server (the demo's `--keep-running`).
`stop()` always stops *this* server's process, never whichever server another pid file names.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import psutil
import requests

from .management import KEY_FILE, ServerError, read_key_file

LAUNCHER = "from ts.model_server import start; start()"  # the `torchserve` console script, for any Python
DEFAULT_ADDRESSES = {
    "inference_address": "http://127.0.0.1:8080",
    "management_address": "http://127.0.0.1:8081",
    "metrics_address": "http://127.0.0.1:8082",
}


def read_properties(path: str | Path) -> dict[str, str]:
    """A Java .properties file as a dict (`key=value` lines; `#` and `!` comments)."""
    properties = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, _, value = line.partition("=")
            properties[key.strip()] = value.strip()
    return properties


def _port_open(url: str) -> bool:
    parsed = urlparse(url)
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((parsed.hostname or "127.0.0.1", parsed.port or 80)) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child is dead too
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


class TorchServe:
    """One local TorchServe started from a config.properties, in `workdir` (logs/, key_file.json)."""

    def __init__(
        self,
        config: str | Path,
        workdir: str | Path = ".",
        model_store: str | Path | None = None,
        python: str = sys.executable,
        private_tmp: bool = True,
    ):
        self.config = Path(config).resolve()
        if not self.config.is_file():
            raise ServerError(f"{config}: TorchServe config not found (run from the repository root)")
        self.workdir = Path(workdir).resolve()
        self.model_store = Path(model_store).resolve() if model_store else None
        self.python = python
        properties = read_properties(self.config)
        self.addresses = {
            key: properties.get(key, value).rstrip("/") for key, value in DEFAULT_ADDRESSES.items()
        }
        self.token_auth = properties.get("disable_token_authorization", "false").lower() != "true"
        self.log_dir = self.workdir / "logs"
        self.log_file = self.log_dir / "torchserve.out"
        port = urlparse(self.addresses["inference_address"]).port or 80
        self.tmp_dir = self.log_dir / "tmp" / str(port) if private_tmp else Path(tempfile.gettempdir())
        self.pid: int | None = None
        self.keys: dict[str, str] = {}

    @property
    def inference_url(self) -> str:
        return self.addresses["inference_address"]

    @property
    def management_url(self) -> str:
        return self.addresses["management_address"]

    @property
    def metrics_url(self) -> str:
        return self.addresses["metrics_address"]

    def _run_launcher(self, *args: str, timeout: float) -> int:
        env = {**os.environ, "TMPDIR": str(self.tmp_dir), "TEMP": str(self.tmp_dir)}
        with self.log_file.open("ab") as log:
            completed = subprocess.run(
                [self.python, "-c", LAUNCHER, *args],
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in the caller must not kill the server before `stop`
                timeout=timeout,
                check=False,
            )
        return completed.returncode

    def log_tail(self, lines: int = 15) -> str:
        if not self.log_file.is_file():
            return ""
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def start(self, timeout: float = 120.0) -> TorchServe:
        """Start the server and wait until it answers /ping; read the keys it wrote."""
        for url in self.addresses.values():
            if _port_open(url):
                raise ServerError(
                    f"{url} is already in use: another TorchServe? (stop it with `torchserve --stop`)"
                )
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        (self.workdir / KEY_FILE).unlink(missing_ok=True)
        args = ["--start", "--ts-config", str(self.config), "--ncs"]
        if self.model_store:
            args += ["--model-store", str(self.model_store)]
        pid_file = self.tmp_dir / ".model_server.pid"
        if self._run_launcher(*args, timeout=60) != 0 or not pid_file.is_file():
            raise ServerError(f"TorchServe did not start; see {self.log_file}:\n{self.log_tail()}")
        self.pid = int(pid_file.read_text().strip())
        deadline = time.monotonic() + timeout
        try:
            while not self._ready():
                if not _alive(self.pid) or time.monotonic() > deadline:
                    raise ServerError(f"TorchServe did not come up; see {self.log_file}:\n{self.log_tail()}")
                time.sleep(0.5)
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        """/ping answers 200 (with token auth on, /ping needs the inference key: wait for key_file.json)."""
        if self.token_auth:
            try:
                self.keys = read_key_file(self.workdir / KEY_FILE)
            except ServerError:  # not written yet, or half written
                return False
            if "inference" not in self.keys:
                return False
        try:
            ping = requests.get(f"{self.inference_url}/ping", headers=self.auth(), timeout=2)
        except requests.RequestException:
            return False
        return ping.status_code == 200

    def stop(self, timeout: float = 60.0) -> None:
        """Stop this server as `torchserve --stop` does (SIGTERM to its Java process, wait), then SIGKILL
        whatever is left of it and its workers."""
        if self.pid is None:
            return
        try:
            server = psutil.Process(self.pid)
            workers = server.children(recursive=True)
            server.terminate()
            server.wait(timeout)
        except psutil.TimeoutExpired:
            server.kill()
        except psutil.NoSuchProcess:
            workers = []
        for worker in workers:
            if worker.is_running():
                worker.kill()
        (self.tmp_dir / ".model_server.pid").unlink(missing_ok=True)
        self.pid = None

    def auth(self, api: str = "inference") -> dict[str, str]:
        """The Authorization header for the `inference` or `management` API ({} when token auth is off)."""
        return {"Authorization": f"Bearer {self.keys[api]}"} if self.keys else {}

    def __enter__(self) -> TorchServe:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
