"""The layer-wise early-exit runner (docs/design.md, "Runner").

Each layer runs only on the rows still active. After a layer, rows whose policy fired are recorded and dropped
from the batch: hidden states, padding mask and policy state are compacted together, and right padding that no
remaining row needs is cut off. Invariant (tested): every row gets the prediction and exit layer it would get
alone, and `full` equals the plain Hugging Face model.

`run_bucketed` is the entry point for a serving batch: rows run in sub-batches of similar token length (length
bucketing), so short requests do not pay for a long one's padding; the sub-batches advance layer by layer
together and are re-partitioned whenever rows leave, so the few rows that remain merge again.

The loop skips the exit heads and the policy at layers whose exit the policy cannot take (`first_exit_read`),
reads the exit mask from the device once per sub-batch and layer, and writes the outputs once at the end. Its
parts are labelled for `torch.profiler` (`epee.embed`, `epee.layer`, `epee.exit_heads`, `epee.policy`), which is
how the performance report times them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.profiler import record_function

from .model import EarlyExitModel
from .policies import (
    Policy,
    PolicyState,
    first_exit_read,
    init_state,
    policy_step,
    predictions,
    require_gate,
)

# The fixed cost of one more sub-batch, in padded tokens of layer work: each layer call reads the layer's weights
# again and pays a per-call overhead (see docs/performance.md for the measurement behind the value).
BUCKET_OVERHEAD_TOKENS = 32


@dataclass
class ExitResult:
    """Per-sample outputs of one batch, in input order."""

    logits: torch.Tensor  # [N, C] logits of the exit each row took
    probs: torch.Tensor  # [N, C] the distribution the policy returns (window mean for EPEE's ensemble)
    exit_layer: torch.Tensor  # [N] long, 1-based
    entropy: torch.Tensor  # [N] normalised entropy at the exit layer
    rows_per_layer: list[int]  # how many rows each layer actually ran on: the compute the batch cost
    tokens_per_layer: list[int]  # padded tokens each layer processed, summed over its sub-batches

    def predictions(self, multi_label: bool) -> torch.Tensor:
        return predictions(self.probs, multi_label)


class FinishedRows(NamedTuple):
    """Rows that left the batch together at one layer, with what the runner returns for them."""

    rows: list[int]  # input row indices
    layer: int  # 1-based exit layer
    logits: torch.Tensor  # [n, C]
    probs: torch.Tensor  # [n, C]
    entropy: torch.Tensor  # [n]


def _check_right_padding(mask: torch.Tensor) -> None:
    if mask.shape[1] and not bool(mask[:, 0].all()):
        raise ValueError("the runner needs right padding (tokenizer.padding_side = 'right')")


@dataclass
class RowGroup:
    """Rows that run through the layers together: one padded sub-batch and everything that follows its rows
    (the runner's sub-batches and the layer-level scheduler's cohorts)."""

    rows: list  # what each sub-batch row is: its input row here, a (request, row) pair in the scheduler
    hidden: torch.Tensor  # [b, T, H], T = the longest row of the group
    mask: torch.Tensor  # [b, T]
    state: PolicyState
    labels: torch.Tensor | None
    bias: torch.Tensor | None = None  # the attention bias of `mask`; None until `_with_bias` builds it


def _with_bias(groups: list[RowGroup], model: EarlyExitModel) -> list[RowGroup]:
    """Build the attention bias of every sub-batch whose rows changed (a new or compacted `RowGroup` has none)."""
    for group in groups:
        if group.bias is None:
            group.bias = model.backbone.attention_bias(group.mask, group.hidden.dtype)
    return groups


def take_rows(group: RowGroup, positions: list[int], length: int) -> RowGroup:
    """The given sub-batch rows of `group`, cut (or zero-padded) to `length` tokens: the one compaction path.
    Padding positions are masked for every real token, so their values never count."""
    index = torch.tensor(positions, device=group.hidden.device)
    hidden, mask = group.hidden[:, :length], group.mask[:, :length]
    if length > hidden.shape[1]:
        hidden = torch.nn.functional.pad(hidden, (0, 0, 0, length - hidden.shape[1]))
        mask = torch.nn.functional.pad(mask, (0, length - mask.shape[1]))
    labels = group.labels.index_select(0, index) if group.labels is not None else None
    return RowGroup(
        [group.rows[position] for position in positions],
        hidden.index_select(0, index),
        mask.index_select(0, index),
        group.state.select(index),
        labels,
    )


def _concat(parts: list[RowGroup]) -> RowGroup:
    if len(parts) == 1:
        return parts[0]
    labels = None if parts[0].labels is None else torch.cat([part.labels for part in parts])
    return RowGroup(
        [row for part in parts for row in part.rows],
        torch.cat([part.hidden for part in parts]),
        torch.cat([part.mask for part in parts]),
        PolicyState(*(torch.cat(tensors) for tensors in zip(*(part.state for part in parts)))),
        labels,
    )


def _regroup(groups: list[RowGroup], lengths: list[int], overhead_tokens: int) -> list[RowGroup]:
    """Re-partition the active rows with `length_buckets` (rows have left, so sub-batches may merge or split);
    groups whose rows stay together are kept as they are."""
    where = {
        row: (number, position)
        for number, group in enumerate(groups)
        for position, row in enumerate(group.rows)
    }
    active = [row for group in groups for row in group.rows]
    buckets = [
        [active[i] for i in bucket]
        for bucket in length_buckets([lengths[row] for row in active], overhead_tokens)
    ]
    current = {frozenset(group.rows) for group in groups}
    if {frozenset(bucket) for bucket in buckets} == current:
        return groups
    regrouped = []
    for bucket in buckets:
        longest = max(lengths[row] for row in bucket)
        parts = []
        for number, group in enumerate(groups):
            positions = [where[row][1] for row in bucket if where[row][0] == number]
            if len(positions) == len(group.rows) and group.hidden.shape[1] == longest:
                parts.append(group)
            elif positions:
                parts.append(take_rows(group, positions, longest))
        regrouped.append(_concat(parts))
    return regrouped


@torch.inference_mode()
def run_early_exit(
    model: EarlyExitModel,
    inputs: dict[str, torch.Tensor],
    policy: Policy,
    labels: torch.Tensor | None = None,
    overhead_tokens: int | None = None,
) -> ExitResult:
    """Run a right-padded batch through `model`, each row leaving at the layer `policy` picks.

    `labels` is only needed by the `oracle` policy. Call `model.eval()` first: dropout would make exits random.
    With `overhead_tokens` set, rows run in sub-batches of similar length (`length_buckets`), re-partitioned
    each time rows leave, so short rows do not pay for a long row's padding and the sub-batches that remain
    merge as they empty; `None` runs the batch as one (`run_bucketed` is the bucketed entry point).
    """
    num_layers = model.num_layers
    policy.check_layers(num_layers)
    require_gate(policy, model.exit_gate)
    backbone, exits, multi_label = model.backbone, model.exits, model.multi_label

    with record_function("epee.embed"):
        hidden, mask = backbone.embed(inputs)
    _check_right_padding(mask)
    lengths = mask.sum(1).tolist()  # read once; trimming after each compaction needs no tensor reduction
    batch_size, num_outputs = hidden.shape[0], len(model.spec.labels)
    first_read = first_exit_read(policy, num_layers)
    whole = RowGroup(
        list(range(batch_size)),
        hidden,
        mask,
        init_state(batch_size, num_outputs, hidden.device, mask.sum(1)),
        labels,
    )
    if overhead_tokens is not None and batch_size > 1:
        groups = _regroup([whole], lengths, overhead_tokens)
    else:
        groups = [take_rows(whole, whole.rows, max(lengths, default=0))]
    groups = _with_bias(groups, model)
    finished: list[FinishedRows] = []
    rows_per_layer: list[int] = []
    tokens_per_layer: list[int] = []
    for index in range(num_layers):
        layer = index + 1
        rows_per_layer.append(sum(len(group.rows) for group in groups))
        tokens_per_layer.append(sum(group.mask.numel() for group in groups))
        with record_function("epee.layer"):
            for group in groups:
                group.hidden = backbone.run_layer(index, group.hidden, group.bias)
        if layer < first_read:
            continue
        remaining, changed = [], False
        for group in groups:
            with record_function("epee.exit_heads"):
                logits = exits(index, group.hidden, group.mask)
            with record_function("epee.policy"):
                step = policy_step(
                    policy, logits, group.state, layer, num_layers, multi_label, group.labels, model.exit_gate
                )
            group.state = step.state
            leaving = step.exit_mask.tolist()  # the one host read of this group and layer
            if not any(leaving):
                remaining.append(group)
                continue
            changed = True
            if all(leaving):
                finished.append(FinishedRows(group.rows, layer, logits, step.probs, step.entropy))
                continue
            leave = [position for position, gone in enumerate(leaving) if gone]
            leave_index = torch.tensor(leave, device=logits.device)
            finished.append(
                FinishedRows(
                    [group.rows[position] for position in leave],
                    layer,
                    logits.index_select(0, leave_index),
                    step.probs.index_select(0, leave_index),
                    step.entropy.index_select(0, leave_index),
                )
            )
            keep = [position for position, gone in enumerate(leaving) if not gone]
            # trim the padding no remaining row needs, then copy only what stays
            remaining.append(take_rows(group, keep, max(lengths[group.rows[position]] for position in keep)))
        groups = remaining
        if not groups:
            break
        if changed and overhead_tokens is not None:
            groups = _regroup(groups, lengths, overhead_tokens)
        groups = _with_bias(groups, model)

    return _gather(finished, batch_size, num_outputs, rows_per_layer, tokens_per_layer, hidden.device)


def _gather(
    finished: list[FinishedRows],
    batch_size: int,
    num_outputs: int,
    rows_per_layer: list[int],
    tokens_per_layer: list[int],
    device: torch.device,
) -> ExitResult:
    """One write per output: the rows that left at each layer, put back in input order."""
    counts = (rows_per_layer, tokens_per_layer)
    if len(finished) == 1 and finished[0].rows == list(range(batch_size)):  # one exit layer, rows in order
        part = finished[0]
        exit_layer = torch.full((batch_size,), part.layer, dtype=torch.long, device=device)
        return ExitResult(part.logits.float(), part.probs, exit_layer, part.entropy, *counts)
    order = torch.tensor([row for part in finished for row in part.rows], device=device)
    layers = torch.tensor([part.layer for part in finished for _ in part.rows], device=device)

    def place(parts: list[torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device).index_copy_(
            0, order, torch.cat(parts).to(dtype)
        )

    return ExitResult(
        place([part.logits for part in finished], (batch_size, num_outputs), torch.float32),
        place([part.probs for part in finished], (batch_size, num_outputs), torch.float32),
        place([layers], (batch_size,), torch.long),
        place([part.entropy for part in finished], (batch_size,), torch.float32),
        *counts,
    )


# --- length bucketing ------------------------------------------------------------------------------------------


def length_buckets(lengths: list[int], overhead_tokens: int = BUCKET_OVERHEAD_TOKENS) -> list[list[int]]:
    """Group row indices into sub-batches of similar token length.

    Rows sorted by length are cut into runs that minimise Σ over sub-batches of (rows × longest row +
    `overhead_tokens`): the padded tokens every layer processes, plus the fixed cost of one more sub-batch.
    Exact dynamic programme over the sorted rows (O(n²), n = a serving batch). Sub-batches come shortest first.
    """
    order = sorted(range(len(lengths)), key=lambda row: lengths[row])
    sorted_lengths = [lengths[row] for row in order]
    best_cost = [0.0] + [float("inf")] * len(order)
    cut = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        longest = sorted_lengths[end - 1]  # sorted, so a run ending at `end` is as long as its last row
        for start in range(end):
            cost = best_cost[start] + (end - start) * longest + overhead_tokens
            if cost < best_cost[end]:
                best_cost[end], cut[end] = cost, start
    buckets, end = [], len(order)
    while end > 0:
        buckets.append(order[cut[end] : end])
        end = cut[end]
    return buckets[::-1]


def run_bucketed(
    model: EarlyExitModel,
    inputs: dict[str, torch.Tensor],
    policy: Policy,
    labels: torch.Tensor | None = None,
    overhead_tokens: int = BUCKET_OVERHEAD_TOKENS,
) -> ExitResult:
    """The serving entry point: `run_early_exit` with length bucketing (sub-batches of similar token length,
    re-partitioned as rows leave). Each row's result is still the one it gets alone; images, which have no
    padding, run as one batch."""
    return run_early_exit(model, inputs, policy, labels, overhead_tokens)
