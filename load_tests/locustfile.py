"""EPEE Serve under a clinical day of load: Locust users that POST real clinical payloads to a local TorchServe, or
to a local `epee serve` (KServe) with --platform kserve.

Run (headless, bounded: peak users `-u`, total duration `-t`; it stops by itself):
    locust -f load_tests/locustfile.py --headless -H http://127.0.0.1:8080 -u 8 -t 3m \\
        --text-model ade-minilm --csv load_tests/reports/run --html load_tests/reports/run.html
`epee loadtest run` and `epee loadtest compare` do this for you and check the SLO (load_tests/README.md).

Users (weights: --text-weight / --relation-weight / --image-weight, or EPEE_*_WEIGHT env vars):
- ClinicalTextUser: ADE sentences (short) and MTSamples notes (long) to --text-model (task split by
  --short-weight / --long-weight);
- RelationUser: DDI drug pairs to --relation-model (off unless a relation-extraction model is named);
- ImageUser: PneumoniaMNIST X-rays as PNG to --image-model (off unless an image model is named).
Several replicas: --target-hosts URL,URL (EPEE_TARGET_HOSTS) spreads the users over them, each user keeping one
host for its life (round robin, offset by the worker's index under --processes); -H stays the default host.
Platforms (--platform, EPEE_PLATFORM): torchserve POSTs the plain body to /predictions/MODEL; kserve POSTs the same
payload as an Open Inference Protocol v2 request to /v2/models/MODEL/infer (payloads.oip_request).
Only http://127.0.0.1 is ever targeted: any other host is refused before a single request is sent.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import sys
from urllib.parse import urlparse

from locust import HttpUser, LoadTestShape, events, task
from payloads import data_file, oip_request, png_payloads, relation_payloads, text_payloads
from shape import check_bounds, phase_at, users_at

ALLOWED_HOST = "127.0.0.1"
PLATFORMS = ("torchserve", "kserve")
DEFAULT_DURATION_SECONDS = 120
POLICY_HEADER = "X-EPEE-Policy"
PAYLOADS: dict[str, list] = {}  # filled once at start-up from the data files
AUTH: dict[str, str] = {}  # the Authorization header for TorchServe's inference API (token auth)
TARGETS: list[str] = []  # --target-hosts: the replicas users are spread over (empty: -H only)
NEXT_TARGET = itertools.count()

logger = logging.getLogger("epee.load")


@events.init_command_line_parser.add_listener
def add_arguments(parser) -> None:
    group = parser.add_argument_group(
        "EPEE Serve", "models, payloads and weights (each also an env variable)"
    )

    def option(name: str, env: str, default, help_text: str, kind=str) -> None:
        group.add_argument(name, type=kind, default=default, env_var=env, help=help_text)

    option("--text-model", "EPEE_TEXT_MODEL", "ade-minilm", "text-classification model name ('' = off)")
    option("--relation-model", "EPEE_RELATION_MODEL", "", "relation-extraction model name ('' = off)")
    option("--image-model", "EPEE_IMAGE_MODEL", "", "image-classification model name ('' = off)")
    option("--text-weight", "EPEE_TEXT_WEIGHT", 3, "weight of the text user class", int)
    option("--relation-weight", "EPEE_RELATION_WEIGHT", 1, "weight of the relation user class", int)
    option("--image-weight", "EPEE_IMAGE_WEIGHT", 1, "weight of the image user class", int)
    option("--short-weight", "EPEE_SHORT_WEIGHT", 3, "text users: share of short ADE sentences", int)
    option("--long-weight", "EPEE_LONG_WEIGHT", 1, "text users: share of long MTSamples notes", int)
    option("--data-dir", "EPEE_DATA_DIR", "data", "folder of ade/, mtsamples/, ddi/, pneumoniamnist/")
    option("--wait-min", "EPEE_WAIT_MIN", 0.5, "think time between a user's requests: minimum s", float)
    option("--wait-max", "EPEE_WAIT_MAX", 1.5, "think time between a user's requests: maximum s", float)
    option("--policy-override", "EPEE_POLICY_OVERRIDE", "", f"send {POLICY_HEADER}: NAME on every request")
    option("--key-file", "EPEE_KEY_FILE", "key_file.json", "TorchServe's key_file.json (inference key)")
    option("--request-timeout", "EPEE_REQUEST_TIMEOUT", 70.0,
           "s a request may take before it counts as failed (the models' responseTimeout 60 + 10)", float)  # fmt: skip
    option("--platform", "EPEE_PLATFORM", "torchserve", f"server kind: {' or '.join(PLATFORMS)}")
    option(
        "--target-hosts", "EPEE_TARGET_HOSTS", "", "replicas to spread users over: URL,URL (127.0.0.1 only)"
    )


def refuse(message: str) -> None:
    """Stop Locust before it sends anything."""
    logger.error("refused: %s", message)
    sys.exit(2)


def check_host(host: str | None) -> None:
    parsed = urlparse(host or "")
    if parsed.scheme != "http" or parsed.hostname != ALLOWED_HOST:
        refuse(f"host {host!r}: these load tests only target http://{ALLOWED_HOST}:PORT")


def inference_auth(key_file: str) -> dict[str, str]:
    """Bearer token from $EPEE_INFERENCE_KEY, else TorchServe's key_file.json, else none (token auth off)."""
    key = os.environ.get("EPEE_INFERENCE_KEY")
    if not key and os.path.isfile(key_file):
        with open(key_file, encoding="utf-8") as keys:
            key = json.load(keys).get("inference", {}).get("key")
    return {"Authorization": f"Bearer {key}"} if key else {}


