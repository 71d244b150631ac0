"""Request bodies drawn from the real data sets (data/, from `epee data convert`: docs/data.md): nothing here talks to a server.

- short clinical sentences: ADE corpus sentences (`ade/dev.jsonl`) → `{"text": ...}`
- long clinical notes: MTSamples transcriptions (`mtsamples/notes.jsonl`, median ~400 words) → `{"text": ...}`
- relation pairs: DDI 2013 (`ddi/dev.jsonl`) → `{"text", "head", "tail"}`
- images: PneumoniaMNIST chest X-rays (`pneumoniamnist/pneumoniamnist.npz`, 28×28 grey) → PNG bytes
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

DATA_FILES = {
    "short": "ade/dev.jsonl",
    "long": "mtsamples/notes.jsonl",
    "relation": "ddi/dev.jsonl",
    "image": "pneumoniamnist/pneumoniamnist.npz",
}
IMAGE_SPLITS = ("test_images", "val_images")  # the evaluation split, as `epee evaluate` reads it


def data_file(data_dir: str | Path, kind: str) -> Path:
    """The file a payload kind is read from; a clear error when it is missing."""
    path = Path(data_dir) / DATA_FILES[kind]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file for '{kind}' payloads not found (set --data-dir)")
    return path


def _jsonl(path: Path, limit: int) -> list[dict]:
    records = []
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                records.append(json.loads(line))
            if len(records) >= limit:
                break
    return records


def text_payloads(path: str | Path, limit: int = 500) -> list[dict]:
    """`{"text": ...}` bodies from a JSONL file of records with a `text` field."""
    return [
        {"text": record["text"]} for record in _jsonl(Path(path), limit) if record.get("text", "").strip()
    ]


def relation_payloads(path: str | Path, limit: int = 500) -> list[dict]:
    """`{"text", "head", "tail"}` bodies from a relation-extraction JSONL file (the gold relation is dropped)."""
    return [
        {"text": record["text"], "head": record["head"], "tail": record["tail"]}
        for record in _jsonl(Path(path), limit)
    ]


def png_payloads(path: str | Path, limit: int = 200) -> list[bytes]:
    """PNG-encoded grey images from a MedMNIST `.npz` (test split if present, else val)."""
    import numpy as np
    from PIL import Image

    with np.load(path) as arrays:
        split = next((name for name in IMAGE_SPLITS if name in arrays.files), None)
        if split is None:
            raise KeyError(f"{path}: no {' or '.join(IMAGE_SPLITS)} array")
        images = arrays[split][:limit]
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image.astype("uint8")).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return encoded


def oip_request(payload: dict | bytes, policy: str = "") -> dict[str, Any]:
    """The Open Inference Protocol v2 body of one plain payload (for `epee serve`, KServe): one BYTES row per
    field (`text`, `head`, `tail`), or the PNG base64-encoded as `image`; a policy override as a parameter."""
    fields = {"image": base64.b64encode(payload).decode()} if isinstance(payload, bytes) else payload
    body: dict[str, Any] = {
        "inputs": [
            {"name": name, "datatype": "BYTES", "shape": [1], "data": [value]}
            for name, value in fields.items()
        ]
    }
    if policy:
        body["parameters"] = {"policy": policy}
    return body
