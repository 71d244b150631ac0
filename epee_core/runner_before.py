"""The runner as it was before issue 9 (kept unchanged so `epee bench` and `python -m epee_core.performance` can
time it side by side with the current one, and tests can check both give the same answers).

Not used for serving. Differences from `runner.run_early_exit`: exit heads and the policy run after every layer
whatever the policy, per-layer bookkeeping is tensor ops (boolean masks, scatter writes), and there is no length
bucketing.
"""

from __future__ import annotations

import torch

from .model import EarlyExitModel
from .policies import Policy, init_state, policy_step
from .runner import ExitResult


def _trim_right_padding(hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop trailing positions that are padding for every remaining row."""
    longest = int(mask.sum(1).max())
    if longest < mask.shape[1]:
        return hidden[:, :longest], mask[:, :longest]
    return hidden, mask


@torch.inference_mode()
def run_early_exit_before(
    model: EarlyExitModel,
    inputs: dict[str, torch.Tensor],
    policy: Policy,
    labels: torch.Tensor | None = None,
) -> ExitResult:
    """The pre-issue-9 `run_early_exit`, verbatim."""
    num_layers = model.num_layers
    policy.check_layers(num_layers)
    backbone, multi_label = model.backbone, model.multi_label

    hidden, mask = backbone.embed(inputs)
    if mask.shape[1] and not bool(mask[:, 0].all()):
        raise ValueError("the runner needs right padding (tokenizer.padding_side = 'right')")
    hidden, mask = _trim_right_padding(hidden, mask)
    batch_size, num_outputs = hidden.shape[0], len(model.spec.labels)

    state = init_state(batch_size, num_outputs, hidden.device)
    active_rows = torch.arange(batch_size, device=hidden.device)
    active_labels = labels
    out_logits = torch.zeros(batch_size, num_outputs, device=hidden.device)
    out_probs = torch.zeros_like(out_logits)
    out_entropy = torch.zeros(batch_size, device=hidden.device)
    exit_layer = torch.full((batch_size,), num_layers, dtype=torch.long, device=hidden.device)
    rows_per_layer: list[int] = []

    bias = backbone.attention_bias(mask, hidden.dtype)
    for index in range(num_layers):
        rows_per_layer.append(int(active_rows.numel()))
        hidden = backbone.layer(index, hidden, bias)
        logits = model.exits(index, hidden, mask)
        step = policy_step(policy, logits, state, index + 1, num_layers, multi_label, active_labels)
        state = step.state
        if not bool(step.exit_mask.any()):
            continue

        finished = active_rows[step.exit_mask]
        out_logits[finished] = logits[step.exit_mask].float()
        out_probs[finished] = step.probs[step.exit_mask]
        out_entropy[finished] = step.entropy[step.exit_mask]
        exit_layer[finished] = index + 1

        keep = (~step.exit_mask).nonzero().squeeze(1)
        if keep.numel() == 0:
            break
        active_rows = active_rows[keep]
        hidden, mask = _trim_right_padding(hidden.index_select(0, keep), mask.index_select(0, keep))
        state = state.select(keep)
        if active_labels is not None:
            active_labels = active_labels.index_select(0, keep)
        bias = backbone.attention_bias(mask, hidden.dtype)

    return ExitResult(out_logits, out_probs, exit_layer, out_entropy, rows_per_layer)