@events.init.add_listener
def configure(environment, **_kwargs) -> None:
    """Check the target, choose the user classes that have a model, load their payloads."""
    options = environment.parsed_options
    check_host(environment.host)
    for user_class in environment.user_classes:
        check_host(user_class.host or environment.host)
    targets = [host.strip().rstrip("/") for host in options.target_hosts.split(",") if host.strip()]
    for host in targets:
        check_host(host)
    TARGETS[:] = targets
    if options.platform not in PLATFORMS:
        refuse(f"--platform {options.platform!r}: expected {' or '.join(PLATFORMS)}")
    try:
        check_bounds(options.num_users or 1, options.run_time or DEFAULT_DURATION_SECONDS)
    except ValueError as error:
        refuse(str(error))
    ClinicalTextUser.weight = options.text_weight if options.text_model else 0
    RelationUser.weight = options.relation_weight if options.relation_model else 0
    ImageUser.weight = options.image_weight if options.image_model else 0
    environment.user_classes[:] = [cls for cls in environment.user_classes if cls.weight > 0]
    if not environment.user_classes:
        refuse(
            "no user class left: name a model (--text-model, --relation-model, --image-model) with weight > 0"
        )
    try:
        if ClinicalTextUser in environment.user_classes:
            ClinicalTextUser.tasks = [ClinicalTextUser.short_sentence] * options.short_weight + [
                ClinicalTextUser.long_note
            ] * options.long_weight
            if not ClinicalTextUser.tasks:
                refuse("--short-weight and --long-weight are both 0")
            PAYLOADS["short"] = text_payloads(data_file(options.data_dir, "short"))
            PAYLOADS["long"] = text_payloads(data_file(options.data_dir, "long"))
        if RelationUser in environment.user_classes:
            PAYLOADS["relation"] = relation_payloads(data_file(options.data_dir, "relation"))
        if ImageUser in environment.user_classes:
            PAYLOADS["image"] = png_payloads(data_file(options.data_dir, "image"))
    except (OSError, KeyError, ValueError) as error:
        refuse(str(error))
    AUTH.update(inference_auth(options.key_file))
    logger.info(
        "users: %s; payloads: %s; policy override: %s; hosts: %s",
        ", ".join(f"{cls.__name__} (weight {cls.weight})" for cls in environment.user_classes),
        ", ".join(f"{kind} {len(items)}" for kind, items in PAYLOADS.items()),
        options.policy_override or "none",
        ", ".join(TARGETS) or environment.host,
    )


