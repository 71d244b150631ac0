"""`epee data convert`: turn a public corpus's published files into our JSON Lines / `.npz` (docs/data.md)."""

from __future__ import annotations

from .common import emit

SOURCES = ("ade", "ddi", "chemprot", "medmnist")


def add_data(commands) -> None:
    parser = commands.add_parser(
        "data", help="convert public data sets from their published files (no download)"
    )
    actions = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION", help="what to do")
    convert = actions.add_parser(
        "convert",
        help="convert one source's published files into train.jsonl / dev.jsonl (or a MedMNIST .npz)",
        description="Sources and where each is published: docs/data.md.",
    )
    convert.add_argument(
        "source_name",
        choices=SOURCES,
        metavar="SOURCE",
        help="ade (DRUG-AE.rel + ADE-NEG.txt), ddi (DDI 2013 XML), chemprot (BioCreative VI TSV files), "
        "medmnist (.npz or an image folder)",
    )
    convert.add_argument("src", metavar="SRC", help="the folder (or file) holding the published files")
    convert.add_argument(
        "--output", required=True, help="folder to write train.jsonl and dev.jsonl (or the .npz) to"
    )
    convert.add_argument(
        "--dev-fraction",
        type=float,
        help="share of documents drawn for dev.jsonl, ade and ddi only (default: ade 0.1, ddi 0.2)",
    )
    convert.add_argument("--seed", type=int, help="seed of the ade / ddi document draw (default 0)")
    convert.add_argument("--json", action="store_true", help="print one JSON object")
    convert.set_defaults(run=run_convert)


def _render(record: dict) -> str:
    rows = ", ".join(f"{split} {count}" for split, count in record["rows"].items())
    left_out = {key: value for key, value in record.items() if key.startswith("skipped")}
    note = "".join(f"; {key.replace('_', ' ')}: {value}" for key, value in left_out.items())
    return f"{record['source']}: wrote {record['output']} ({rows}{note})"


def run_convert(args) -> None:
    from ..data.convert import convert

    record = convert(args.source_name, args.src, args.output, dev_fraction=args.dev_fraction, seed=args.seed)
    record["output"] = record.pop("file", args.output)
    emit(record, args.json, _render)
