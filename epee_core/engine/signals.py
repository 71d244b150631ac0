"""Exit signals: what the rules of `policies.py` and the learned gate of `gate.py` read from one layer's exit.

Probabilities, normalised entropy, confidence, the divergence between consecutive layers, the prediction and how
long it has stayed the same, and the gate's feature vector. Pure functions of tensors: both modules import this
one and neither imports the other.

The gate's features per row at layer i (all in [0, 1]; `GATE_FEATURES` names them in order):
  confidence   max p (multi-label: min over labels of max(p, 1 − p))
  margin       top1 − top2 (multi-label: min over labels of |2p − 1|)
  entropy      normalised entropy H_i
  depth        i / L
  stable       consecutive earlier layers with the same prediction, / L
  jsd          Jensen–Shannon divergence from layer i − 1 (0 at layer 1)
  length       log1p(tokens) / log1p(512)
"""

from __future__ import annotations

import math

import torch

SIMILARITIES = ("kl", "reverse_kl", "jsd")
GATE_FEATURES = ("confidence", "margin", "entropy", "depth", "stable", "jsd", "length")
_EPS = 1e-12
_LENGTH_SCALE = math.log1p(512.0)


def layer_probs(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """p_i: softmax over classes, or an independent sigmoid per label."""
    logits = logits.float()
    return torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=-1)


def _as_distributions(probs: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """View probabilities as categorical distributions over the last dim: multi-label → [B, C, 2] Bernoullis."""
    return torch.stack((probs, 1.0 - probs), dim=-1) if multi_label else probs


def normalised_entropy(probs: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """H_i in [0, 1]: entropy / log C (single-label) or mean binary entropy / log 2 (multi-label)."""
    dist = _as_distributions(probs, multi_label)
    entropy = -(dist * torch.log(dist.clamp_min(_EPS))).sum(-1)
    if multi_label:
        return entropy.mean(-1) / math.log(2.0)
    return entropy / math.log(probs.shape[-1]) if probs.shape[-1] > 1 else torch.zeros_like(entropy)


def confidence(probs: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """max p per row; multi-label: the least confident label's max(p, 1 − p)."""
    return torch.maximum(probs, 1 - probs).amin(-1) if multi_label else probs.amax(-1)


def margin(probs: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """top-1 − top-2 probability per row (1 with a single class); multi-label: the least certain label's
    |2p − 1|, its own top-1 − top-2 between "on" and "off"."""
    if multi_label:
        return (2 * probs - 1).abs().amin(-1)
    if probs.shape[-1] < 2:
        return probs[..., 0]
    top = probs.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def divergence(p: torch.Tensor, q: torch.Tensor, similarity: str, multi_label: bool) -> torch.Tensor:
    """D(p, q) per row: KL(p‖q), KL(q‖p) or Jensen–Shannon (natural log); multi-label: mean over labels."""
    p, q = _as_distributions(p, multi_label), _as_distributions(q, multi_label)

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * (torch.log(a.clamp_min(_EPS)) - torch.log(b.clamp_min(_EPS)))).sum(-1)

    if similarity == "kl":
        value = kl(p, q)
    elif similarity == "reverse_kl":
        value = kl(q, p)
    elif similarity == "jsd":
        mid = 0.5 * (p + q)
        value = 0.5 * kl(p, mid) + 0.5 * kl(q, mid)
    else:
        raise ValueError(f"unknown similarity '{similarity}': expected one of {', '.join(SIMILARITIES)}")
    return value.mean(-1) if multi_label else value


def predictions(probs: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Class index per row, or the label set {p >= 0.5} as a bool [B, C] mask."""
    return probs >= 0.5 if multi_label else probs.argmax(-1)


def same_prediction(a: torch.Tensor, b: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """[B] bool: do the two distributions predict the same class (multi-label: the same label set)?"""
    equal = predictions(a, multi_label) == predictions(b, multi_label)
    return equal.all(-1) if multi_label else equal


def count_run(condition: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """counter + 1 where the condition holds, else 0: the length of the run of layers that met it."""
    return torch.where(condition, counter + 1, torch.zeros_like(counter))


def stable_count(
    probs: torch.Tensor, prev_probs: torch.Tensor, counter: torch.Tensor, layer: int, multi_label: bool
) -> torch.Tensor:
    """How many consecutive earlier layers gave the same prediction as this one (0 at layer 1)."""
    return count_run(same_prediction(probs, prev_probs, multi_label) & (layer > 1), counter)


def gate_features(
    probs: torch.Tensor,
    prev_probs: torch.Tensor,
    stable: torch.Tensor,
    layer: int,
    num_layers: int,
    length: torch.Tensor,
    multi_label: bool,
) -> torch.Tensor:
    """The gate's features [B, F] at one layer (1-based) from this layer's and the previous layer's
    probabilities [B, C], the stable counter [B] (`stable_count`, already updated for this layer) and the row
    lengths in tokens [B]."""
    probs = probs.float()
    top_margin = margin(probs, multi_label)
    top_confidence = confidence(probs, multi_label)
    entropy = normalised_entropy(probs, multi_label)
    depth = torch.full_like(top_confidence, layer / num_layers)
    if layer > 1:
        jsd = divergence(prev_probs.float(), probs, "jsd", multi_label)
    else:
        jsd = torch.zeros_like(top_confidence)
    stable_fraction = stable.to(top_confidence.dtype) / num_layers
    length_feature = torch.log1p(length.to(top_confidence.dtype)) / _LENGTH_SCALE
    features = (top_confidence, top_margin, entropy, depth, stable_fraction, jsd, length_feature)
    return torch.stack(features, dim=-1)
