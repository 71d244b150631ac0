"""The layer-level scheduler (docs/design.md, "Layer-level scheduling"): continuous batching at layer granularity.

Rows in flight live in *cohorts*: the rows of one policy admitted at the same step, which therefore stand at the
same depth. One `step()`:
1. runs one layer for every cohort in flight, then the exit heads and each cohort's policy;
2. admits waiting requests, in arrival order and within the limits, as new cohorts (one per policy and length
   bucket), which run their embeddings and first layer in the same step;
3. hands back every request whose rows have all exited, the moment the last one does.
A request never waits for a batch to fill or for a slower batch-mate: it starts at the next step, and it leaves
at the step its policy lets it exit.

Requests admitted in one step are cut into cohorts of similar length (the runner's `length_buckets`): a layer
costs about its padded tokens, so one long note does not make the short sentences beside it pay for its padding.
Cohorts are never merged afterwards: rows at different depths need different layers. `max_cohorts` bounds the
cohorts in flight: while that many run, new requests wait and gather into one larger cohort, which a CPU runs more
efficiently than many one-row cohorts, and a deep request is slowed by fewer newcomers (docs/latency.md measures
1, 2 and no bound).

Invariant (tested over random arrival schedules): every row gets exactly the prediction and exit layer it gets
alone, whatever it ran beside and whenever it arrived. The scheduler calls the same backbone layers, exit heads and
`policy_step` as `run_early_exit`, on right-padded cohorts whose padding is masked.

Fault isolation: a request whose inputs make an engine call raise is failed alone. The cohort is split into its
requests, each runs the call again on its own, and only the requests that still raise get their exception back.

Plain PyTorch, no server import: TorchServe's continuous batching (one `handle()` call = one step) and the
open-loop benchmark (`epee bench --arrival-rate`) drive the same class.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import torch

from ..engine.model import EarlyExitModel
from ..engine.policies import Policy, first_exit_read, init_state, policy_step
from ..engine.runner import BUCKET_OVERHEAD_TOKENS, RowGroup, length_buckets, take_rows


@dataclass(frozen=True)
class SchedulerLimits:
    """Bounds on the work of one step. A request larger than a limit still runs, alone, when nothing else is in
    flight, so no request waits forever."""

    max_rows_in_flight: int = 64  # rows in all cohorts together
    max_admit_rows: int = 32  # rows admitted in one step (the size of a new cohort)
    max_step_tokens: int = 16384  # padded tokens the layers of one step process, summed over cohorts
    # cohorts in flight: while this many run, new requests wait and gather into one larger cohort. Two beat both
    # one (run to completion) and no bound (every step runs every cohort) on a CPU (docs/latency.md)
    max_cohorts: int = 2
    # threads that run a step's cohorts side by side, each cohort on its own thread with one torch thread, so
    # a worker's cores serve several cohorts at once instead of splitting one small matrix product; a step with
    # one cohort runs it on the calling thread with that thread's torch threads (docs/latency.md)
    cohort_threads: int = 1

    def check(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"scheduler limit '{name}' must be a positive integer, got {value!r}")


@dataclass
class RowResult:
    """What one row exited with: the same fields `run_early_exit` returns for it."""

    probs: list[float]
    exit_layer: int
    entropy: float


@dataclass
class Finished:
    """A request the step completed: its rows' results in order, or the exception that failed it alone."""

    key: Hashable
    rows: list[RowResult] | None
    error: BaseException | None = None


