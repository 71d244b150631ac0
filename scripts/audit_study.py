"""The shadow-audit study of docs/monitoring.md, on a real model and its real exit cache.

    python scripts/audit_study.py latency --model DIR --config YAML --data DEV.jsonl [--requests 200]
    python scripts/audit_study.py streams --config YAML --cache CACHE [--streams 500] [--fixture OUT.json]

`latency`: batch-1 requests, one at a time, through `TextService.answer` with the audit off, at the tail of the
batch and in the background, at audit fractions 0.02 and 1; back to back and with a 20 ms gap between requests.
Prints p50 / p95 per-request latency (ms) side by side.

`streams`: replays the YAML's policy on the calibration cache (the same `replay_policy` calibration uses) to get
each dev row's disagreement with full depth and exit layer, then
- false alarms: `--streams` in-distribution streams, rows resampled with replacement from the cache, audited at
  q = 2 % until 5,000 audited rows; the alarm rate against alpha and its binomial 99.9 % bound;
- detection: 1,000 audited in-distribution rows, then a switch to a mix of the cache's disagreeing and agreeing
  rows at 2, 3 and 5 times the monitored rate; served rows to alarm (median, p90) at q = 2 %;
- audit cost: q × L extra layers per served row against the policy's average exit layer.
`--fixture` writes the per-row disagreement and exit layer (no text) for tests/test_monitor.py.

    python scripts/audit_study.py torchserve --model DIR --config YAML --stream STREAM.jsonl --switch N [--audit 0.2]

`torchserve`: the rehearsal on a real TorchServe: the model packaged with the YAML plus `audit_fraction`, the
stream's rows sent 8 at a time (the first N in-distribution, the rest drifted); after each burst the script reads
`EpeeFallback` from the metrics endpoint and prints the request count at which the fallback showed, the
X-EPEE-Guarantee header and the exit layers of the next answers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy import stats  # noqa: E402

from epee_core.calibration.cache import LogitCache  # noqa: E402
from epee_core.calibration.replay import replay_policy  # noqa: E402
from epee_core.engine.model import EarlyExitModel  # noqa: E402
from epee_core.engine.signals import layer_probs, predictions  # noqa: E402
from epee_core.serving.config import ServeConfig  # noqa: E402
from epee_core.serving.monitor import DisagreementMonitor  # noqa: E402
from epee_core.serving.service import TextService  # noqa: E402

JSON = {"body": {"content-type": "application/json"}}
FRACTION = 0.02
ALPHA = 0.05


def latency(args) -> None:
    """Each contestant serves all requests in turn (not interleaved: a background audit would then slow the next
    contestant's request, not its own contestant's)."""
    torch.set_num_threads(1)
    texts = [json.loads(line)["text"] for line in Path(args.data).read_text().splitlines()[: args.requests]]
    base = ServeConfig.load(args.config)
    model = EarlyExitModel.from_pretrained(args.model)
    contestants = [("off", 0.0, "tail")] + [
        (f"{mode} q={fraction:g}", fraction, mode)
        for fraction in (FRACTION, 1.0)
        for mode in ("tail", "background")
    ]
    print(f"{len(texts)} batch-1 requests, {model.num_layers} layers, policy {base.policy.describe()}")
    print(f"{'audit':<22}{'gap ms':>7}{'p50 ms':>9}{'p95 ms':>9}{'audited':>9}")
    for gap in (0.0, 0.02):
        for name, fraction, mode in contestants:
            config = ServeConfig(**{**vars(base), "audit_fraction": fraction, "audit_mode": mode})
            service = TextService(model, config)
            service.answer([{"body": {"text": texts[0]}}], [JSON])  # warm-up
            times = []
            for text in texts:
                started = time.perf_counter()
                service.answer([{"body": {"text": text}}], [JSON])
                times.append((time.perf_counter() - started) * 1000)
                time.sleep(gap)
            if service.auditor is not None:
                service.auditor.wait()
            audited = service.auditor.monitor.audited if service.auditor else 0
            p95 = float(np.percentile(times, 95))
            print(f"{name:<22}{gap * 1000:>7.0f}{statistics.median(times):>9.2f}{p95:>9.2f}{audited:>9}")


def disagreement_rows(config: ServeConfig, cache: LogitCache) -> tuple[np.ndarray, np.ndarray]:
    """Per cache row: does the policy's answer differ from full depth's, and its exit layer."""
    replayed = replay_policy(config.policy, cache.logits, False, lengths=cache.lengths)
    full = predictions(layer_probs(cache.full_depth_logits[-1], False), False)
    return (replayed.predictions(False) != full).numpy(), replayed.exit_layer.numpy()


def alarm_after(
    disagree: np.ndarray, epsilon: float, monitor: DisagreementMonitor | None = None
) -> int | None:
    """The audited row (1-based) at which `monitor` (fresh by default) alarms on `disagree`, or None."""
    monitor = monitor or DisagreementMonitor(epsilon, ALPHA)
    for number, value in enumerate(disagree, start=1):
        if monitor.update(bool(value)):
            return number
    return None


def streams(args) -> None:
    config = ServeConfig.load(args.config)
    cache = LogitCache.load(args.cache)
    disagree, exit_layer = disagreement_rows(config, cache)
    epsilon = config.monitored_rate
    rng = np.random.default_rng(args.seed)
    num_layers = cache.num_layers
    print(f"cache: {cache.num_samples} rows, {num_layers} layers; policy {config.policy.describe()}")
    print(f"disagreement with full depth on the cache: {disagree.mean():.4f}; monitored rate {epsilon:g}")
    if args.fixture:
        Path(args.fixture).write_text(json.dumps({"policy": config.policy.describe(), "epsilon": epsilon,
                                                  "disagree": disagree.astype(int).tolist(),
                                                  "exit_layer": exit_layer.tolist()}) + "\n")  # fmt: skip
    audited_rows = 5000
    alarms = sum(
        alarm_after(rng.choice(disagree, audited_rows), epsilon) is not None for _ in range(args.streams)
    )
    bound = int(stats.binom.ppf(0.999, args.streams, ALPHA))
    print(f"false alarms: {alarms} / {args.streams} resampled streams of {audited_rows} audited rows "
          f"({audited_rows / FRACTION:,.0f} served at q={FRACTION:g}); alpha {ALPHA}, 99.9% binomial bound {bound}")  # fmt: skip
    agreeing, disagreeing = np.flatnonzero(~disagree), np.flatnonzero(disagree)
    print(f"| after the switch | alarms before | served rows to alarm at q = {FRACTION:g}, median / p90 |")
    print("|---|---|---|")
    for factor in (2, 3, 5):
        early, served = 0, []
        for _ in range(args.runs):
            before = rng.choice(disagree, 1000)
            monitor = DisagreementMonitor(epsilon, ALPHA)
            if alarm_after(before, epsilon, monitor) is not None:
                early += 1
                continue
            chunk = 200_000  # served rows after the switch, audited at FRACTION
            audited = rng.random(chunk) < FRACTION
            rows = np.where(rng.random(chunk) < factor * epsilon, rng.choice(disagreeing, chunk),
                            rng.choice(agreeing, chunk))  # fmt: skip
            positions = np.flatnonzero(audited)
            at = alarm_after(disagree[rows[positions]], epsilon, monitor)
            served.append(positions[at - 1] + 1 if at is not None else np.inf)
        print(f"| {factor}ε = {factor * epsilon:.4f} | {early} / {args.runs} | "
              f"{np.median(served):,.0f} / {np.percentile(served, 90):,.0f} |")  # fmt: skip
    print(f"audit cost: q*L = {FRACTION * num_layers:.3f} extra layers per served row; the policy runs "
          f"{exit_layer.mean():.3f} layers on average (full depth {num_layers}): +{FRACTION * num_layers / exit_layer.mean():.1%}")  # fmt: skip


def torchserve(args) -> None:
    import tempfile

    import requests
    import yaml

    sys.path.insert(0, str(ROOT / "tests"))
    from integration.helpers import package, post_all, read_metrics, running_torchserve

    from epee_core.ops.management import ManagementClient

    texts = [json.loads(line)["text"] for line in Path(args.stream).read_text().splitlines()]
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        config = yaml.safe_load(Path(args.config).read_text())
        config["epee"].update(
            audit_fraction=args.audit, audit_records=str(work / "audit.jsonl"), num_threads=1
        )
        (work / "serve.yaml").write_text(yaml.safe_dump(config))
        package(Path(args.model), work / "serve.yaml", "ade", work / "store")
        with running_torchserve(work, work / "store") as server:
            ManagementClient(server.management_url, server.keys["management"], timeout=300).register(
                "ade.mar"
            )
            url, seen = f"{server.inference_url}/predictions/ade", None
            for start in range(0, len(texts), 8):
                responses = post_all(url, [{"json": {"text": t[:5000]}, "headers": server.auth()}
                                           for t in texts[start : start + 8]])  # fmt: skip
                fallback = sum(read_metrics(server.metrics_url, "EpeeFallback", "ade").values())
                if fallback and seen is None:
                    seen = start + 8
                    header = responses[-1].headers.get("X-EPEE-Guarantee")
                    print(f"fallback metric 1 after {seen} requests (drift from request {args.switch + 1})")
                    after = post_all(
                        url, [{"json": {"text": t[:5000]}, "headers": server.auth()} for t in texts[:8]]
                    )
                    print(f"header: {after[0].headers.get('X-EPEE-Guarantee')}; before: {header}")
                    print(f"exit layers after: {sorted({r.json()['exit_layer'] for r in after})}")
                    break
            records = (work / "audit.jsonl").read_text().splitlines()
            print(f"sent {start + 8} requests; {len(records)} audit records; fallback seen: {seen}")
            described = requests.get(f"{server.management_url}/models/ade", params={"customized": "true"},
                                     headers=server.auth("management"), timeout=60).json()[0]  # fmt: skip
            print("describe:", json.dumps(described.get("customizedMetadata"))[:600])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    timing = commands.add_parser("latency")
    timing.add_argument("--model", required=True)
    timing.add_argument("--config", required=True)
    timing.add_argument("--data", required=True)
    timing.add_argument("--requests", type=int, default=200)
    study = commands.add_parser("streams")
    study.add_argument("--config", required=True)
    study.add_argument("--cache", required=True)
    study.add_argument("--streams", type=int, default=500)
    study.add_argument("--runs", type=int, default=200)
    study.add_argument("--seed", type=int, default=0)
    study.add_argument("--fixture")
    served = commands.add_parser("torchserve")
    served.add_argument("--model", required=True)
    served.add_argument("--config", required=True)
    served.add_argument("--stream", required=True)
    served.add_argument("--switch", type=int, required=True)
    served.add_argument("--audit", type=float, default=0.2)
    args = parser.parse_args()
    {"latency": latency, "streams": streams, "torchserve": torchserve}[args.command](args)


if __name__ == "__main__":
    main()
