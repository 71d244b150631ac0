"""`epee bench --arrival-rate`: latency under open-loop Poisson load, batch-level vs layer-level scheduling.

Requests arrive on a Poisson schedule (seeded: every contestant sees the same arrival times and the same
sentences) and are served in real time by the real engine in this process, one worker, as a TorchServe worker
would serve them:
- `batch` contestants emulate TorchServe's dynamic batching: when the worker is free it takes the oldest waiting
  request, then more until the batch holds `batch_size` requests or `max_batch_delay_ms` has passed since it took
  the first; it runs the whole batch and answers every request when the batch is done. The stock handler (`hf`,
  the plain Hugging Face forward over the padded batch), full depth and the calibrated policy run this way, each
  at every delay of the sweep.
- the `continuous` contestant runs the calibrated policy on the layer-level scheduler (`serving/scheduler.py`):
  a request joins at the next step and is answered at the step its policy lets it exit.
Latency is answer time minus arrival time: queueing, batch wait and compute. Each run reports p50/p95/p99,
throughput, accuracy and the mean exit layer; `slo_capacity` is, per contestant at its best delay, the highest
arrival rate (found by bisection) whose p95 stays within the SLO.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from ..engine.inputs import Example
from ..engine.model import EarlyExitModel
from ..engine.policies import Policy, make_policy, predictions
from ..engine.runner import run_bucketed
from ..evaluation.evaluate import label_tensor
from ..serving.scheduler import LayerScheduler, SchedulerLimits

DEFAULT_DELAYS_MS = (0, 5, 10, 20, 50)
KEEPS_UP = 0.85  # a run keeps up with its arrivals when it answers at least this share of the arrival rate
STOCK = "hf"


@dataclass
class Contestant:
    """One way of serving: a scheduler (`batch` or `continuous`) and a policy (`hf`, `full` or the calibrated
    policy); batch contestants also carry their `max_batch_delay_ms`, and a continuous one may set its own
    `cohort_threads` (None: the bench's limits)."""

    scheduler: str
    policy: str
    max_batch_delay_ms: float | None = None
    cohort_threads: int | None = None


@dataclass
class Workload:
    """The requests of one run: encoded one by one (as they arrive), their gold labels and arrival times."""

    examples: list[Example]
    arrivals: list[float]  # seconds from the start, increasing


def poisson_arrivals(count: int, rate: float, seed: int = 0) -> list[float]:
    """`count` arrival times of a Poisson process of `rate` requests/s (all at 0 for an infinite rate)."""
    if math.isinf(rate):
        return [0.0] * count
    generator = random.Random(seed)
    times, now = [], 0.0
    for _ in range(count):
        now += generator.expovariate(rate)
        times.append(now)
    return times


def batch_runner(model: EarlyExitModel, policy: Policy | None) -> Callable[[list[Example]], list[tuple]]:
    """A batch contestant's engine call: the stock forward (`policy` None) or `run_bucketed` with `policy`; per
    row its prediction and exit layer."""

    def run(batch: list[Example]) -> list[tuple]:
        inputs = model.encode_examples(batch)
        if policy is None:
            logits = model.stock_logits(inputs)
            probs = torch.sigmoid(logits) if model.multi_label else logits
            layers = [model.num_layers] * len(batch)
        else:
            result = run_bucketed(model, inputs, policy)
            probs, layers = result.probs, result.exit_layer.tolist()
        return list(zip(_rows(predictions(probs, model.multi_label)), layers))

    return run


def _rows(predicted: torch.Tensor) -> list:
    """Per row a comparable prediction: a class index, or a multi-hot list."""
    return [row.tolist() if predicted.dim() > 1 else int(row) for row in predicted]


@torch.inference_mode()
def serve_batches(
    workload: Workload, run: Callable, batch_size: int, delay_ms: float, profile: dict | None = None
) -> tuple[list[float], list[tuple]]:
    """TorchServe's dynamic batching in real time; per request its answer time and (prediction, exit layer)."""
    arrivals, count = workload.arrivals, len(workload.arrivals)
    delay = delay_ms / 1000.0
    done_at: list[float] = [0.0] * count
    answers: list[tuple] = [None] * count  # type: ignore[list-item]
    start = time.perf_counter()
    clock = lambda: time.perf_counter() - start  # noqa: E731
    next_request, busy, batches = 0, 0.0, 0
    while next_request < count:
        now = clock()
        if arrivals[next_request] > now:
            time.sleep(arrivals[next_request] - now)
        opened = clock()  # the worker takes the oldest waiting request
        batch = [next_request]
        while len(batch) < batch_size and batch[-1] + 1 < count:
            candidate = batch[-1] + 1
            wait = arrivals[candidate] - clock()
            if wait <= 0:
                batch.append(candidate)
            elif arrivals[candidate] <= opened + delay:  # it arrives before the delay runs out
                time.sleep(wait)
                batch.append(candidate)
            else:  # TorchServe waits out the delay for a batch that does not fill
                time.sleep(max(0.0, opened + delay - clock()))
                break
        began = clock()
        results = run([workload.examples[i] for i in batch])
        finished = clock()
        busy += finished - began
        batches += 1
        for index, result in zip(batch, results):
            done_at[index], answers[index] = finished, result
        next_request = batch[-1] + 1
    if profile is not None:
        profile.update(batches=batches, batch_ms=round(1000 * busy / max(batches, 1), 3),
                       busy_ms_per_request=round(1000 * busy / count, 3))  # fmt: skip
    return done_at, answers


@torch.inference_mode()
def serve_continuously(
    workload: Workload,
    model: EarlyExitModel,
    policy: Policy,
    limits: SchedulerLimits,
    profile: dict | None = None,
) -> tuple[list[float], list[tuple]]:
    """The layer-level scheduler in real time: arrivals join at the next step, answers leave at their exit."""
    arrivals, count = workload.arrivals, len(workload.arrivals)
    scheduler = LayerScheduler(model, limits)
    done_at: list[float] = [0.0] * count
    answers: list[tuple] = [None] * count  # type: ignore[list-item]
    start = time.perf_counter()
    clock = lambda: time.perf_counter() - start  # noqa: E731
    next_request, answered = 0, 0
    step_seconds, admit_seconds, steps, layer_calls = 0.0, 0.0, 0, 0
    while answered < count:
        now = clock()
        if scheduler.idle and arrivals[next_request] > now:
            time.sleep(arrivals[next_request] - now)
        admit_started = clock()
        while next_request < count and arrivals[next_request] <= clock():
            inputs = model.encode_examples([workload.examples[next_request]])
            scheduler.submit(next_request, inputs, policy)
            next_request += 1
        step_started = clock()
        layer_calls += len(scheduler.cohorts) + (1 if scheduler.waiting else 0)
        finished = scheduler.step()
        now = clock()
        admit_seconds += step_started - admit_started
        step_seconds += now - step_started
        steps += 1
        for done in finished:
            probs = torch.tensor([done.rows[0].probs])
            answers[done.key] = (_rows(predictions(probs, model.multi_label))[0], done.rows[0].exit_layer)
            done_at[done.key] = now
            answered += 1
    if profile is not None:
        profile.update(steps=steps, step_ms=round(1000 * step_seconds / max(steps, 1), 3),
                       admit_ms=round(1000 * admit_seconds / max(steps, 1), 3),
                       cohorts_per_step=round(layer_calls / max(steps, 1), 3),
                       busy_ms_per_request=round(1000 * (step_seconds + admit_seconds) / count, 3))  # fmt: skip
    return done_at, answers


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class Measured:
    """What a contestant's runs at one rate gave, pooled over rounds."""

    latencies_ms: list[float] = field(default_factory=list)
    correct: int = 0
    exit_layers: list[int] = field(default_factory=list)
    seconds: float = 0.0  # first arrival to last answer, summed over rounds
    profiles: list[dict] = field(default_factory=list)

    def add(self, model: EarlyExitModel, workload: Workload, done_at: list[float], answers: list[tuple],
            profile: dict) -> None:  # fmt: skip
        self.latencies_ms += [1000 * (done - arrival) for done, arrival in zip(done_at, workload.arrivals)]
        gold = _rows(label_tensor(workload.examples, model.spec.labels, model.spec.task))
        self.correct += sum(answer[0] == truth for answer, truth in zip(answers, gold))
        self.exit_layers += [answer[1] for answer in answers]
        self.seconds += max(done_at) - min(workload.arrivals)
        self.profiles.append(profile)

    def profile(self) -> dict:
        """Each profile figure averaged over the rounds (counts summed)."""
        keys = self.profiles[0] if self.profiles else {}
        merged = {}
        for key in keys:
            values = [profile[key] for profile in self.profiles]
            merged[key] = sum(values) if key in ("steps", "batches") else round(sum(values) / len(values), 3)
        return merged


def summarise(contestant: Contestant, rate: float, measured: Measured) -> dict:
    """One result row: latency percentiles, throughput, accuracy and mean exit layer."""
    latencies, count = measured.latencies_ms, len(measured.exit_layers)
    return {
        "scheduler": contestant.scheduler,
        "policy": contestant.policy,
        "rate": round(rate, 3),
        "max_batch_delay_ms": contestant.max_batch_delay_ms,
        **({"cohort_threads": contestant.cohort_threads} if contestant.cohort_threads is not None else {}),
        "requests": count,
        "p50_ms": round(percentile(latencies, 0.50), 2),
        "p95_ms": round(percentile(latencies, 0.95), 2),
        "p99_ms": round(percentile(latencies, 0.99), 2),
        "throughput": round(count / measured.seconds, 2) if measured.seconds > 0 else None,
        "accuracy": round(measured.correct / count, 4),
        "avg_exit_layer": round(sum(measured.exit_layers) / count, 3),
        "profile": measured.profile(),
    }


def parse_rates(spec: str, capacity: float) -> list[float]:
    """`R[,R...]`: requests/s, or a fraction of the full-depth capacity written like `0.75x`."""
    rates = []
    for part in spec.split(","):
        part = part.strip()
        try:
            rate = float(part[:-1]) * capacity if part.endswith("x") else float(part)
        except ValueError:
            raise ValueError(
                f"--arrival-rate: '{part}' is neither requests/s nor a fraction like 0.75x"
            ) from None
        if not rate > 0 or math.isinf(rate):
            raise ValueError(f"--arrival-rate: '{part}' must be a positive, finite rate")
        rates.append(rate)
    return rates


class OpenLoopBench:
    """Every contestant at every rate on the same arrivals and sentences (see the module docstring)."""

    def __init__(
        self,
        model: EarlyExitModel,
        examples: list[Example],
        policy: Policy,
        batch_size: int = 8,
        delays_ms: tuple[float, ...] = DEFAULT_DELAYS_MS,
        limits: SchedulerLimits | None = None,
        requests: int = 400,
        seed: int = 0,
        stock_model: EarlyExitModel | None = None,
        rounds: int = 4,
    ):
        if not examples:
            raise ValueError("the open-loop benchmark needs at least one example")
        self.model, self.examples, self.policy = model.eval(), examples, policy
        self.batch_size, self.delays_ms, self.requests, self.seed = batch_size, delays_ms, requests, seed
        self.limits = limits or SchedulerLimits()
        self.runners = {
            STOCK: batch_runner((stock_model or model).eval(), None),
            "full": batch_runner(model, make_policy("full")),
            policy.name: batch_runner(model, policy),
        }
        self.rounds = max(1, min(rounds, requests))

    def contestants(self) -> list[Contestant]:
        batch = [Contestant("batch", name, delay) for name in self.runners for delay in self.delays_ms]
        return [*batch, Contestant("continuous", self.policy.name)]

    def workload(self, rate: float, requests: int, round_number: int = 0) -> Workload:
        """`requests` sentences from the data in order (a round starts where the previous one stopped) and
        seeded Poisson arrivals: the same for every contestant."""
        start = round_number * requests
        chosen = [self.examples[(start + i) % len(self.examples)] for i in range(requests)]
        return Workload(chosen, poisson_arrivals(requests, rate, self.seed + round_number))

    def warm_up(self) -> None:
        """Untimed runs of every engine path (first calls allocate and pick kernels)."""
        workload = self.workload(math.inf, 2 * self.batch_size)
        for contestant in self.contestants()[:: len(self.delays_ms)]:
            self.serve(contestant, workload)
        self.serve(Contestant("continuous", self.policy.name), workload)

    def serve(self, contestant: Contestant, workload: Workload, profile: dict | None = None):
        if contestant.scheduler == "continuous":
            limits = self.limits
            if contestant.cohort_threads is not None:
                limits = replace(limits, cohort_threads=contestant.cohort_threads)
            return serve_continuously(workload, self.model, self.policy, limits, profile)
        run = self.runners[contestant.policy]
        return serve_batches(workload, run, self.batch_size, contestant.max_batch_delay_ms or 0.0, profile)

    def run_all(self, contestants: list[Contestant], rate: float, requests: int | None = None) -> list[dict]:
        """Every contestant on the same requests, taking turns: the requests are cut into `rounds` rounds and in
        each round every contestant serves that round's requests, the first turn rotating, so that a machine
        that speeds up or slows down during the benchmark does so for all of them alike."""
        requests = requests or self.requests
        per_round = max(requests // self.rounds, 1)
        measured = [Measured() for _ in contestants]
        for round_number in range(self.rounds):
            workload = self.workload(rate, per_round, round_number)
            for turn in range(len(contestants)):
                index = (round_number + turn) % len(contestants)
                profile: dict = {}
                done_at, answers = self.serve(contestants[index], workload, profile)
                measured[index].add(self.model, workload, done_at, answers, profile)
        return [summarise(contestant, rate, result) for contestant, result in zip(contestants, measured)]

    def run(self, contestant: Contestant, rate: float, requests: int | None = None) -> dict:
        return self.run_all([contestant], rate, requests)[0]

    def capacity(self) -> float:
        """Full depth's saturation throughput, batch-level with no delay: every request waiting at the start."""
        return self.run(Contestant("batch", "full", 0), math.inf)["throughput"]

    def slo_capacity(self, contestant: Contestant, slo_p95_ms: float, low: float, probes: int = 6) -> float:
        """The highest rate whose p95 meets the SLO, by bisection between `low`/2 and the first failing rate
        found by doubling (0 if even the lowest fails); `probes` runs of half the usual requests each way."""
        requests = max(self.requests // 2, 50)

        def meets(rate: float) -> bool:
            """p95 within the SLO, and the server kept up: a short run past capacity can still show a low p95
            while its queue grows, so its throughput must reach `KEEPS_UP` of the arrival rate too."""
            row = self.run(contestant, rate, requests)
            return row["p95_ms"] <= slo_p95_ms and (row["throughput"] or 0) >= KEEPS_UP * rate

        good, bad = 0.0, None
        rate = low
        for _ in range(probes):
            if meets(rate):
                good, rate = rate, rate * 2
            else:
                bad = rate
                break
        if bad is None:
            return round(good, 2)
        for _ in range(probes):
            middle = (good + bad) / 2 if good else bad / 2
            if meets(middle):
                good = middle
            else:
                bad = middle
        return round(good, 2)


def best_rows(rows: list[dict]) -> list[dict]:
    """Per scheduler, policy and rate the row with the lowest p95 (a batch contestant at its best delay)."""
    best: dict[tuple, dict] = {}
    for row in rows:
        key = (row["scheduler"], row["policy"], row["rate"])
        if key not in best or row["p95_ms"] < best[key]["p95_ms"]:
            best[key] = row
    return list(best.values())


def compare(best: list[dict], policy: str) -> list[dict]:
    """Per rate, the layer-level scheduler against the stock handler and batch-level EPEE, each at its best
    delay: the ratios the targets are stated in (below 1 is better)."""
    by_key = {(row["scheduler"], row["policy"], row["rate"]): row for row in best}
    comparisons = []
    for rate in sorted({row["rate"] for row in best}):
        layer = by_key.get(("continuous", policy, rate))
        stock = by_key.get(("batch", STOCK, rate))
        batch = by_key.get(("batch", policy, rate))
        if not (layer and stock and batch):
            continue
        comparisons.append({
            "rate": rate,
            "p50_vs_hf": round(layer["p50_ms"] / stock["p50_ms"], 3),
            "p95_vs_hf": round(layer["p95_ms"] / stock["p95_ms"], 3),
            "p95_vs_batch_epee": round(layer["p95_ms"] / batch["p95_ms"], 3),
            "hf_best_delay_ms": stock["max_batch_delay_ms"],
            "batch_best_delay_ms": batch["max_batch_delay_ms"],
        })  # fmt: skip
    return comparisons


def run_open_loop(
    bench: OpenLoopBench, rate_spec: str, slo_p95_ms: float, progress: Callable[[str], None] | None = None
) -> dict:
    """The whole benchmark: warm-up, full depth's capacity, every contestant at every rate, the best delay per
    batch contestant, the comparisons, each contestant's SLO capacity and the recommended serving settings."""
    say = progress or (lambda message: None)
    bench.warm_up()
    capacity = bench.capacity()
    rates = [round(rate, 3) for rate in parse_rates(rate_spec, capacity)]
    say(f"full-depth capacity {capacity:.1f} requests/s; rates {', '.join(f'{r:.1f}' for r in rates)}")
    rows = []
    for rate in rates:
        rows += bench.run_all(bench.contestants(), rate)
        for row in rows[-len(bench.contestants()) :]:
            say(
                f"{rate:7.1f}/s {row['scheduler']:10} {row['policy']:8} delay {row['max_batch_delay_ms']}: "
                f"p50 {row['p50_ms']} p95 {row['p95_ms']} ms"
            )
    best = best_rows(rows)
    top_rate = max(rates)
    slo_capacity = {}
    for row in best:
        if row["rate"] != top_rate:
            continue
        contestant = Contestant(row["scheduler"], row["policy"], row["max_batch_delay_ms"])
        name = f"{row['scheduler']}/{row['policy']}"
        slo_capacity[name] = {
            "max_batch_delay_ms": row["max_batch_delay_ms"],
            "rate": bench.slo_capacity(contestant, slo_p95_ms, low=min(rates)),
        }
        say(f"SLO capacity {name}: {slo_capacity[name]['rate']} requests/s")
    return {
        "capacity": round(capacity, 2),
        "rates": [round(rate, 3) for rate in rates],
        "batch_size": bench.batch_size,
        "limits": vars(bench.limits),
        "requests_per_run": bench.requests,
        "rounds": bench.rounds,
        "slo_p95_ms": slo_p95_ms,
        "results": rows,
        "best": best,
        "comparisons": compare(best, bench.policy.name),
        "slo_capacity": slo_capacity,
        "recommended": recommend(best, bench.policy.name, top_rate),
    }


def recommend(best: list[dict], policy: str, rate: float) -> dict:
    """The serving settings for the calibrated policy with the lowest p95 at the highest rate measured."""
    candidates = [row for row in best if row["policy"] == policy and row["rate"] == rate]
    choice = min(candidates, key=lambda row: row["p95_ms"])
    return {"scheduler": choice["scheduler"], "max_batch_delay_ms": choice["max_batch_delay_ms"] or 0}


def render_markdown(report: dict) -> str:
    """The best row per contestant and rate, the comparisons and the SLO capacities as markdown tables."""
    lines = [
        f"Open-loop Poisson arrivals, {report['requests_per_run']} requests per run, batch size "
        f"{report['batch_size']}; full-depth capacity {report['capacity']} requests/s.",
        "",
        "| rate (req/s) | scheduler | policy | best delay (ms) | p50 ms | p95 ms | p99 ms | throughput | accuracy | "
        "avg exit layer |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(report["best"], key=lambda r: (r["rate"], r["scheduler"], r["policy"])):
        delay = "–" if row["max_batch_delay_ms"] is None else row["max_batch_delay_ms"]
        lines.append(
            f"| {row['rate']} | {row['scheduler']} | {row['policy']} | {delay} | {row['p50_ms']} | "
            f"{row['p95_ms']} | {row['p99_ms']} | {row['throughput']} | {row['accuracy']} | "
            f"{row['avg_exit_layer']} |"
        )
    lines += [
        "",
        "| rate | layer-level p50 / hf | p95 / hf | p95 / batch-level policy |",
        "|---|---|---|---|",
    ]
    for item in report["comparisons"]:
        lines.append(
            f"| {item['rate']} | {item['p50_vs_hf']} | {item['p95_vs_hf']} | {item['p95_vs_batch_epee']} |"
        )
    lines += ["", f"| contestant | SLO capacity (p95 ≤ {report['slo_p95_ms']} ms), req/s |", "|---|---|"]
    for name, item in report["slo_capacity"].items():
        lines.append(f"| {name} | {item['rate']} |")
    return "\n".join(lines) + "\n"


def plot_latency(report: dict, path) -> None:
    """p50 and p95 against arrival rate, one line per contestant at its best delay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    lines: dict[str, list[dict]] = {}
    for row in report["best"]:
        lines.setdefault(f"{row['scheduler']}/{row['policy']}", []).append(row)
    for name, rows in sorted(lines.items()):
        rows.sort(key=lambda row: row["rate"])
        for axis, key in zip(axes, ("p50_ms", "p95_ms")):
            axis.plot([row["rate"] for row in rows], [row[key] for row in rows], marker="o", label=name)
    for axis, key in zip(axes, ("p50", "p95")):
        axis.set_xlabel("arrival rate (requests/s)")
        axis.set_ylabel(f"{key} latency (ms)")
        axis.grid(alpha=0.3)
    axes[1].axhline(report["slo_p95_ms"], color="grey", linestyle="--", linewidth=1, label="SLO p95")
    axes[1].legend(fontsize=8)
    figure.suptitle("Latency under open-loop load (best batch delay per contestant)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
