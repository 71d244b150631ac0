"""`epee recertify`: Learn-then-Test again, on the rows a serving worker audited (docs/monitoring.md, "The loop").

An audit record (serving/audit.py) holds an audited row's logits at every exit and its token count: exactly a
column of the calibration cache. The records become a `LogitCache`, labelled by full depth (consistency, no labels
needed) or by the site's labels joined on request id (accuracy), and `calibrate` certifies a setting on them as
`epee calibrate` does on dev data. The new model YAML keeps every key of the old one but the policy and the
guarantee, so it packages and rolls out like the old one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..engine.gate import ExitGate
from ..engine.model import SPEC_FILE
from ..engine.policies import ALL_PARAM_KEYS, Policy
from ..engine.spec import ConfigError, ModelSpec, read_yaml
from ..serving.audit import RECORD_FORMAT
from ..serving.config import EPEE_SECTION, ServeConfig
from .cache import LogitCache
from .model_yaml import policy_entries, write_model_yaml
from .sweep import CalibrationOptions, CalibrationResult, calibrate, describe_guarantee


@dataclass
class AuditRows:
    """The audit records as calibration reads them: logits [L, N, C], lengths [N], and each row's key."""

    logits: torch.Tensor
    lengths: torch.Tensor
    keys: list[tuple[str | None, int]]  # (request id, row in the request)


def read_audit_records(path: str | Path, spec: ModelSpec) -> AuditRows:
    """The records of an audit file, checked against the model's layers and outputs (each line named)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: audit records not found")
    logits, lengths, keys = [], [], []
    shape = (spec.num_layers, len(spec.labels))
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            row_logits = torch.tensor(record["logits"], dtype=torch.float32)
            valid = record.get("format") == RECORD_FORMAT and tuple(row_logits.shape) == shape
            length = float(record["length"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise ConfigError(
                f"{path}:{number}: not an audit record ({RECORD_FORMAT}) with logits of {shape[0]} layers × "
                f"{shape[1]} outputs (the model's)"
            )
        logits.append(row_logits)
        lengths.append(length)
        keys.append((record.get("request_id"), int(record.get("row", 0))))
    if not logits:
        raise ConfigError(f"{path}: no audit records")
    return AuditRows(torch.stack(logits, dim=1), torch.tensor(lengths), keys)


def read_labels(path: str | Path, spec: ModelSpec) -> dict[tuple[str, int], Any]:
    """Labels a site has for audited requests: JSONL `{"request_id", "label"}` (`"labels": [...]` for
    multi-label; `"row"` for a row of a multi-row request), a label given by name or index."""
    path, labels = Path(path), {}
    if not path.is_file():
        raise ConfigError(f"{path}: labels file not found")
    field = "labels" if spec.multi_label else "label"
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            value = record[field]
            names = value if spec.multi_label else [value]
            indices = [
                spec.labels.index(str(name)) if str(name) in spec.labels else int(name) for name in names
            ]
            if not all(0 <= index < len(spec.labels) for index in indices):
                raise ValueError
            labels[(str(record["request_id"]), int(record.get("row", 0)))] = indices
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise ConfigError(
                f'{path}:{number}: expected {{"request_id": ..., "{field}": ...}} with labels of '
                f"{', '.join(spec.labels)}"
            ) from None
    return labels


def audit_cache(rows: AuditRows, spec: ModelSpec, labels: dict[tuple[str, int], Any] | None) -> LogitCache:
    """The records as a calibration cache: with `labels`, only the labelled rows, labelled; else every row,
    labelled by full depth."""
    cache = LogitCache(rows.logits, torch.zeros(rows.logits.shape[1]).long(), lengths=rows.lengths)
    if labels is None:
        return cache.labelled_by_full_depth(spec.multi_label)
    keep = [index for index, key in enumerate(rows.keys) if (str(key[0]), key[1]) in labels]
    if not keep:
        raise ConfigError("no audit record has a label: the labels file's request ids match none")
    gold = [labels[(str(rows.keys[index][0]), rows.keys[index][1])] for index in keep]
    if spec.multi_label:
        target = torch.zeros(len(keep), len(spec.labels))
        for row, indices in enumerate(gold):
            target[row, indices] = 1.0
    else:
        target = torch.tensor([indices[0] for indices in gold]).long()
    return LogitCache(rows.logits[:, keep], target, lengths=rows.lengths[keep])


def recertified_yaml(old: dict[str, Any], policy: Policy, guarantee: dict[str, Any]) -> dict[str, Any]:
    """The old model YAML with the new policy and guarantee in its `epee:` section, everything else kept."""
    section = {
        key: value
        for key, value in (old.get(EPEE_SECTION) or {}).items()
        if key not in ALL_PARAM_KEYS and key not in ("policy", "guarantee")
    }
    section = {"policy": policy.name, **policy_entries(policy), **section, "guarantee": dict(guarantee)}
    config = {**old, EPEE_SECTION: section}
    ServeConfig.from_model_yaml(config, source="recertified model YAML")
    return config


def recertify(
    model_dir: str | Path,
    config_path: str | Path,
    records_path: str | Path,
    output: str | Path,
    labels_path: str | Path | None = None,
    options: CalibrationOptions | None = None,
) -> tuple[CalibrationResult, dict[str, Any]]:
    """Certify a setting on the audit records and write the new model YAML; returns the result and the YAML.
    `options` default: consistency at the default budget (the CLI passes the old guarantee's epsilon and delta)."""
    spec = ModelSpec.load(Path(model_dir) / SPEC_FILE)
    old = read_yaml(config_path)
    serve = ServeConfig.from_model_yaml(old, str(config_path))
    serve.check_model(spec, str(config_path))
    options = options or CalibrationOptions(held_back_fraction=0.6, guarantee="consistency")
    if options.guarantee == "accuracy" and labels_path is None:
        raise ConfigError("--guarantee accuracy needs --labels: audit records carry no labels")
    labels = read_labels(labels_path, spec) if labels_path is not None else None
    cache = audit_cache(read_audit_records(records_path, spec), spec, labels)
    result = calibrate(cache, spec, options, gate=ExitGate.load(model_dir))
    config = recertified_yaml(old, result.chosen.policy, result.guarantee)
    certified = bool(result.certificate and result.certificate["certified"])
    write_model_yaml(
        output,
        config,
        [
            f"written by `epee recertify` from {config_path} on {cache.num_samples} audited rows of {records_path}",
            f"chosen {result.chosen.policy.describe()}: {result.choice.reason}",
            f"guarantee: {describe_guarantee(result.guarantee, certified)}",
        ],
    )
    return result, config
