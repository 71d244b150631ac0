"""Offline replay of a policy over cached exit logits, with the same `policy_step` the live runner uses.

All rows are stepped together; a row's exit layer and output distribution are frozen at the first layer where
its policy fires. `policy_step` is row-wise, so a row still running sees exactly what it would see in the live
runner, where exited rows have been compacted away.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ..engine.policies import Policy, PolicyError, init_state, policy_step, require_gate
from ..engine.signals import predictions


class ReplayResult(NamedTuple):
    exit_layer: torch.Tensor  # [N] long, 1-based
    probs: torch.Tensor  # [N, C] the distribution each row returns at its exit

    def predictions(self, multi_label: bool) -> torch.Tensor:
        return predictions(self.probs, multi_label)


def replay_policy(
    policy: Policy,
    logits: torch.Tensor,
    multi_label: bool,
    labels: torch.Tensor | None = None,
    gate: Any = None,
    lengths: torch.Tensor | None = None,
) -> ReplayResult:
    """Exit layers and returned distributions of `policy` on cached logits [L, N, C]; `gate` (the model's
    `ExitGate`) and `lengths` (the cache's row lengths [N]) are needed by the `gate` policy only."""
    num_layers, num_samples, num_outputs = logits.shape
    policy.check_layers(num_layers)
    require_gate(policy, gate)
    if policy.name == "gate" and lengths is None:
        raise PolicyError("policy 'gate' needs the rows' lengths: rebuild the calibration cache")
    state = init_state(num_samples, num_outputs, logits.device, lengths)
    exit_layer = torch.full((num_samples,), num_layers, dtype=torch.long, device=logits.device)
    out_probs = torch.zeros(num_samples, num_outputs, device=logits.device)
    active = torch.ones(num_samples, dtype=torch.bool, device=logits.device)
    for index in range(num_layers):
        step = policy_step(policy, logits[index], state, index + 1, num_layers, multi_label, labels, gate)
        state = step.state
        leaving = step.exit_mask & active
        exit_layer[leaving] = index + 1
        out_probs[leaving] = step.probs[leaving]
        active &= ~step.exit_mask
        if not bool(active.any()):
            break
    return ReplayResult(exit_layer, out_probs)
