"""`epee deploy`: register, scale, describe, list, unregister, set-default and rollout through TorchServe's
management API.

Token authorization is on by default in TorchServe: the management key comes from `--token`, then
`$EPEE_MANAGEMENT_KEY`, then the `key_file.json` TorchServe wrote where it was started (`--key-file`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import requests

DEFAULT_MANAGEMENT_URL = "http://127.0.0.1:8081"
TOKEN_ENV = "EPEE_MANAGEMENT_KEY"
URL_ENV = "EPEE_MANAGEMENT_URL"
KEY_FILE = "key_file.json"


class ServerError(RuntimeError):
    """TorchServe is unreachable or refused a request; the message says what to do."""


def read_key_file(path: str | Path) -> dict[str, str]:
    """The keys in TorchServe's key_file.json: {"management": ..., "inference": ..., "API": ...}."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {
            name: entry["key"] for name, entry in data.items() if isinstance(entry, dict) and "key" in entry
        }
    except FileNotFoundError:
        raise ServerError(f"{path}: key file not found (TorchServe writes it where it was started)") from None
    except (json.JSONDecodeError, AttributeError) as error:
        raise ServerError(f"{path}: not a TorchServe key file ({error})") from None


def management_token(token: str | None = None, key_file: str | Path | None = None) -> str | None:
    """The management key: explicit token, else $EPEE_MANAGEMENT_KEY, else key_file.json (if present)."""
    if token:
        return token
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    path = Path(key_file or KEY_FILE)
    if key_file is not None or path.is_file():
        return read_key_file(path).get("management")
    return None


def _error(response: requests.Response) -> tuple[str, str]:
    """TorchServe's error type and message, e.g. ("InvalidKeyException", "Token Authorization failed...")."""
    try:
        body = response.json()
        return str(body.get("type", "")), str(body.get("message", response.text)).strip()
    except (ValueError, AttributeError):
        return "", response.text.strip() or response.reason


class ManagementClient:
    """A thin client of the TorchServe management API (https://pytorch.org/serve/management_api.html)."""

    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 300.0):
        self.url = (url or os.environ.get(URL_ENV) or DEFAULT_MANAGEMENT_URL).rstrip("/")
        self.token = token
        self.timeout = timeout

    def _call(self, method: str, path: str, model: str | None = None, **params: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        query = {key: value for key, value in params.items() if value is not None}
        try:
            response = requests.request(
                method, self.url + path, params=query, headers=headers, timeout=self.timeout
            )
        except requests.ConnectionError:
            raise ServerError(
                f"cannot reach TorchServe's management API at {self.url}: is the server running? "
                "(torchserve --start --ts-config config.properties --ncs)"
            ) from None
        except requests.Timeout:
            raise ServerError(
                f"TorchServe at {self.url} did not answer within {self.timeout:.0f} s"
            ) from None
        if response.status_code < 400:
            try:
                return response.json()
            except ValueError:
                return {"status": response.text.strip()}
        kind, message = _error(response)
        if kind == "InvalidKeyException" or response.status_code == 401:
            raise ServerError(
                f"TorchServe at {self.url} refused the management token: pass --token, set ${TOKEN_ENV}, "
                f"or point --key-file at the key_file.json TorchServe wrote where it was started ({message})"
            )
        if response.status_code == 404 and model is not None:
            raise ServerError(f"{message} (see `epee deploy list` for the registered models)")
        raise ServerError(f"TorchServe answered {response.status_code}: {message}")

    @staticmethod
    def _model_path(name: str, version: str | None = None) -> str:
        return f"/models/{name}" + (f"/{version}" if version else "")

    def register(
        self,
        mar: str,
        name: str | None = None,
        batch_size: int | None = None,
        max_batch_delay: int | None = None,
        initial_workers: int = 1,
        response_timeout: int | None = None,
    ) -> dict:
        """Register an archive of the model store by name (NAME.mar) and start its workers (synchronously)."""
        return self._call(
            "POST",
            "/models",
            url=mar,
            model_name=name,
            batch_size=batch_size,
            max_batch_delay=max_batch_delay,
            initial_workers=initial_workers,
            response_timeout=response_timeout,
            synchronous="true",
        )

    def scale(
        self, name: str, min_workers: int, max_workers: int | None = None, version: str | None = None
    ) -> dict:
        return self._call(
            "PUT",
            self._model_path(name, version),
            model=name,
            min_worker=min_workers,
            max_worker=max_workers if max_workers is not None else min_workers,
            synchronous="true",
        )

    def unregister(self, name: str, version: str | None = None) -> dict:
        return self._call("DELETE", self._model_path(name, version), model=name)

    def list_models(self) -> dict:
        return self._call("GET", "/models", limit=1000)

    def describe(self, name: str, version: str | None = None) -> list[dict]:
        return self._call("GET", self._model_path(name, version), model=name)

    def set_default(self, name: str, version: str) -> dict:
        return self._call("PUT", self._model_path(name, version) + "/set-default", model=name)

    def versions(self, name: str) -> list[str]:
        """The registered versions of a model ([] when it is not registered)."""
        try:
            return [entry["modelVersion"] for entry in self.describe(name, "all")]
        except ServerError as error:
            if "not found" in str(error).lower():
                return []
            raise

    def pending_requests(self, name: str, version: str) -> int:
        """Requests waiting in one version's queue (TorchServe's jobQueueStatus)."""
        entry = self.describe(name, version)[0]
        return int(entry.get("jobQueueStatus", {}).get("pendingRequests", 0))

    def rollout(
        self,
        mar: str,
        name: str,
        workers: int = 1,
        drain_timeout: float = 60.0,
        drain_grace: float = 2.0,
        log=print,
    ) -> dict:
        """Replace the served version of `name` by the archive `mar` without dropping a request.

        1. register the new version next to the old ones and start its workers (synchronously);
        2. make it the default, so /predictions/NAME goes to it from now on;
        3. for each old version: wait until its queue is empty plus `drain_grace` seconds for the batch its
           workers are running, then unregister it.
        An archive whose version is already registered is refused by TorchServe (bump `epee package --version`).
        """
        old = self.versions(name)
        self.register(mar, name=name, initial_workers=workers)
        new = [version for version in self.versions(name) if version not in old]
        if len(new) != 1:
            raise ServerError(f"rollout of {mar}: expected one new version of {name}, found {new or 'none'}")
        version = new[0]
        log(
            f"registered {name} version {version} ({workers} worker(s)) next to {', '.join(old) or 'nothing'}"
        )
        self.set_default(name, version)
        log(f"{name} version {version} is the default: /predictions/{name} goes to it")
        for previous in old:
            deadline = time.monotonic() + drain_timeout
            while self.pending_requests(name, previous) and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(drain_grace)
            self.unregister(name, previous)
            log(f"unregistered {name} version {previous}")
        return {"model": name, "version": version, "replaced": old}