class EpeeUser(HttpUser):
    """POSTs to MODEL (/predictions/MODEL, or /v2/models/MODEL/infer on KServe) and fails any answer that is
    not a prediction; MODEL is the `model_option` command-line option of the user class."""

    abstract = True
    model_option = ""

    def __init__(self, environment) -> None:
        if TARGETS:  # one replica per user, round robin; workers start at their index so they spread too
            offset = getattr(environment.runner, "worker_index", 0) or 0
            self.host = TARGETS[(offset + next(NEXT_TARGET)) % len(TARGETS)]
            check_host(self.host)
        super().__init__(environment)

    def wait_time(self) -> float:
        options = self.environment.parsed_options
        return random.uniform(options.wait_min, options.wait_max)

    def predict(self, name: str, payload: dict | bytes) -> None:
        """POST one payload (a JSON body, or PNG bytes) in the platform's form and check the answer."""
        options = self.environment.parsed_options
        model, override = getattr(options, self.model_option), options.policy_override
        headers = dict(AUTH)
        if options.platform == "kserve":
            url, request = f"/v2/models/{model}/infer", {"json": oip_request(payload, override)}
        else:
            url = f"/predictions/{model}"
            if isinstance(payload, bytes):
                request, headers["Content-Type"] = {"data": payload}, "image/png"
            else:
                request = {"json": payload}
            if override:
                headers[POLICY_HEADER] = override
        with self.client.post(url, name=name, headers=headers, timeout=options.request_timeout, catch_response=True,
                              **request) as response:  # fmt: skip
            if response.status_code != 200:
                detail = response.text[:200] if response.text else repr(response.error)
                response.failure(f"HTTP {response.status_code}: {detail}")
                return
            try:
                answer = answer_fields(response.json())
            except ValueError:
                response.failure(f"not JSON: {response.text[:200]}")
                return
            if "exit_layer" not in answer:
                response.failure(f"not a prediction: {response.text[:200]}")
            elif override and answer.get("policy") != override:
                response.failure(f"asked for policy {override}, answered by {answer.get('policy')}")


def answer_fields(body) -> dict:
    """The fields of a plain answer (DESIGN §6), or of a one-row OIP answer (each output's first element)."""
    if isinstance(body, dict) and isinstance(body.get("outputs"), list):
        return {output.get("name"): (output.get("data") or [None])[0] for output in body["outputs"]
                if isinstance(output, dict)}  # fmt: skip
    return body if isinstance(body, dict) else {}


class ClinicalTextUser(EpeeUser):
    """Clinicians' text: short ADE sentences and long MTSamples notes (task shares set at start-up)."""

    weight = 3
    model_option = "text_model"

    @task
    def short_sentence(self) -> None:
        self.predict("text: ADE sentence", random.choice(PAYLOADS["short"]))

    @task
    def long_note(self) -> None:
        self.predict("text: MTSamples note", random.choice(PAYLOADS["long"]))


class RelationUser(EpeeUser):
    """Drug–drug interaction checks: a sentence and two drug names (DDI 2013)."""

    weight = 1
    model_option = "relation_model"

    @task
    def drug_pair(self) -> None:
        self.predict("relation: DDI pair", random.choice(PAYLOADS["relation"]))


class ImageUser(EpeeUser):
    """Chest X-ray triage: PneumoniaMNIST images sent as raw PNG bytes."""

    weight = 1
    model_option = "image_model"

    @task
    def chest_xray(self) -> None:
        self.predict("image: PneumoniaMNIST PNG", random.choice(PAYLOADS["image"]))


class ClinicalDayShape(LoadTestShape):
    """Morning ramp, clinic hours, ward-round burst, afternoon clinic, evening tail (load_tests/shape.py).

    `-u` is the peak number of users and `-t` the total duration (default 120 s); the run stops by itself.
    """

    use_common_options = True

    def __init__(self):
        super().__init__()
        self.phase = ""

    def tick(self) -> tuple[int, float] | None:
        options = self.runner.environment.parsed_options
        peak = options.num_users or 1
        duration = options.run_time or DEFAULT_DURATION_SECONDS
        elapsed = self.get_run_time()
        users = users_at(elapsed, peak, duration)
        if users is None:
            return None
        phase = phase_at(elapsed, duration)
        if phase != self.phase:
            logger.info("%.0f s: %s (%d users)", elapsed, phase, users)
            self.phase = phase
        return users, float(peak)  # spawn rate: any step of the curve is reached within a second
