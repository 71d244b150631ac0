"""Batch-level EPEE against the layer-level scheduler at several `cohort_threads`, interleaved in one run.

    python scripts/compare_cohort_threads.py --model DIR --data JSONL --config YAML --rates 46.7,70,84
        [--threads 2] [--cohort-threads 1,2] [--requests 800] [--rounds 8] [--json]

The contestants of `epee bench --arrival-rate` that decide the default of `cohort_threads` (docs/latency.md,
"Cohort threads"): the stock handler and the YAML's policy batch-level with no delay, and the policy on the
layer-level scheduler once per `--cohort-threads` value. They take turns round by round on the same Poisson
arrivals and sentences (`OpenLoopBench.run_all`), so a machine that drifts does so for all of them; `epee bench`
varies one setting per run, and runs of the same setting differ by more than the settings do. Rates are
requests/s. Heavy: run it under `flock /tmp/cpu.lock` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import torch  # noqa: E402

from epee_core.data.text import read_examples  # noqa: E402
from epee_core.engine.model import EarlyExitModel  # noqa: E402
from epee_core.measure.openloop import STOCK, Contestant, OpenLoopBench  # noqa: E402
from epee_core.serving.config import ServeConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model directory")
    parser.add_argument("--data", required=True, help="JSONL of sentences the model never saw")
    parser.add_argument("--config", required=True, help="model YAML whose 'epee:' section gives the policy")
    parser.add_argument("--rates", required=True, help="comma-separated requests/s")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the worker (default 2)")
    parser.add_argument("--cohort-threads", default="1,2", help="comma-separated values to compare")
    parser.add_argument("--requests", type=int, default=800, help="requests per contestant and rate")
    parser.add_argument("--rounds", type=int, default=8, help="rounds the contestants take turns over")
    parser.add_argument("--json", action="store_true", help="print every row as one JSON object")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    serve = ServeConfig.load(args.config)
    model = EarlyExitModel.from_pretrained(args.model)
    examples = read_examples(args.data, model.spec.task)
    bench = OpenLoopBench(model, examples, serve.policy, delays_ms=(0.0,), limits=serve.scheduler_limits,
                          requests=args.requests, rounds=args.rounds)  # fmt: skip
    name = serve.policy.name
    contestants = [Contestant("batch", STOCK, 0.0), Contestant("batch", name, 0.0)] + [
        Contestant("continuous", name, cohort_threads=int(value)) for value in args.cohort_threads.split(",")
    ]
    bench.warm_up()
    rows = []
    for rate in (float(part) for part in args.rates.split(",")):
        rows += bench.run_all(contestants, rate)
    if args.json:
        print(json.dumps({"threads": args.threads, "results": rows}, indent=2))
        return
    print(
        "| rate | scheduler | policy | cohort threads | p50 ms | p95 ms | p99 ms | busy ms/request | accuracy |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['rate']} | {row['scheduler']} | {row['policy']} | {row.get('cohort_threads', '–')} | "
              f"{row['p50_ms']} | {row['p95_ms']} | {row['p99_ms']} | {row['profile']['busy_ms_per_request']} | "
              f"{row['accuracy']} |")  # fmt: skip


if __name__ == "__main__":
    main()