@dataclass(eq=False)  # identity: a request is itself, whatever its rows hold
class _Ticket:
    """One submitted request while it waits or runs."""

    key: Hashable
    inputs: dict[str, torch.Tensor]  # n rows, right-padded to this request's longest row
    policy: Policy
    lengths: list[int]  # real tokens per row
    results: list[RowResult | None] = field(init=False)  # per row, once it exited
    pending: int = field(init=False)  # rows still running

    def __post_init__(self) -> None:
        self.results = [None] * self.num_rows
        self.pending = self.num_rows

    @property
    def num_rows(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        """Tokens per row once padded: the longest row."""
        return max(self.lengths)


@dataclass
class _Cohort:
    """Rows of one policy that were admitted together and stand at the same depth."""

    group: RowGroup  # hidden states, mask, policy state; `rows` holds (ticket, row) pairs
    policy: Policy
    depth: int = 0  # layers run so far
    first_read: int = 1  # the first layer whose exit the policy reads

    @property
    def tokens(self) -> int:
        return int(self.group.mask.numel())


def pad_inputs(parts: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate per-request inputs into one right-padded batch: token tensors [n, T] are zero-padded to the
    longest T (padding is masked, so its value never counts); other tensors (pixels) are concatenated as they
    are."""
    batch = {}
    for name in parts[0]:
        tensors = [part[name] for part in parts]
        if tensors[0].dim() == 2:
            width = max(t.shape[1] for t in tensors)
            tensors = [torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in tensors]
        batch[name] = torch.cat(tensors)
    return batch


class LayerScheduler:
    """Continuous batching at layer granularity for one `EarlyExitModel` (see the module docstring).

    `submit(key, inputs, policy)` queues a request whose encoded inputs hold one or more rows; `step()` runs one
    scheduler step and returns the requests it finished. Not thread-safe: one driver calls both.
    """

    def __init__(self, model: EarlyExitModel, limits: SchedulerLimits | None = None):
        self.model = model.eval()
        self.limits = limits or SchedulerLimits()
        self.limits.check()
        self.waiting: deque[_Ticket] = deque()
        self.cohorts: list[_Cohort] = []
        self.steps = 0
        self._pool = None
        if self.limits.cohort_threads > 1:  # torch's thread count is per thread once a thread sets it
            self._pool = ThreadPoolExecutor(
                self.limits.cohort_threads, "epee-cohort", initializer=torch.set_num_threads, initargs=(1,)
            )
            weakref.finalize(self, self._pool.shutdown, wait=False)

    # --- queue ---------------------------------------------------------------------------------------------

    def submit(self, key: Hashable, inputs: Mapping[str, torch.Tensor], policy: Policy) -> None:
        """Queue a request: `inputs` are its encoded rows (a tokenizer's right-padded output, or pixels)."""
        mask = inputs.get("attention_mask")
        num_rows = next(iter(inputs.values())).shape[0]
        lengths = mask.sum(1).tolist() if mask is not None else [1] * num_rows  # images count as rows
        self.waiting.append(_Ticket(key, dict(inputs), policy, [int(n) for n in lengths]))

    @property
    def rows_in_flight(self) -> int:
        return sum(len(cohort.group.rows) for cohort in self.cohorts)

    @property
    def idle(self) -> bool:
        """Nothing waiting and nothing in flight."""
        return not self.waiting and not self.cohorts

    def _admissible(self) -> list[_Ticket]:
        """The waiting requests this step admits: a prefix of the queue (arrival order, no overtaking) within
        the limits; the first waiting request always runs when nothing is in flight."""
        limits = self.limits
        if len(self.cohorts) >= limits.max_cohorts:
            return []
        rows_in_flight = self.rows_in_flight
        step_tokens = sum(cohort.tokens for cohort in self.cohorts)
        admitted: list[_Ticket] = []
        admit_rows, width = 0, 0
        for ticket in self.waiting:
            rows, new_width = admit_rows + ticket.num_rows, max(width, ticket.width)
            fits = (
                rows_in_flight + rows <= limits.max_rows_in_flight
                and rows <= limits.max_admit_rows
                and step_tokens + rows * new_width <= limits.max_step_tokens
            )
            if not fits and (admitted or self.cohorts):
                break
            admitted.append(ticket)
            admit_rows, width = rows, new_width
            if not fits:  # an oversized request runs alone
                break
        return admitted

    # --- one step ------------------------------------------------------------------------------------------

    def step(self) -> list[Finished]:
        """Run one layer for every cohort in flight, admit waiting requests as new cohorts (their embeddings and
        first layer run in this step too), and return the requests whose last row exited."""
        self.steps += 1
        finished: list[Finished] = []
        if self._pool is None:  # one thread: rows that leave at this layer make room for newcomers at once
            self.cohorts = self._run(self._advancing(), finished)
            self.cohorts += self._run(self._starting(), finished)
        else:  # side by side: admission is decided from the cohorts in flight, so all pieces are known up front
            self.cohorts = self._run(self._advancing() + self._starting(), finished)
        return finished

    def _advancing(self) -> list[Callable]:
        """One piece of work per cohort in flight: its next layer."""
        return [partial(self._isolated_layer, cohort) for cohort in self.cohorts]

    def _starting(self) -> list[Callable]:
        """One piece of work per new cohort: its embeddings and first layer."""
        return [partial(self._start, tickets) for tickets in self._admit()]

    def _run(self, work: list[Callable], finished: list[Finished]) -> list[_Cohort]:
        """Run the pieces (on the pool when there is one; each touches only its own cohort, so the results do
        not depend on the threads), add the requests they finished in submission order, and return the cohorts
        that still hold rows."""

        @torch.inference_mode()  # per thread
        def piece(call: Callable) -> tuple[list[_Cohort], list[Finished]]:
            done: list[Finished] = []
            return call(done), done

        if self._pool is None or len(work) < 2:  # one piece: on the calling thread, with its torch threads
            ran = map(piece, work)
        else:  # several: side by side, one torch thread each
            ran = self._pool.map(piece, work)
        cohorts: list[_Cohort] = []
        for advanced, done in ran:
            cohorts += [cohort for cohort in advanced if cohort.group.rows]
            finished += done
        return cohorts

    def _admit(self) -> list[list[_Ticket]]:
        """The requests `_admissible` lets in, taken from the queue and cut into new cohorts' tickets: one list
        per policy and length bucket."""
        admitted = self._admissible()
        for _ in admitted:
            self.waiting.popleft()
        by_policy: dict[tuple, list[_Ticket]] = {}
        for ticket in admitted:
            by_policy.setdefault(policy_key(ticket.policy), []).append(ticket)
        return [
            [tickets[i] for i in sorted(bucket)]
            for tickets in by_policy.values()
            for bucket in length_buckets([ticket.width for ticket in tickets], BUCKET_OVERHEAD_TOKENS)
        ]

    def _start(self, tickets: list[_Ticket], finished: list[Finished]) -> list[_Cohort]:
        """A new cohort's embeddings and first layer."""
        cohorts = self._isolated(self._embed, tickets, finished)
        return [advanced for cohort in cohorts for advanced in self._isolated_layer(cohort, finished)]

    def _embed(self, tickets: list[_Ticket]) -> list[_Cohort]:
        """A new cohort at depth 0 from the requests' rows."""
        device = self.model.device
        inputs = {name: t.to(device) for name, t in pad_inputs([ticket.inputs for ticket in tickets]).items()}
        hidden, mask = self.model.backbone.embed(inputs)
        rows = [(ticket, row) for ticket in tickets for row in range(ticket.num_rows)]
        state = init_state(len(rows), len(self.model.spec.labels), hidden.device, mask.sum(1))
        policy = tickets[0].policy  # `pad_inputs` padded to the longest row: nothing to trim
        group = RowGroup(rows, hidden, mask, state, None)
        return [_Cohort(group, policy, 0, first_exit_read(policy, self.model.num_layers))]

    def _isolated(self, call, tickets: list[_Ticket], finished: list[Finished]) -> list[_Cohort]:
        """`call(tickets)`; if it raises, each request runs it alone and only those that still raise fail."""
        try:
            return call(tickets)
        except Exception as error:
            if len(tickets) == 1:
                self._fail(tickets[0], error, finished)
                return []
            return [cohort for ticket in tickets for cohort in self._isolated(call, [ticket], finished)]

    def _isolated_layer(self, cohort: _Cohort, finished: list[Finished]) -> list[_Cohort]:
        """The next layer of `cohort`; if it raises, the cohort splits into its requests (all rows of a request
        stay together) and each runs the layer on its own."""
        try:
            return [self._advance(cohort, finished)]
        except Exception as error:
            tickets = list(dict.fromkeys(ticket for ticket, _ in cohort.group.rows))
            if len(tickets) == 1:
                self._fail(tickets[0], error, finished)
                return []
            parts = []
            for ticket in tickets:
                positions = [i for i, (owner, _) in enumerate(cohort.group.rows) if owner is ticket]
                group = take_rows(cohort.group, positions, _longest(cohort.group, positions))
                parts += self._isolated_layer(_Cohort(group, cohort.policy, cohort.depth, cohort.first_read),
                                              finished)  # fmt: skip
            return parts

    def _fail(self, ticket: _Ticket, error: BaseException, finished: list[Finished]) -> None:
        """The request failed alone: it is finished, with `error` and no rows."""
        ticket.pending = 0
        finished.append(Finished(ticket.key, None, error))

    def _advance(self, cohort: _Cohort, finished: list[Finished]) -> _Cohort:
        """Run layer `depth + 1` on the cohort, apply the exit heads and the policy, record the rows that leave
        and return the cohort with the rest (compacted: hidden states, mask and policy state together)."""
        model, group = self.model, cohort.group
        index = cohort.depth
        layer = index + 1
        if group.bias is None:
            group.bias = model.backbone.attention_bias(group.mask, group.hidden.dtype)
        hidden = model.backbone.run_layer(index, group.hidden, group.bias)
        if layer < cohort.first_read:
            group.hidden = hidden
            cohort.depth = layer
            return cohort
        logits = model.exits(index, hidden, group.mask)
        step = policy_step(cohort.policy, logits, group.state, layer, model.num_layers, model.multi_label,
                           None, model.exit_gate)  # fmt: skip
        group.hidden, group.state = hidden, step.state
        cohort.depth = layer
        leaving = step.exit_mask.tolist()
        if not any(leaving):
            return cohort
        probs, entropy = step.probs.float().tolist(), step.entropy.float().tolist()
        for position, gone in enumerate(leaving):
            if gone:
                ticket, row = group.rows[position]
                ticket.results[row] = RowResult(probs[position], layer, entropy[position])
                ticket.pending -= 1
                if ticket.pending == 0:
                    finished.append(Finished(ticket.key, list(ticket.results)))  # type: ignore[arg-type]
        keep = [position for position, gone in enumerate(leaving) if not gone]
        if not keep:
            group.rows = []
            return cohort
        cohort.group = take_rows(group, keep, _longest(group, keep))
        return cohort


def _longest(group: RowGroup, positions: list[int]) -> int:
    """Real tokens of the longest of the given rows: the width the compacted group keeps."""
    return int(group.mask[positions].sum(1).max().item()) if positions else 0


def policy_key(policy: Policy) -> tuple:
    """Requests with equal keys share an engine call (a cohort)."""
    return (policy.name, tuple(sorted(policy.params.items())))
