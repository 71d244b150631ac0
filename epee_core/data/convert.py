"""Converters from each public corpus's published files to our formats (`epee data convert`, docs/data.md).

Each converter reads files the user has obtained from the publisher and writes `train.jsonl` / `dev.jsonl` (or a
MedMNIST `.npz`) into an output folder. Nothing is downloaded. Splits are deterministic: the publisher's own
training / development files where there are some, otherwise whole documents drawn with a seed.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from ..engine.spec import ConfigError

# ChemProt's evaluated CPR groups and the one label each becomes in our multi-label set (docs/data.md).
CHEMPROT_GROUP_LABELS = {
    "CPR:3": "ACTIVATOR",  # upregulator, activator, indirect upregulator
    "CPR:4": "DOWNREGULATOR",  # downregulator, inhibitor, indirect downregulator
    "CPR:5": "AGONIST",  # agonist, agonist-activator, agonist-inhibitor
    "CPR:6": "ANTAGONIST",
    "CPR:9": "PRODUCT-OF",  # substrate, product of, substrate-product of
}

# DDI 2013 marks a pair without interaction `ddi="false"`; our relation set calls it "None".
DDI_NO_RELATION = "None"

# A sentence ends at . ! or ? followed by white space and an upper-case letter, digit or bracket.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])")


def _write_jsonl(rows: Iterable[dict], path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def _required_file(folder: Path, name: str) -> Path:
    """`folder/name`, or the first file called `name` below it; a ConfigError naming both when there is none."""
    direct = folder / name
    if direct.is_file():
        return direct
    found = sorted(folder.rglob(name)) if folder.is_dir() else []
    if not found:
        raise ConfigError(f"{folder}: no file {name} in it or below it")
    return found[0]


def _records(path: Path, split: Callable[[str], list[str]], min_fields: int, expected: str):
    """(line number, fields) of every non-blank line of a published text file, split by `split`; a ConfigError
    naming the file, the line and the `expected` layout for a line with fewer than `min_fields` fields."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        fields = split(line)
        if len(fields) < min_fields:
            raise ConfigError(f"{path}:{number}: expected {expected}, got {line[:60]!r}")
        yield number, fields


def _tab_fields(line: str) -> list[str]:
    return line.split("\t")


def split_documents(doc_ids: Iterable[str], dev_fraction: float, seed: int) -> set[str]:
    """The documents that go to dev: a seeded draw of `dev_fraction` of the distinct ids (at least one)."""
    if not 0.0 < dev_fraction < 1.0:
        raise ConfigError(f"--dev-fraction must be between 0 and 1 (exclusive), got {dev_fraction}")
    ordered = sorted(set(doc_ids))
    random.Random(seed).shuffle(ordered)
    return set(ordered[: max(1, round(len(ordered) * dev_fraction))])


def _write_split(
    rows_by_doc: list[tuple[str, dict]], output: Path, dev_fraction: float, seed: int
) -> dict[str, int]:
    dev_docs = split_documents((doc for doc, _ in rows_by_doc), dev_fraction, seed)
    return {
        "train": _write_jsonl(
            (row for doc, row in rows_by_doc if doc not in dev_docs), output / "train.jsonl"
        ),
        "dev": _write_jsonl((row for doc, row in rows_by_doc if doc in dev_docs), output / "dev.jsonl"),
    }


def convert_ade(source: Path, output: Path, dev_fraction: float = 0.1, seed: int = 0) -> dict:
    """ADE-Corpus-V2 `DRUG-AE.rel` (label 1) and `ADE-NEG.txt` (label 0) as `{"text", "label"}` rows.

    A sentence listed several times (one line per drug / effect pair) is written once; one listed as both positive
    and negative counts as positive. Whole abstracts (PMIDs) go to dev.
    """
    label_by_text: dict[str, int] = {}
    doc_by_text: dict[str, str] = {}
    positives = _required_file(source, "DRUG-AE.rel")
    for _, fields in _records(positives, lambda line: line.split("|"), 3, "PMID|sentence|effect|..."):
        pmid, text = fields[0].strip(), fields[1].strip()
        label_by_text[text] = 1
        doc_by_text.setdefault(text, pmid)
    negatives = _required_file(source, "ADE-NEG.txt")
    for number, fields in _records(negatives, lambda line: line.split(maxsplit=2), 3, "'PMID NEG sentence'"):
        if fields[1] != "NEG":
            raise ConfigError(f"{negatives}:{number}: expected 'PMID NEG sentence', got {fields[1]!r}")
        pmid, text = fields[0], fields[2].strip()
        label_by_text.setdefault(text, 0)
        doc_by_text.setdefault(text, pmid)
    rows = [(doc_by_text[text], {"text": text, "label": label}) for text, label in label_by_text.items()]
    return {"source": "ade", "rows": _write_split(rows, output, dev_fraction, seed)}


