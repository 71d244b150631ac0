"""`epee demo`: the whole product on the embedded ADE subset, in one command.

1. build the default model (pretrained MiniLM + exit heads, fine-tuned on epee_core/data/ade_demo_train.jsonl),
   or reuse models/ade-minilm from an earlier run;
2. calibrate its serving config on the embedded dev sentences (`demo_config`, `epee calibrate` under the hood);
3. package model_store/ade-minilm.mar;
4. start TorchServe from config.properties and register the model through the management API;
5. send real clinical sentences, print label, probability, exit layer and latency; stop the server.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import requests

from ..calibration import CalibrationJob, CalibrationOptions, ServingOptions, run_calibration
from ..data import DEMO_DATA_DIR
from ..data.text import read_examples
from ..engine.model import EarlyExitModel
from ..serving.service import POLICY_HEADER
from .management import ManagementClient
from .packaging import package_model
from .torchserve import TorchServe

DEMO_NAME = "ade-minilm"
LATENCY_REPEATS = 5  # each latency shown is the median of this many identical requests
DATA_DIR = DEMO_DATA_DIR
TRAIN_FILE = DATA_DIR / "ade_demo_train.jsonl"
DEV_FILE = DATA_DIR / "ade_demo_dev.jsonl"

# Sentences of the ADE corpus (ade_demo_dev.jsonl) with their annotation: three adverse drug events, four not.
DEMO_SENTENCES = [
    (
        "Pericardial hemorrhage due to acetylsalicylic acid in a patient with essential thrombocythemia.",
        "adverse_event",
    ),
    ("Thrombocytosis under ciprofloxacin and tazobactam/piperacillin.", "adverse_event"),
    (
        "We report a fatal case of toxic epidermal necrolysis (TEN) resulting from a high dose of cytosine "
        "arabinoside (ARA-C).",
        "adverse_event",
    ),
    ("Transaminases promptly returned to normal after withdrawal of the laxative.", "no_adverse_event"),
    ("Hypercoagulability studies were negative.", "no_adverse_event"),
    (
        "A 77 year old male was referred with abdominal pain, jaundice and elevated transaminase levels.",
        "no_adverse_event",
    ),
    (
        "Enoxaparin is the current anticoagulant of choice with advantages for the treatment of neonatal thrombosis.",
        "no_adverse_event",
    ),
]


def say(message: str) -> None:
    """Progress goes to stderr so that stdout holds only the result (table or --json)."""
    print(message, file=sys.stderr, flush=True)


def demo_model(model_dir: Path, retrain: bool = False) -> Path:
    """The default model: reused when `model_dir` already holds one, else trained (a few minutes on 2 CPU cores).

    The pretrained MiniLM backbone stays frozen and only the exit heads learn (one epoch, a high head learning
    rate): fine-tuning the backbone too takes about 4x longer on CPU for a few points of accuracy.
    """
    if not retrain and (model_dir / "epee.yaml").is_file():
        EarlyExitModel.from_pretrained(model_dir)  # fails loudly on a broken directory
        say(f"[1/5] reusing {model_dir} (delete it or pass --retrain to rebuild)")
        return model_dir
    from ..training.trainer import TrainConfig, train

    sentences = len(read_examples(TRAIN_FILE, "text-classification"))
    say(
        f"[1/5] training exit heads on frozen MiniLM with {TRAIN_FILE.name} ({sentences} sentences, one epoch)"
    )
    train(
        TrainConfig(
            task="text-classification",
            backbone="minilm",
            train_path=str(TRAIN_FILE),
            dev_path=str(DEV_FILE),
            output=str(model_dir),
            epochs=1,
            batch_size=16,
            freeze_backbone=True,
            head_learning_rate=5e-3,
            max_length=64,
            max_dev_samples=200,
        )
    )
    return model_dir


def demo_config(model_dir: Path) -> Path:
    """THE place where the demo picks its serving config: `epee calibrate` on the embedded ADE dev sentences.

    The fastest policy setting within 1 point of full-depth accuracy (held-back slice checked), the default
    scheduler (`calibration.model_yaml.DEFAULT_SCHEDULER`), and one torch thread per worker: on a 2-core machine the other core serves TorchServe's frontend
    and the client (measured: about 30 ms per request instead of 60-80 ms with 2 threads). The logit cache next
    to the model makes a second run take seconds.
    """
    path = model_dir.parent / f"{DEMO_NAME}.yaml"
    job = CalibrationJob(
        model_dir=str(model_dir),
        data_path=str(DEV_FILE),
        output=str(path),
        plot=str(model_dir.parent / f"{DEMO_NAME}-pareto.png"),
        cache_path=str(model_dir.parent / f"{DEMO_NAME}.cache.safetensors"),
        serving=ServingOptions(batch_size=4, max_batch_delay=10, response_timeout=60, num_threads=1),
        options=CalibrationOptions(max_accuracy_drop=0.01),
    )
    report = run_calibration(job, notify=lambda message: None)
    chosen = report["chosen"]
    say(f"      calibrated on {DEV_FILE.name}: {chosen['setting']} ({report['reason']})")
    for warning in report["warnings"]:
        say(f"      calibration warning: {warning}")
    return path


def query(
    server: TorchServe, text: str, policy: str | None = None, repeats: int = LATENCY_REPEATS
) -> tuple[dict, float]:
    """A prediction and its client-side latency in ms: the median of `repeats` identical requests, so that one
    hiccup of a busy machine does not decide the comparison."""
    headers = {**server.auth("inference"), **({POLICY_HEADER: policy} if policy else {})}
    latencies = []
    for _ in range(repeats):
        started = time.perf_counter()
        response = requests.post(
            f"{server.inference_url}/predictions/{DEMO_NAME}",
            json={"text": text},
            headers=headers,
            timeout=60,
        )
        latencies.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
    return response.json(), statistics.median(latencies)


def run_demo(workdir: str | Path = ".", keep_running: bool = False, retrain: bool = False) -> dict:
    """Build, package, serve and query the demo model; returns the rows of the result table and a summary."""
    root = Path(workdir).resolve()
    # fails early without config.properties; the default TMPDIR lets a plain `torchserve --stop` find the server
    server = TorchServe(root / "config.properties", workdir=root, private_tmp=False)
    started = time.perf_counter()
    model_dir = demo_model(root / "models" / DEMO_NAME, retrain)
    config_path = demo_config(model_dir)
    say(f"[2/5] serving config {config_path.relative_to(root)}")
    archive = package_model(model_dir, config_path, DEMO_NAME, export_path=root / "model_store")
    say(f"[3/5] packaged {Path(archive['archive']).relative_to(root)} ({archive['size_mb']} MB)")
    say(
        f"[4/5] starting TorchServe ({server.inference_url}, logs in {server.log_dir.relative_to(root)}/) and registering {DEMO_NAME}"
    )
    server.start()
    try:
        client = ManagementClient(server.management_url, server.keys.get("management"))
        client.register(f"{DEMO_NAME}.mar", initial_workers=1)
        say(f"[5/5] asking {DEMO_NAME} about {len(DEMO_SENTENCES)} sentences from the ADE corpus")
        for text, _ in DEMO_SENTENCES:  # warm-up: first calls pay for lazy initialisation, not shown
            query(server, text, repeats=1)
        rows = []
        for text, annotated in DEMO_SENTENCES:
            answer, latency_ms = query(server, text)
            _, full_latency_ms = query(server, text, policy="full")
            rows.append(
                {
                    "text": text,
                    "label": answer["label"],
                    "probability": answer["probabilities"][answer["label"]],
                    "exit_layer": answer["exit_layer"],
                    "num_layers": answer["num_layers"],
                    "latency_ms": round(latency_ms, 1),
                    "full_latency_ms": round(full_latency_ms, 1),
                    "annotated": annotated,
                }
            )
    except BaseException:
        server.stop()
        raise
    if not keep_running:
        server.stop()
    num_layers = rows[0]["num_layers"]
    mean_exit = sum(row["exit_layer"] for row in rows) / len(rows)
    return {
        "model": DEMO_NAME,
        "policy": answer["policy"],
        "rows": rows,
        "mean_exit_layer": round(mean_exit, 2),
        "num_layers": num_layers,
        "mean_latency_ms": round(sum(row["latency_ms"] for row in rows) / len(rows), 1),
        "mean_full_latency_ms": round(sum(row["full_latency_ms"] for row in rows) / len(rows), 1),
        "agree_with_annotation": sum(row["label"] == row["annotated"] for row in rows),
        "inference_url": f"{server.inference_url}/predictions/{DEMO_NAME}",
        "inference_key": server.keys.get("inference") if keep_running else None,
        "running_in": str(root) if keep_running else None,  # where `torchserve --stop` finds the server
        "seconds": round(time.perf_counter() - started, 1),
    }


def render_demo(result: dict) -> str:
    """The table a new user sees, plus one summary line per comparison."""

    def short(text: str, width: int = 60) -> str:
        return text if len(text) <= width else text[: width - 1] + "…"

    header = f"{'text':<60}  {'label':<16}  {'probability':>11}  {'exit layer':>10}  {'latency*':>9}"
    lines = [header, "-" * len(header)]
    for row in result["rows"]:
        exit_text = f"{row['exit_layer']} of {row['num_layers']}"
        lines.append(
            f"{short(row['text']):<60}  {row['label']:<16}  {row['probability']:>11.2f}  {exit_text:>10}  {row['latency_ms']:>6.1f} ms"
        )
    n = len(result["rows"])
    lines += [
        "",
        f"policy {result['policy']}: mean exit layer {result['mean_exit_layer']} of {result['num_layers']}, "
        f"mean latency {result['mean_latency_ms']} ms "
        f"(same sentences with {POLICY_HEADER}: full → {result['mean_full_latency_ms']} ms)",
        f"* median of {LATENCY_REPEATS} requests, measured by the client (HTTP, batching delay and model)",
        f"{result['agree_with_annotation']} of {n} labels agree with the ADE annotation; demo took {result['seconds']} s",
    ]
    if result["inference_key"]:
        lines.append(
            f"try it: curl -H 'Authorization: Bearer {result['inference_key']}' -H 'Content-Type: application/json' "
            f'-d \'{{"text": "Severe rash after amoxicillin."}}\' {result["inference_url"]}'
        )
    if result.get("running_in"):  # last, after the table: what to do once done with the server
        lines.append(f"TorchServe keeps running; stop it with `torchserve --stop` in {result['running_in']}")
    return "\n".join(lines)
