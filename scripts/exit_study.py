"""The exit-quality study of docs/training.md: training variants of one backbone on one data set's whole training
split, each scored the way the results report scores a run (certified layers saved and × hf on the held-back half
of dev at a 1-point budget, float32 and int8; docs/results.md).

    python scripts/exit_study.py --data DATA --models DIR [--dataset ade] [--backbone minilm]
        [--variants baseline,distill-0.5,...] [--train-threads 2] [--threads 1] [--json]

Each variant is `epee train` with the backbone's recipe plus the flags in VARIANTS, then `certify_and_measure`
from epee_core/measure/results.py (three calibrations on the calibration half, the side-by-side timing on the
held-out half). Resumable: a variant whose model directory holds `epee.yaml` is not retrained, and one whose
`report/measurement.json` exists is not measured again. Prints a Markdown table (and `--json`, every number).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import torch  # noqa: E402

from epee_core.data.catalogue import DATASETS  # noqa: E402
from epee_core.engine.model import SPEC_FILE  # noqa: E402
from epee_core.measure.results import (  # noqa: E402
    MEASUREMENT_FILE,
    REPORT_DIR,
    certify_and_measure,
    log,
    train_config,
    training_record,
)
from epee_core.training.trainer import train  # noqa: E402

# name -> the TrainConfig fields it sets on top of the backbone's recipe (`flags` spells them as `epee train` flags)
VARIANTS = {
    "baseline": {"distill_weight": 0.0},  # the recipe before distillation
    "distill-0.5": {"distill_weight": 0.5},  # MiniLM's recipe
    "distill-1.0": {"distill_weight": 1.0},
    "uniform-distill-0.5": {"layer_weights": "uniform", "distill_weight": 0.5},
    "late-heavy": {"layer_weights": "1,1,1,1,2,4"},
    "two-stage-distill-0.5": {"two_stage": True, "distill_weight": 0.5},
    "distill-0.5-seed-1": {"distill_weight": 0.5, "seed": 1},  # the recipe again, another seed
    # MiniLM's own three epochs (the results report trains ADE for one)
    "distill-0.5-3-epochs": {"distill_weight": 0.5, "epochs": 3},
    "uniform-distill-0.5-3-epochs": {"layer_weights": "uniform", "distill_weight": 0.5, "epochs": 3},
    "distill-1.0-3-epochs": {"distill_weight": 1.0, "epochs": 3},
    "distill-0.5-t1": {"distill_weight": 0.5, "distill_temperature": 1.0},  # the recipe at other temperatures
    "distill-0.5-t4": {"distill_weight": 0.5, "distill_temperature": 4.0},
    # certainty ranking (CascadeBERT's difficulty-aware objective) on top of the recipe
    "rank-1": {"distill_weight": 0.5, "rank_weight": 1.0},
    "rank-4-margin-0.5": {"distill_weight": 0.5, "rank_weight": 4.0, "rank_margin": 0.5},
}


def flags(fields: dict) -> str:
    """The `epee train` flags that set `fields` (a True switch is the bare flag)."""
    words = []
    for field, value in fields.items():
        words.append("--" + field.replace("_", "-"))
        if value is not True:
            words.append(f"{value:g}" if isinstance(value, float) else str(value))
    return " ".join(words)


def run_variant(name: str, args: argparse.Namespace) -> dict:
    """Train (unless done) and certify + measure (unless done) one variant."""
    fields = VARIANTS[name]
    dataset, model_dir = DATASETS[args.dataset], Path(args.models) / name
    if not (model_dir / SPEC_FILE).is_file():
        config = train_config(args.backbone, dataset, Path(args.data), model_dir, True, args.train_threads)
        for field, value in fields.items():
            setattr(config, field, value)
        log(f"train {name}: {flags(fields)}")
        train(config)
    measurement_path = model_dir / REPORT_DIR / MEASUREMENT_FILE
    if measurement_path.is_file():
        measurement = json.loads(measurement_path.read_text(encoding="utf-8"))
    else:
        torch.set_num_threads(args.threads)
        measurement = certify_and_measure(model_dir, dataset, Path(args.data), args)
        measurement_path.write_text(json.dumps(measurement, indent=2), encoding="utf-8")
    return {"variant": name, "flags": flags(fields), **measurement, **training_record(model_dir)}


def table(runs: list[dict]) -> str:
    """One Markdown row per variant: full-depth accuracy, certified float32 / int8 layers and × hf, uncertified and
    oracle layers on the held-out half, training minutes."""
    head = (
        "| variant | flags | full-depth acc | certified: policy | avg exit | × hf | int8 certified: avg exit | × hf |"
        " uncertified avg exit | oracle avg exit | train min |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for run in runs:
        rows = run["rows"]
        full, certified, int8, uncertified = (
            rows[key] for key in ("full", "certified", "int8_certified", "uncertified")
        )
        certified_mark = "" if run["certificates"]["certified"]["certified"] else " (not certified)"
        int8_mark = "" if run["certificates"]["int8_certified"]["certified"] else " (not certified)"
        lines.append(
            f"| {run['variant']} | `{run['flags']}` | {full['accuracy']:.3f} | "
            f"{run['certificates']['certified']['policy']}{certified_mark} | {certified['avg_exit_layer']:.2f} | "
            f"{certified['speedup_vs_hf']:.2f} | {int8['avg_exit_layer']:.2f}{int8_mark} | "
            f"{int8['speedup_vs_hf']:.2f} | {uncertified['avg_exit_layer']:.2f} | "
            f"{rows['oracle']['avg_exit_layer']:.2f} | {run.get('train_seconds', 0) / 60:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="folder holding ade/, ddi/, … (epee data convert)")
    parser.add_argument("--models", required=True, help="one model directory per variant goes here")
    parser.add_argument("--dataset", default="ade", choices=sorted(DATASETS))
    parser.add_argument("--backbone", default="minilm")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    parser.add_argument("--train-threads", type=int, default=2, help="torch threads while training")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads while measuring (the report's 1)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="measurement batch size")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--json", action="store_true", help="print every number as one JSON object")
    args = parser.parse_args()
    args.skip_invalid = True
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]} (known: {', '.join(VARIANTS)})")
    runs = [run_variant(name, args) for name in names]
    print(json.dumps({"runs": runs}, indent=2) if args.json else table(runs))


if __name__ == "__main__":
    main()
