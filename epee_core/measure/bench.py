"""`epee bench`: policies side by side on the same inputs at several batch sizes, in process (no server).

Timing is `evaluate_policies` (policies take turns batch by batch after untimed warm-up batches) with torch pinned
to one thread count for every policy. Besides each policy's speed and accuracy the report gives four ratios per
batch size: throughput vs `hf` (the plain Hugging Face forward over the padded batch: what a stock TorchServe
handler runs), vs `full` (our runner at full depth), vs `oracle` (the earliest correct exit: the best any policy
could do with these exit heads), and the realised saving: the share of the theoretical time saving (layers
skipped) that turns into wall-clock time saved.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..engine.inputs import Example
from ..engine.model import EarlyExitModel
from ..engine.policies import Policy
from ..evaluation.evaluate import STOCK_BASELINE, WARMUP_BATCHES, evaluate_policies

DEFAULT_BATCH_SIZES = (1, 8, 32)
BASELINE_POLICIES = ("full", "patience", "entropy", "oracle")
METRIC_KEYS = ("accuracy", "macro_f1", "micro_f1", "example_f1")


def default_policy_names(config_policy: str = "epee") -> list[str]:
    """full, the model YAML's policy, PABEE, entropy (DeeBERT) and oracle, each once."""
    return list(dict.fromkeys(["full", config_policy, *BASELINE_POLICIES[1:]]))


def realised_saving(measured_speedup: float, layer_speedup: float) -> float | None:
    """Measured time saving (1 − 1/measured) over the theoretical one (1 − 1/layer): 1.0 means every skipped
    layer became saved time; None when the policy skips nothing (no saving to realise)."""
    theoretical = 1.0 - 1.0 / layer_speedup
    if theoretical < 1e-9:
        return None
    return (1.0 - 1.0 / measured_speedup) / theoretical


def add_ratios(rows: list[dict]) -> list[dict]:
    """Add `throughput_vs_hf`, `throughput_vs_full`, `throughput_vs_oracle` and `realised_saving` to the rows of
    one batch size (None where the reference was not run)."""
    by_name = {row["policy"]: row for row in rows}
    for row in rows:
        speed = row["samples_per_second"]
        for reference in (STOCK_BASELINE, "full", "oracle"):
            ratio = speed / by_name[reference]["samples_per_second"] if reference in by_name else None
            row[f"throughput_vs_{reference}"] = round(ratio, 4) if ratio is not None else None
        vs_full = row["throughput_vs_full"]
        saving = realised_saving(vs_full, row["layer_speedup"]) if vs_full is not None else None
        row["realised_saving"] = round(saving, 4) if saving is not None else None
    return rows


def run_bench(
    model: EarlyExitModel,
    examples: list[Example],
    policies: list[Policy],
    batch_sizes: list[int],
    num_threads: int | None = None,
    stock_model: EarlyExitModel | None = None,
) -> dict:
    """Every policy at every batch size on `examples` (side by side, taking turns), with the `hf` row timing
    `stock_model` (default: `model` itself); torch runs on `num_threads` threads (default: as now)."""
    names = [policy.name for policy in policies]
    if len(set(names)) != len(names):
        raise ValueError(f"each policy may be benched once, got {', '.join(names)}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads or previous_threads)
    try:
        results = []
        for batch_size in batch_sizes:
            rows = evaluate_policies(model, examples, policies, batch_size, stock_model or model)
            results += add_ratios(rows)
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous_threads)
    return {
        "num_samples": len(examples),
        "num_layers": model.num_layers,
        "num_threads": threads,
        "warmup_batches_per_policy": WARMUP_BATCHES,
        "torch_version": torch.__version__,
        "policies": [policy.describe() for policy in policies],
        "batch_sizes": list(batch_sizes),
        "results": results,
    }


def _cell(value) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def render_markdown(report: dict) -> str:
    """The report as markdown: one table per batch size."""
    metrics = [key for key in METRIC_KEYS if key in report["results"][0]]
    columns = [
        ("policy", "policy"),
        *[(key, key) for key in metrics],
        ("avg_exit_layer", "avg exit"),
        ("layer_speedup", "layer ×"),
        ("samples_per_second", "samples/s"),
        ("batch_ms_p50", "p50 ms/batch"),
        ("batch_ms_p95", "p95 ms/batch"),
        ("throughput_vs_hf", "× hf"),
        ("throughput_vs_full", "× full"),
        ("throughput_vs_oracle", "× oracle"),
        ("realised_saving", "realised saving"),
    ]
    lines = [
        f"# epee bench: {report.get('model', '')} on {report.get('data', '')}",
        "",
        f"{report['num_samples']} samples, {report['num_layers']} layers, {report['num_threads']} torch threads "
        f"(torch {report['torch_version']}), {report['warmup_batches_per_policy']} untimed warm-up batches per "
        "policy. Policies: " + ", ".join(f"`{name}`" for name in report["policies"]) + ".",
        "",
        "`× hf`, `× full` and `× oracle`: samples/s relative to those rows (`hf`: the plain Hugging Face forward "
        "over the padded batch, what a stock TorchServe handler runs). `realised saving`: measured time saving "
        "over the layer saving (1 − avg exit / layers); 1.0 = every skipped layer became saved time.",
    ]
    for batch_size in report["batch_sizes"]:
        rows = [row for row in report["results"] if row["batch_size"] == batch_size]
        lines += ["", f"## batch size {batch_size}", ""]
        lines.append("| " + " | ".join(header for _, header in columns) + " |")
        lines.append("|" + "|".join("---" for _ in columns) + "|")
        for row in rows:
            lines.append("| " + " | ".join(_cell(row.get(key)) for key, _ in columns) + " |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, output_dir: str | Path, stem: str) -> tuple[Path, Path]:
    """Write `stem.json` and `stem.md` into `output_dir`; returns both paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = output_dir / f"{stem}.json", output_dir / f"{stem}.md"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    markdown_path.write_text(render_markdown(report), encoding="utf-8")
    return json_path, markdown_path