def _ddi_pairs(path: Path) -> tuple[list[tuple[str, dict]], int]:
    """One DDI 2013 XML document's pairs as (document id, row), and how many pairs were left out."""
    try:
        document = ET.parse(path).getroot()
    except ET.ParseError as error:
        raise ConfigError(f"{path}: not valid XML ({error})") from error
    doc_id = document.get("id", path.stem)
    rows, skipped = [], 0
    for sentence in document.iter("sentence"):
        text = sentence.get("text", "")
        entity_text = {entity.get("id"): entity.get("text", "") for entity in sentence.iter("entity")}
        for pair in sentence.iter("pair"):
            head, tail = entity_text.get(pair.get("e1"), ""), entity_text.get(pair.get("e2"), "")
            if not head or not tail or head not in text or tail not in text:
                skipped += 1  # a discontinuous entity's text does not occur in the sentence as written
                continue
            relation = pair.get("type") if pair.get("ddi") == "true" else DDI_NO_RELATION
            if not relation:
                raise ConfigError(f'{path}: pair {pair.get("id")} has ddi="true" but no type')
            rows.append((doc_id, {"text": text, "head": head, "tail": tail, "relation": relation}))
    return rows, skipped


def convert_ddi(source: Path, output: Path, dev_fraction: float = 0.2, seed: int = 0) -> dict:
    """DDI 2013 XML files (every `*.xml` in `source`, e.g. DDICorpus/Train) as relation rows, one per pair.

    `ddi="false"` pairs get relation "None"; a pair whose entity text does not occur in the sentence (a
    discontinuous mention) is left out and counted. Whole documents go to dev.
    """
    files = [source] if source.is_file() else sorted(source.rglob("*.xml"))
    if not files:
        raise ConfigError(f"{source}: no DDI 2013 .xml files in it or below it")
    rows, skipped = [], 0
    for path in files:
        file_rows, file_skipped = _ddi_pairs(path)
        rows += file_rows
        skipped += file_skipped
    return {
        "source": "ddi",
        "rows": _write_split(rows, output, dev_fraction, seed),
        "skipped_pairs": skipped,
    }


def split_sentences(text: str, start: int) -> list[tuple[int, int, str]]:
    """`text`'s sentences as (start, end, sentence), offsets counted from `start`."""
    spans, begin = [], 0
    for boundary in _SENTENCE_END.finditer(text):
        spans.append((begin, boundary.start()))
        begin = boundary.end()
    spans.append((begin, len(text)))
    return [(start + b, start + e, text[b:e].strip()) for b, e in spans if text[b:e].strip()]


def _chemprot_split(folder: Path, split: str) -> tuple[list[dict], int]:
    """One ChemProt split's sentences that state at least one evaluated relation, and the relations left out."""
    abstracts = _required_file(folder, f"chemprot_{split}_abstracts.tsv")
    entities = _required_file(folder, f"chemprot_{split}_entities.tsv")
    gold = _required_file(folder, f"chemprot_{split}_gold_standard.tsv")
    sentences: dict[str, list[tuple[int, int, str]]] = {}
    for line in abstracts.read_text(encoding="utf-8").splitlines():
        if line.strip():
            pmid, title, abstract = (line.split("\t") + ["", ""])[:3]
            # Entity offsets count the title, one separator, then the abstract.
            sentences[pmid] = split_sentences(title, 0) + split_sentences(abstract, len(title) + 1)
    spans: dict[tuple[str, str], tuple[int, int]] = {}
    for _, fields in _records(entities, _tab_fields, 5, "PMID, id, type, start, end, text"):
        spans[fields[0], fields[1]] = (int(fields[3]), int(fields[4]))
    labels: dict[tuple[str, int], set[str]] = {}
    skipped = 0
    for _, fields in _records(gold, _tab_fields, 4, "PMID, CPR group, Arg1:T.., Arg2:T.."):
        pmid, group = fields[0], fields[1]
        args = [spans.get((pmid, field.split(":", 1)[-1])) for field in fields[2:4]]
        label = CHEMPROT_GROUP_LABELS.get(group)
        found = [
            index
            for index, (begin, end, _) in enumerate(sentences.get(pmid, []))
            if all(arg and begin <= arg[0] and arg[1] <= end for arg in args)
        ]
        if label is None or not found:
            skipped += 1  # a group we do not label, or arguments in two sentences
            continue
        labels.setdefault((pmid, found[0]), set()).add(label)
    rows = [
        {"text": sentences[pmid][index][2], "labels": sorted(names)}
        for (pmid, index), names in sorted(labels.items())
    ]
    return rows, skipped


