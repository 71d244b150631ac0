"""The layer-wise early-exit runner (DESIGN §4).

Each layer runs only on the rows still active. After a layer, rows whose policy fired are recorded and dropped
from the batch: hidden states, padding mask and policy state are compacted with `index_select`, and right
padding that no remaining row needs is cut off. Invariant (tested): every row gets the prediction and exit layer
it would get alone, and `full` equals the plain Hugging Face model.

`run_bucketed` is the entry point for a serving batch: it first groups rows of similar token length into
sub-batches (length bucketing), so short requests do not pay for the padding of a long one.

What issue 9's profile of this loop found (MiniLM, ADE dev, 1 thread; docs/performance.md): the layers are ~97 %
of the time. Of the rest, the pre-issue-9 loop spent per batch of 8 about 2 ms in exit heads, 1.3 ms pooling,
1-2 ms in the policy and 1.6 ms in compaction bookkeeping. The loop below skips the heads and the policy at
layers whose exit the policy cannot take (all but the last for `full`), keeps the per-row bookkeeping in Python
lists (one host read of the exit mask per layer, lengths read once) and writes the outputs once at the end.
Padding was 43 % of the tokens of a batch of 8 (54 % at 32): length bucketing removes most of it.
`torch.compile` of the layer block did not pay on CPU (see docs/performance.md) and is not used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .model import EarlyExitModel
from .policies import Policy, init_state, policy_step, predictions

# The fixed cost of one more sub-batch, in padded tokens of layer work: a sub-batch pays the per-layer Python
# and exit-head overhead again (~1 ms per layer, about 15-50 tokens' worth of layer time for the backbones here).
BUCKET_OVERHEAD_TOKENS = 32
# Policies whose decision at a layer reads only that layer's exit (no state from earlier layers).
STATELESS_POLICIES = ("max_prob", "entropy", "oracle")


@dataclass
class ExitResult:
    """Per-sample outputs of one batch, in input order."""

    logits: torch.Tensor  # [N, C] logits of the exit each row took
    probs: torch.Tensor  # [N, C] the distribution the policy returns (window mean for EPEE's ensemble)
    exit_layer: torch.Tensor  # [N] long, 1-based
    entropy: torch.Tensor  # [N] normalised entropy at the exit layer
    rows_per_layer: list[int]  # how many rows each layer actually ran on: the compute the batch cost

    def predictions(self, multi_label: bool) -> torch.Tensor:
        return predictions(self.probs, multi_label)


Runner = Callable[..., ExitResult]  # (model, inputs, policy, labels=None) -> ExitResult


def first_exit_read(policy: Policy, num_layers: int) -> int:
    """The first layer (1-based) whose exit the policy needs: the exit heads and the policy are skipped before it.

    `full` reads only the last exit; `static` only its layer (or the last, if `min_layer` forbids that layer);
    stateless rules nothing before `min_layer`. Rules that count across layers (patience, EPEE, F-PABEE) read
    every exit, since their counters start at layer 1 whatever `min_layer` is.
    """
    if policy.name == "full":
        return num_layers
    if policy.name == "static":
        layer = policy.params["layer"]
        return layer if layer >= policy.min_layer else num_layers
    if policy.name in STATELESS_POLICIES:
        return policy.min_layer
    return 1


def _check_right_padding(mask: torch.Tensor) -> None:
    if mask.shape[1] and not bool(mask[:, 0].all()):
        raise ValueError("the runner needs right padding (tokenizer.padding_side = 'right')")


@torch.inference_mode()
def run_early_exit(
    model: EarlyExitModel,
    inputs: dict[str, torch.Tensor],
    policy: Policy,
    labels: torch.Tensor | None = None,
) -> ExitResult:
    """Run a right-padded batch through `model`, each row leaving at the layer `policy` picks.

    `labels` is only needed by the `oracle` policy. Call `model.eval()` first: dropout would make exits random.
    """
    num_layers = model.num_layers
    policy.check_layers(num_layers)
    backbone, exits, multi_label = model.backbone, model.exits, model.multi_label

    hidden, mask = backbone.embed(inputs)
    _check_right_padding(mask)
    row_lengths = mask.sum(1).tolist()  # read once; trimming after each compaction needs no tensor reduction
    longest = max(row_lengths, default=0)
    if longest < mask.shape[1]:
        hidden, mask = hidden[:, :longest], mask[:, :longest]
    batch_size, num_outputs = hidden.shape[0], len(model.spec.labels)
    first_read = first_exit_read(policy, num_layers)

    state = init_state(batch_size, num_outputs, hidden.device)
    active_rows = list(range(batch_size))
    active_labels = labels
    finished: list[tuple[list[int], int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    rows_per_layer: list[int] = []

    bias = backbone.attention_bias(mask, hidden.dtype)
    for index in range(num_layers):
        layer = index + 1
        rows_per_layer.append(len(active_rows))
        hidden = backbone.layer(index, hidden, bias)
        if layer < first_read:
            continue
        logits = exits(index, hidden, mask)
        step = policy_step(policy, logits, state, layer, num_layers, multi_label, active_labels)
        state = step.state
        leaving = step.exit_mask.tolist()  # the one host read of this layer
        if not any(leaving):
            continue
        if all(leaving):
            finished.append((active_rows, layer, logits, step.probs, step.entropy))
            break

        leave = [position for position, gone in enumerate(leaving) if gone]
        keep = [position for position, gone in enumerate(leaving) if not gone]
        leave_index = torch.tensor(leave, device=hidden.device)
        finished.append(
            (
                [active_rows[position] for position in leave],
                layer,
                logits.index_select(0, leave_index),
                step.probs.index_select(0, leave_index),
                step.entropy.index_select(0, leave_index),
            )
        )
        active_rows = [active_rows[position] for position in keep]
        keep_index = torch.tensor(keep, device=hidden.device)
        longest = max(row_lengths[row] for row in active_rows)
        hidden = hidden[:, :longest].index_select(0, keep_index)  # trim first: copy only what stays
        mask = mask[:, :longest].index_select(0, keep_index)
        state = state.select(keep_index)
        if active_labels is not None:
            active_labels = active_labels.index_select(0, keep_index)
        bias = backbone.attention_bias(mask, hidden.dtype)

    return _gather(finished, batch_size, num_outputs, rows_per_layer, hidden.device)


def _gather(
    finished: list[tuple[list[int], int, torch.Tensor, torch.Tensor, torch.Tensor]],
    batch_size: int,
    num_outputs: int,
    rows_per_layer: list[int],
    device: torch.device,
) -> ExitResult:
    """One write per output: the rows that left at each layer, put back in input order."""
    if len(finished) == 1:  # every row left at the same layer (always so for `full`): already in input order
        rows, layer, logits, probs, entropy = finished[0]
        exit_layer = torch.full((batch_size,), layer, dtype=torch.long, device=device)
        return ExitResult(logits.float(), probs, exit_layer, entropy, rows_per_layer)
    order = torch.tensor([row for rows, *_ in finished for row in rows], device=device)
    layers = torch.tensor([layer for rows, layer, *_ in finished for _ in rows], device=device)

    def place(parts: list[torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device).index_copy_(
            0, order, torch.cat(parts).to(dtype)
        )

    return ExitResult(
        place([part[2] for part in finished], (batch_size, num_outputs), torch.float32),
        place([part[3] for part in finished], (batch_size, num_outputs), torch.float32),
        place([layers], (batch_size,), torch.long),
        place([part[4] for part in finished], (batch_size,), torch.float32),
        rows_per_layer,
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


def _select_rows(inputs: dict[str, torch.Tensor], rows: torch.Tensor, length: int) -> dict[str, torch.Tensor]:
    """The given rows of every [B, T, …] input, cut to `length` tokens."""
    return {key: value[:, :length].index_select(0, rows) for key, value in inputs.items()}


@torch.inference_mode()
def run_bucketed(
    model: EarlyExitModel,
    inputs: dict[str, torch.Tensor],
    policy: Policy,
    labels: torch.Tensor | None = None,
    overhead_tokens: int = BUCKET_OVERHEAD_TOKENS,
) -> ExitResult:
    """`run_early_exit` on sub-batches of similar length (`length_buckets`), results back in input order.

    For a serving batch of texts of mixed lengths this removes most of the padding every layer would otherwise
    process. Inputs without a padding mask (images) run as one batch. Each row's result is the one it gets alone,
    as for `run_early_exit`.
    """
    mask = inputs.get("attention_mask")
    if mask is None or mask.shape[0] < 2 or any(value.dim() < 2 for value in inputs.values()):
        return run_early_exit(model, inputs, policy, labels)
    _check_right_padding(mask)
    lengths = mask.sum(1).tolist()
    buckets = length_buckets(lengths, overhead_tokens)
    if len(buckets) == 1:
        return run_early_exit(model, inputs, policy, labels)

    batch_size = mask.shape[0]
    parts, order = [], []
    for rows in buckets:
        index = torch.tensor(rows, device=mask.device)
        sub_labels = labels.index_select(0, index) if labels is not None else None
        longest = max(lengths[row] for row in rows)
        parts.append(run_early_exit(model, _select_rows(inputs, index, longest), policy, sub_labels))
        order += rows
    order_index = torch.tensor(order, device=mask.device)

    def place(values: list[torch.Tensor]) -> torch.Tensor:
        joined = torch.cat(values)
        return torch.empty(
            (batch_size, *joined.shape[1:]), dtype=joined.dtype, device=joined.device
        ).index_copy_(0, order_index, joined)

    depth = max(len(part.rows_per_layer) for part in parts)
    rows_per_layer = [
        sum(part.rows_per_layer[i] for part in parts if i < len(part.rows_per_layer)) for i in range(depth)
    ]
    return ExitResult(
        place([part.logits for part in parts]),
        place([part.probs for part in parts]),
        place([part.exit_layer for part in parts]),
        place([part.entropy for part in parts]),
        rows_per_layer,
    )
