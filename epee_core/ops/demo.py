"""`epee demo`: the whole product on the embedded ADE subset, in one command.

1. build the default model (pretrained MiniLM + exit heads, fine-tuned on epee_core/data/ade_demo_train.jsonl),
   or reuse models/ade-minilm from an earlier run;
2. calibrate its serving config on the embedded dev sentences, certified (`demo_config`, `epee calibrate` under
   the hood);
3. package model_store/ade-minilm.mar;
4. start TorchServe from config.properties and register the model through the management API;
5. send clinical sentences, easy to hard; print the annotation, the answer and ✓/✗, probability, margin, exit
   layer and latency; then what the calibration promised, where its plot and report are, and what to try next.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import requests

from ..calibration import CalibrationJob, CalibrationOptions, ServingOptions, run_calibration
from ..calibration.sweep import describe_guarantee
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
TRAIN_SAMPLES = 1500  # a stratified sample: all 2,000 take about 30 s more, over the 3-minute first run
CERTIFIED_DISAGREEMENT = 0.02  # the budget the demo certifies: at most 2 % of answers differ from full depth
RISK = 0.1  # ... with probability at least 0.9 over the draw of the dev rows

DOCS_SENTENCE = "Rash after amoxicillin."  # the docs' own example, annotated as the corpus would
# Sentences of the embedded dev set (calibration saw them, training did not) with their ADE annotation, easy to
# hard as the default model finds them: the first ones are sure at layer 1 or 2, the later ones only deeper (at
# layer 1 the default model answers "We report a case of myoclonus…", "Restless legs…" and the docs' sentence
# wrongly).
DEMO_SENTENCES = [
    ("Report of two cases.", "no_adverse_event"),
    ("Asthma is one of the most common chronic medical conditions.", "no_adverse_event"),
    ("Thrombocytosis under ciprofloxacin and tazobactam/piperacillin.", "adverse_event"),
    ("We report a case of myoclonus induced by quetiapine.", "adverse_event"),
    ("Transaminases promptly returned to normal after withdrawal of the laxative.", "no_adverse_event"),
    ("Hypercoagulability studies were negative.", "no_adverse_event"),
    ("Restless legs syndrome due to interferon-alpha.", "adverse_event"),
    (
        "We report a fatal case of toxic epidermal necrolysis (TEN) resulting from a high dose of cytosine "
        "arabinoside (ARA-C).",
        "adverse_event",
    ),
    (DOCS_SENTENCE, "adverse_event"),
]


def say(message: str) -> None:
    """Progress goes to stderr so that stdout holds only the result (table or --json)."""
    print(message, file=sys.stderr, flush=True)


def demo_model(model_dir: Path, retrain: bool = False) -> Path:
    """The default model: reused when `model_dir` already holds one, else trained (about 2 minutes on 2 CPU cores).

    The whole of MiniLM is fine-tuned with its exits for one epoch (the recipe's learning rates) on
    `TRAIN_SAMPLES` sentences: its later layers then answer better than its first ones, so easy sentences can
    leave early and hard ones go deep (measured on 2,000 ADE dev sentences after training on all 2,000 embedded
    ones: exit accuracy 0.76, 0.77, 0.81, 0.83, 0.85, 0.87). Exit heads on a frozen MiniLM train in a third of the
    time, but every exit then scores about the same (0.79 at layer 1 and at layer 6) and nothing adaptive is left
    to show. MiniLM's recipe distils the early exits from the last one (`distill_weight` 0.5, T 2): here it
    moved the early exits closer to the last one's answers and the last exit 1.5 points down on the 400 dev rows
    (within their noise); every demo sentence is still answered as annotated, at exit layers 1, 3, 4 and 6.
    """
    if not retrain and (model_dir / "epee.yaml").is_file():
        EarlyExitModel.from_pretrained(model_dir)  # fails loudly on a broken directory
        say(f"[1/5] reusing {model_dir} (delete it or pass --retrain to rebuild)")
        return model_dir
    from ..training.trainer import TrainConfig, train

    sentences = len(read_examples(TRAIN_FILE, "text-classification"))
    say(
        f"[1/5] fine-tuning MiniLM and its 6 exits on {TRAIN_SAMPLES} of the {sentences} sentences of "
        f"{TRAIN_FILE.name} (one epoch)"
    )
    train(
        TrainConfig(
            task="text-classification",
            backbone="minilm",
            train_path=str(TRAIN_FILE),
            dev_path=str(DEV_FILE),
            output=str(model_dir),
            epochs=1,
            max_samples=TRAIN_SAMPLES,
            max_length=64,
            max_dev_samples=200,
        )
    )
    return model_dir


def demo_config(model_dir: Path) -> tuple[Path, dict]:
    """THE place where the demo picks its serving config: `epee calibrate` on the embedded ADE dev sentences.

    Certified consistency (`--guarantee consistency`): the fastest setting whose disagreement with full depth is
    at most `CERTIFIED_DISAGREEMENT` with probability at least 1 − `RISK`, tested on the held-back 60 % of the
    dev rows: 240 test rows certify 2 points for a setting that disagrees on a few of them, while 1 point would
    need none at all (Clopper-Pearson at δ 0.1). The default scheduler (`calibration.model_yaml.DEFAULT_SCHEDULER`), and
    one torch thread per worker: on a 2-core machine the other core serves TorchServe's frontend and the client
    (measured: about 30 ms per request instead of 60-80 ms with 2 threads). The logit cache next to the model
    makes a second run take seconds. Returns the model YAML and the calibration report.
    """
    path = model_dir.parent / f"{DEMO_NAME}.yaml"
    job = CalibrationJob(
        model_dir=str(model_dir),
        data_path=str(DEV_FILE),
        output=str(path),
        plot=str(model_dir.parent / f"{DEMO_NAME}-pareto.png"),
        cache_path=str(model_dir.parent / f"{DEMO_NAME}.cache.safetensors"),
        serving=ServingOptions(batch_size=4, max_batch_delay=10, response_timeout=60, num_threads=1),
        options=CalibrationOptions(
            max_accuracy_drop=CERTIFIED_DISAGREEMENT,
            guarantee="consistency",
            risk=RISK,
            held_back_fraction=0.6,
        ),
    )
    report = run_calibration(job, notify=lambda message: None)
    say(f"      calibrated on {DEV_FILE.name}: {report['chosen']['setting']} ({report['reason']})")
    return path, report


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


def ask_all(server: TorchServe) -> list[dict]:
    """Every demo sentence under the calibrated policy and at full depth: the answer, how sure it was when it
    left (probability, margin), where it left, and the client-side latencies."""
    for text, _ in DEMO_SENTENCES:  # warm-up: first calls pay for lazy initialisation, not shown
        query(server, text, repeats=1)
    rows = []
    for text, annotated in DEMO_SENTENCES:
        answer, latency_ms = query(server, text)
        _, full_latency_ms = query(server, text, policy="full")
        rows.append(
            {
                "text": text,
                "annotated": annotated,
                "label": answer["label"],
                "correct": answer["label"] == annotated,
                "probability": answer["probabilities"][answer["label"]],
                "margin": answer["margin"],
                "exit_layer": answer["exit_layer"],
                "num_layers": answer["num_layers"],
                "policy": answer["policy"],
                "latency_ms": round(latency_ms, 1),
                "full_latency_ms": round(full_latency_ms, 1),
            }
        )
    return rows


def next_commands(root: Path, model_dir: Path, config_path: Path) -> list[str]:
    """What to try after the demo, on the files it wrote (paths relative to where it ran)."""
    model, config = model_dir.relative_to(root), config_path.relative_to(root)
    dev = f"epee_core/data/{DEV_FILE.name}"
    return [
        f"epee evaluate --model {model} --data {dev} --config {config}   # the calibrated policy on all dev rows",
        f"epee calibrate --model {model} --data {dev} --output models/mine.yaml --guarantee consistency "
        f"--max-accuracy-drop 0.1   # a looser budget: faster",
        f"epee bench --model {model} --config {config} --data {dev} --max-samples 200",
        "epee demo --keep-running   # then curl the server (the command is printed)",
    ]


def run_demo(workdir: str | Path = ".", keep_running: bool = False, retrain: bool = False) -> dict:
    """Build, calibrate, package, serve and query the demo model; returns the rows of the result table, what
    the calibration promised and where its outputs are."""
    root = Path(workdir).resolve()
    # fails early without config.properties; the default TMPDIR lets a plain `torchserve --stop` find the server
    server = TorchServe(root / "config.properties", workdir=root, private_tmp=False)
    started = time.perf_counter()
    model_dir = demo_model(root / "models" / DEMO_NAME, retrain)
    config_path, calibration = demo_config(model_dir)
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
        say(f"[5/5] asking {DEMO_NAME} about {len(DEMO_SENTENCES)} sentences")
        rows = ask_all(server)
    except BaseException:
        server.stop()
        raise
    if not keep_running:
        server.stop()
    certified = bool(calibration.get("certificate", {}).get("certified"))
    return {
        "model": DEMO_NAME,
        "policy": calibration["chosen"]["setting"],
        "rows": rows,
        "exit_layers": sorted({row["exit_layer"] for row in rows}),
        "mean_exit_layer": round(statistics.mean(row["exit_layer"] for row in rows), 2),
        "num_layers": rows[0]["num_layers"],
        "mean_latency_ms": round(statistics.mean(row["latency_ms"] for row in rows), 1),
        "mean_full_latency_ms": round(statistics.mean(row["full_latency_ms"] for row in rows), 1),
        "agree_with_annotation": sum(row["correct"] for row in rows),
        "promise": describe_guarantee(calibration["guarantee"], certified),
        "calibration": {
            "data": DEV_FILE.name,
            "rows": calibration["num_samples"],
            "full_accuracy": calibration["full"]["dev"]["metric"],
            "chosen_accuracy": calibration["chosen"]["dev"]["metric"],
            "warnings": calibration["warnings"],
        },
        "plot": str(Path(calibration["plot"]).relative_to(root)),
        "report": str(Path(calibration["report"]).relative_to(root)),
        "next": next_commands(root, model_dir, config_path),
        "inference_url": f"{server.inference_url}/predictions/{DEMO_NAME}",
        "inference_key": server.keys.get("inference") if keep_running else None,
        "running_in": str(root) if keep_running else None,  # where `torchserve --stop` finds the server
        "seconds": round(time.perf_counter() - started, 1),
    }


def render_demo(result: dict) -> str:
    """The table a new user sees (annotation, answer, ✓/✗, how sure, where it exited), what the calibration
    promised, its warnings, where its plot and report are, and what to try next."""

    def short(text: str, width: int = 52) -> str:
        return text if len(text) <= width else text[: width - 1] + "…"

    header = (
        f"{'text':<52}  {'annotated':<16}  {'answer':<16}     {'p':>4}  {'margin':>6}  {'exit':>6}  "
        f"{'latency*':>9}"
    )
    lines = [header, "-" * len(header)]
    for row in result["rows"]:
        mark = "✓" if row["correct"] else "✗"
        exit_text = f"{row['exit_layer']}/{row['num_layers']}"
        lines.append(
            f"{short(row['text']):<52}  {row['annotated']:<16}  {row['label']:<16}  {mark}  "
            f"{row['probability']:>4.2f}  {row['margin']:>6.2f}  {exit_text:>6}  {row['latency_ms']:>6.1f} ms"
        )
    n, calibration = len(result["rows"]), result["calibration"]
    lines += [
        "",
        f"{result['agree_with_annotation']} of {n} answers agree with the annotation; exit layers "
        f"{', '.join(map(str, result['exit_layers']))} (mean {result['mean_exit_layer']} of {result['num_layers']})",
        f"policy {result['policy']}: mean latency {result['mean_latency_ms']} ms "
        f"(same sentences with {POLICY_HEADER}: full → {result['mean_full_latency_ms']} ms)",
        f"* median of {LATENCY_REPEATS} requests, measured by the client (HTTP, batching delay and model)",
        "",
        f"promised by the calibration on {calibration['rows']} dev sentences ({calibration['data']}): "
        f"{result['promise']}",
        f"dev accuracy: {calibration['chosen_accuracy']:.4f} with the chosen policy, "
        f"{calibration['full_accuracy']:.4f} at full depth; no promise about one sentence: "
        f"route low-margin answers to review",
        *(f"warning: {warning}" for warning in calibration["warnings"]),
        "",
        f"Pareto plot: {result['plot']}   calibration report: {result['report']}",
        "next:",
        *(f"  {command}" for command in result["next"]),
        f"demo took {result['seconds']} s",
    ]
    if result["inference_key"]:
        lines.append(
            f"try it: curl -H 'Authorization: Bearer {result['inference_key']}' -H 'Content-Type: application/json' "
            f'-d \'{{"text": "Rash after amoxicillin."}}\' {result["inference_url"]}'
        )
    if result.get("running_in"):  # last, after the table: what to do once done with the server
        lines.append(f"TorchServe keeps running; stop it with `torchserve --stop` in {result['running_in']}")
    return "\n".join(lines)