def convert_chemprot(source: Path, output: Path) -> dict:
    """ChemProt (BioCreative VI) training / development TSV files as multi-label sentence rows.

    A sentence gets the label of every gold-standard relation whose two entities lie inside it
    (`CHEMPROT_GROUP_LABELS`); sentences without one are not written. The test split is kept back.
    """
    counts, skipped = {}, 0
    for split, name in (("training", "train"), ("development", "dev")):
        rows, split_skipped = _chemprot_split(source, split)
        counts[name] = _write_jsonl(rows, output / f"{name}.jsonl")
        skipped += split_skipped
    return {"source": "chemprot", "rows": counts, "skipped_relations": skipped}


MEDMNIST_SPLITS = ("train", "val", "test")
MEDMNIST_REQUIRED = ("train", "val")


def check_medmnist(arrays: dict[str, np.ndarray], where: str) -> dict[str, int]:
    """Rows per split of MedMNIST arrays; a ConfigError naming the key for a missing key, bad dtype or shape."""
    counts = {}
    for split in MEDMNIST_SPLITS:
        images_key, labels_key = f"{split}_images", f"{split}_labels"
        if images_key not in arrays and split not in MEDMNIST_REQUIRED:
            continue
        for key in (images_key, labels_key):
            if key not in arrays:
                raise ConfigError(f"{where}: missing array '{key}' (MedMNIST keys: train_*, val_*, test_*)")
        images, labels = arrays[images_key], arrays[labels_key]
        grey_or_rgb = images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)
        if images.dtype != np.uint8 or not grey_or_rgb:
            raise ConfigError(
                f"{where}: '{images_key}' must be uint8 (N, H, W) or (N, H, W, 3), "
                f"got {images.dtype} {images.shape}"
            )
        if labels.shape[0] != images.shape[0] or labels.ndim not in (1, 2):
            raise ConfigError(
                f"{where}: '{labels_key}' must be (N,) or (N, 1) with N = {images.shape[0]}, got {labels.shape}"
            )
        counts[split] = int(images.shape[0])
    return counts


def _folder_arrays(source: Path) -> dict[str, np.ndarray]:
    """An image folder `source/{train,val,test}/<integer label>/*` as MedMNIST arrays."""
    from PIL import Image

    arrays = {}
    for split in MEDMNIST_SPLITS:
        split_dir = source / split
        if not split_dir.is_dir():
            continue
        images, labels = [], []
        for class_dir in sorted(path for path in split_dir.iterdir() if path.is_dir()):
            if not class_dir.name.isdigit():
                raise ConfigError(f"{class_dir}: class folders must be named by their integer label")
            for image_path in sorted(path for path in class_dir.iterdir() if path.is_file()):
                with Image.open(image_path) as image:
                    images.append(np.asarray(image.convert("L" if image.mode in ("L", "1", "P") else "RGB")))
                labels.append(int(class_dir.name))
        if len({image.shape for image in images}) > 1:
            raise ConfigError(f"{split_dir}: images differ in size; MedMNIST needs one size")
        arrays[f"{split}_images"] = np.stack(images).astype(np.uint8)
        arrays[f"{split}_labels"] = np.asarray(labels, dtype=np.int64)[:, None]
    return arrays


def convert_medmnist(source: Path, output: Path) -> dict:
    """A MedMNIST `.npz` (checked, then copied) or an image folder (train/ val/ test/ of class folders) as `.npz`."""
    if source.is_file():
        with np.load(source) as npz:
            counts = check_medmnist(dict(npz), str(source))
        target = output / source.name
        output.mkdir(parents=True, exist_ok=True)
        if source.resolve() != target.resolve():
            shutil.copyfile(source, target)
    elif source.is_dir():
        arrays = _folder_arrays(source)
        counts = check_medmnist(arrays, str(source))
        target = output / f"{source.name}.npz"
        output.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(target, **arrays)
    else:
        raise ConfigError(f"{source}: no such file or folder")
    return {"source": "medmnist", "rows": counts, "file": str(target)}


CONVERTERS: dict[str, Callable[..., dict]] = {
    "ade": convert_ade,
    "ddi": convert_ddi,
    "chemprot": convert_chemprot,
    "medmnist": convert_medmnist,
}

# Sources whose split is drawn with a seed (the others follow the publisher's own split files).
SEEDED_SPLIT_SOURCES = ("ade", "ddi")


def convert(source_name: str, source: str | Path, output: str | Path, **split_options) -> dict:
    """Run the converter for `source_name` (a key of CONVERTERS) from `source` into the folder `output`."""
    if source_name not in CONVERTERS:
        raise ConfigError(f"unknown source {source_name!r}: expected one of {', '.join(CONVERTERS)}")
    source, output = Path(source), Path(output)
    if not source.exists():
        raise ConfigError(f"{source}: no such file or folder")
    options = split_options if source_name in SEEDED_SPLIT_SOURCES else {}
    return CONVERTERS[source_name](source, output, **{k: v for k, v in options.items() if v is not None})
