"""The LoRA plan of one step: which packed tokens use which adapter slot, planned once per step.

The plan is shared by every LoRA layer of the step (it travels in the step context). Adapters are
grouped by rank bucket (the next power of two of their rank), so a batch mixing ranks 4 and 64 never
pads the rank-4 adapters to 64 (vLLM and LoRAX pad every adapter to the largest rank). Within a
bucket, tokens are best packed grouped by slot (the engine sorts its rows by bucket, then slot): each
slot's tokens then form one contiguous run and the bucket's side paths run as one batched matmul over
a view of the slot buffers, with no gathering of weights or activations.

Runs up to `kernel_max_run` tokens (on CPU: every run) may instead be planned as `Segments`, for loramux's CPU
kernels (server/lora/kernels.py): one call per projection group for the shrink and one per member for the
expand, each run at its own slot's true rank; longer runs stay GEMMs through torch.

A token may also carry weighted slots (a request composing several adapters, or one adapter at a scale
other than 1): those are planned as weighted runs, `y[t] += w * x[t]·A·B` for each (slot, weight) of the
token, beside (and on top of) its single slot, if any.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

NO_ADAPTER = -1

PathKind = Literal["runs", "bmm"]


def rank_bucket(rank: int) -> int:
    """Adapters whose ranks share a bucket are computed together at the bucket's largest rank."""
    return 0 if rank <= 0 else 1 << (rank - 1).bit_length()


def ranges(values: list[int]) -> list[tuple[int, int]]:
    """Maximal [start, end) ranges of consecutive values (values ascending)."""
    out: list[tuple[int, int]] = []
    for v in values:
        if out and out[-1][1] == v:
            out[-1] = (out[-1][0], v + 1)
        else:
            out.append((v, v + 1))
    return out


@dataclass(frozen=True)
class LoraPart:
    """Side paths of the adapters of one rank bucket.

    `runs` always describes the work: contiguous token runs [start, end) that add slot `slot`.
    `kind == "bmm"` says the same work can run as one batched matmul over G groups of L rows:
    group g reads slot `slot_lo + g` (or `gather_slots[g]`); its rows are the contiguous tokens
    `bmm_start + g*L ... + L` when `tok_idx` is None, else a zeroed [G*L] buffer whose positions `pad_pos`
    hold the tokens `tok_idx` (the other rows stay zero and their results are never written anywhere:
    no row reads or receives another row's values, whatever a slot's weights hold). A part of weighted runs
    scales each gathered token by its factor (`tok_weight`); one token may then appear in several groups.
    """

    runs: tuple[tuple[int, int, int], ...]  # (start, end, slot), slot >= 0
    rank: int  # max rank of the adapters in the runs (slot buffers are sliced to it)
    kind: PathKind
    groups: int = 0  # G
    group_len: int = 0  # L
    slot_lo: int = 0  # groups read slots slot_lo .. slot_lo+G-1 (a view) when gather_slots is None
    gather_slots: torch.Tensor | None = None  # [G] long
    bmm_start: int = 0
    tok_idx: torch.Tensor | None = None  # [n] long: the part's tokens
    pad_pos: torch.Tensor | None = None  # [n] long: where each of them sits among the G*L rows
    weights: tuple[float, ...] | None = None  # kind "runs": the factor of each run's product (None: all 1)
    tok_weight: torch.Tensor | None = None  # [n] float32, kind "bmm" with tok_idx: each gathered token's factor


@dataclass(frozen=True)
class Segments:
    """Runs of tokens for the CPU kernels: row i of `runs` is (start, end, slot, rank, off): tokens start..end-1
    add `weights[i]` times slot `slot`'s delta at rank `rank` (the adapter's own), their x·A in rows
    off..off+end-start-1 of a [rows, R*M] buffer. Runs may share tokens (composition), never x·A rows."""

    runs: torch.Tensor  # [n, 5] int64, CPU
    weights: torch.Tensor  # [n] float32
    rows: int
    slots: frozenset[int]
    disjoint: bool  # no token in two runs


def _segments(runs: list[tuple[int, int, int, float]], slot_ranks: list[int]) -> Segments | None:
    if not runs:
        return None
    rows, offs = 0, []
    for start, end, _, _ in runs:
        offs.append(rows)
        rows += end - start
    table = [(start, end, slot, slot_ranks[slot], off) for (start, end, slot, _), off in zip(runs, offs, strict=True)]
    spans = sorted((start, end) for start, end, _, _ in runs if end > start)
    disjoint = all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    return Segments(torch.tensor(table, dtype=torch.long), torch.tensor([w for *_, w in runs], dtype=torch.float32),
                    rows, frozenset(slot for _, _, slot, _ in runs), disjoint)


@dataclass(frozen=True)
class Rescale:
    """The DoRA and IA3 tokens of a step: token t's outputs are multiplied by its slot's row scales (plus the
    bias term). `runs` are their maximal (start, end, slot) runs; `span` is (lo, hi) when they are exactly the
    tokens lo..hi-1 (the engine packs a bucket's slots together, so they usually are)."""

    tok: torch.Tensor  # [n] long
    slot: torch.Tensor  # [n] long
    runs: tuple[tuple[int, int, int], ...]
    span: tuple[int, int] | None
    slots: frozenset[int]  # the slots of the runs


@dataclass(frozen=True)
class LoraPlan:
    """Side-path plan of one step (N packed tokens): one part per rank bucket, the merged adapter to
    subtract from the tokens that are not its own, and the projection groups any of them adapts."""

    n_tokens: int
    parts: tuple[LoraPart, ...]
    subtract: tuple[int, int, int] | None  # (start, end, slot): remove a merged adapter from these tokens
    subtract_rank: int
    active: frozenset[int]  # indices of the projection groups with work this step
    rescale: Rescale | None = None  # the DoRA and IA3 tokens, if any
    rescale_groups: frozenset[int] = frozenset()  # the groups those tokens' adapters adapt
    segments: Segments | None = None  # the runs for the CPU kernels

    @property
    def empty(self) -> bool:
        return not self.parts and self.subtract is None and self.segments is None


def _runs(token_slots: list[int], skip: int | None) -> list[tuple[int, int, int]]:
    runs: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(token_slots) + 1):
        if i == len(token_slots) or token_slots[i] != token_slots[start]:
            slot = token_slots[start]
            if slot != NO_ADAPTER and slot != skip:
                runs.append((start, i, slot))
            start = i
    return runs


def _split_by_slot_range(runs: list[tuple[int, int, int]], max_ranges: int) -> list[list[tuple[int, int, int]]]:
    """The bucket's runs split by ranges of consecutive slots, each read as a view of the slot buffers
    (the slot table keeps a bucket in few ranges); one list when they span more than max_ranges."""
    slot_ranges = ranges(sorted({slot for _, _, slot in runs}))
    if len(slot_ranges) == 1 or len(slot_ranges) > max_ranges:
        return [runs]
    range_of = {s: i for i, (start, end) in enumerate(slot_ranges) for s in range(start, end)}
    split: list[list[tuple[int, int, int]]] = [[] for _ in slot_ranges]
    for run in runs:
        split[range_of[run[2]]].append(run)
    return split


def _plan_part(runs: list[tuple[int, int, int]], slot_ranks: list[int], device, max_pad_ratio: float,
               weights: list[float] | None = None) -> LoraPart:
    rank = max(slot_ranks[s] for _, _, s in runs)
    as_runs = LoraPart(runs=tuple(runs), rank=rank, kind="runs", weights=None if weights is None else tuple(weights))
    if len(runs) < 2:
        return as_runs
    per_slot: dict[int, list[int]] = {}
    per_slot_w: dict[int, list[float]] = {}
    for i, (start, end, slot) in enumerate(runs):
        per_slot.setdefault(slot, []).extend(range(start, end))
        if weights is not None:
            per_slot_w.setdefault(slot, []).extend([weights[i]] * (end - start))
    slots = sorted(per_slot)
    length = max(len(v) for v in per_slot.values())
    span = slots[-1] - slots[0] + 1
    dense = span <= 2 * len(slots)
    groups = span if dense else len(slots)
    if groups * length > max_pad_ratio * sum(e - s for s, e, _ in runs) + 8:
        return as_runs

    common = dict(runs=tuple(runs), rank=rank, kind="bmm", groups=groups, group_len=length, slot_lo=slots[0])
    gather = None if dense else torch.tensor(slots, dtype=torch.long, device=device)
    if (weights is None and groups == len(slots) and all(len(v) == length for v in per_slot.values())
            and len(ranges([t for s in slots for t in per_slot[s]])) == 1):
        return LoraPart(bmm_start=per_slot[slots[0]][0], gather_slots=gather, **common)

    order = list(range(slots[0], slots[-1] + 1)) if dense else slots
    toks, pos, tok_w = [], [], []
    for g, slot in enumerate(order):
        members = per_slot.get(slot, [])
        toks += members
        pos += range(g * length, g * length + len(members))
        tok_w += per_slot_w.get(slot, [])
    as_long = dict(dtype=torch.long, device=device)
    return LoraPart(gather_slots=gather, tok_idx=torch.tensor(toks, **as_long), pad_pos=torch.tensor(pos, **as_long),
                    tok_weight=None if weights is None else torch.tensor(tok_w, dtype=torch.float32, device=device),
                    **common)


WeightedRun = tuple[int, int, int, float]  # (start, end, slot, weight): tokens [start, end) add w * their slot's delta


def _weighted_by_bucket(weighted: Sequence[WeightedRun], slot_ranks: list[int]) -> dict[int, list[WeightedRun]]:
    """Weighted runs by rank bucket. In a bucket that also has single-slot runs they join that bucket's part;
    alone they form a part of their own; either way a batched matmul over gathered tokens, each scaled by its
    weight, where the padding allows (a token may be in several groups)."""
    buckets: dict[int, list[WeightedRun]] = {}
    for run in weighted:
        if run[1] > run[0]:
            buckets.setdefault(rank_bucket(slot_ranks[run[2]]), []).append(run)
    return buckets


def plan_lora(
    token_slots: list[int],
    slot_ranks: list[int],
    *,
    slot_groups: Sequence[frozenset[int]],
    weighted: Sequence[WeightedRun] = (),
    rescaled_slots: frozenset[int] = frozenset(),
    merged_slot: int | None = None,
    device: torch.device | str = "cpu",
    max_pad_ratio: float = 4.0,
    max_slot_ranges: int = 4,
    kernel_max_run: int | None = None,
) -> LoraPlan:
    """Plan the side paths of a step.

    token_slots: slot of each packed token (NO_ADAPTER for base-model tokens).
    slot_ranks: rank of the adapter in each slot.
    slot_groups: per slot, the indices of the projection groups its adapter adapts.
    merged_slot: the adapter folded into the weights, if any: its tokens need no side path, and every
    other token must subtract it (a contiguous run of those tokens is required: pack merged rows first).
    weighted: runs of tokens that add a slot's delta times a weight, whatever their token_slots say (the
    merged adapter's too: a token that is not the merged adapter's subtracts it in full first).
    rescaled_slots: slots holding DoRA or IA3 adapters: their tokens' outputs are rescaled after the side paths
    (a merged DoRA adapter is folded with its scales, so it runs alone: no other token may be in the step then).
    Slots of rank 0 (IA3) have no side path.
    A bucket whose slots form up to max_slot_ranges ranges of consecutive slots gets one part per range
    (views of the slot buffers); a more scattered one is one part that gathers its slots' weights.
    kernel_max_run: runs (single-slot and weighted) of at most this many tokens become the plan's `segments`
    (for the CPU kernels); None: every run is planned for torch.
    """
    subtract = None
    subtract_rank = 0
    if merged_slot is not None:
        others = [i for i, s in enumerate(token_slots) if s != merged_slot]
        if others:
            lo, hi = others[0], others[-1] + 1
            if hi - lo != len(others):
                raise ValueError("rows of the merged adapter must be packed first (contiguous others)")
            subtract = (lo, hi, merged_slot)
            subtract_rank = slot_ranks[merged_slot]
    short = kernel_max_run or 0
    kernel_runs: list[tuple[int, int, int, float]] = []
    buckets: dict[int, list[tuple[int, int, int]]] = {}
    for run in _runs(token_slots, merged_slot):
        if slot_ranks[run[2]] > 0 and run[1] - run[0] <= short:
            kernel_runs.append((*run, 1.0))
        elif slot_ranks[run[2]] > 0:
            buckets.setdefault(rank_bucket(slot_ranks[run[2]]), []).append(run)
    kernel_runs += [run for run in weighted if run[1] - run[0] <= short and slot_ranks[run[2]] > 0]
    segments = _segments(kernel_runs, slot_ranks)
    by_bucket = _weighted_by_bucket([run for run in weighted if run[1] - run[0] > short], slot_ranks)
    parts: tuple[LoraPart, ...] = ()
    for bucket, bucket_runs in sorted(buckets.items()):
        extra = by_bucket.pop(bucket, [])
        if extra:  # the bucket's composed tokens join its part: one batched matmul instead of two
            runs = bucket_runs + [(s, e, slot) for s, e, slot, _ in extra]
            weights = [1.0] * len(bucket_runs) + [float(w) for *_, w in extra]
            parts += (_plan_part(runs, slot_ranks, device, max_pad_ratio, weights=weights),)
        else:
            parts += tuple(_plan_part(runs, slot_ranks, device, max_pad_ratio)
                           for runs in _split_by_slot_range(bucket_runs, max_slot_ranges))
    parts += tuple(_plan_part([(s, e, slot) for s, e, slot, _ in runs], slot_ranks, device, max_pad_ratio,
                              weights=[float(w) for *_, w in runs]) for _, runs in sorted(by_bucket.items()))
    if rescaled_slots:
        if subtract is not None and merged_slot in rescaled_slots:
            raise ValueError(f"slot {merged_slot} (DoRA) is merged: no other adapter's tokens may run beside it")
        if any(slot in rescaled_slots for _, _, slot, _ in weighted):
            raise ValueError("a DoRA or IA3 adapter cannot be composed or scaled (its rescale is not linear)")
    used = {slot for part in parts for _, _, slot in part.runs} | ({merged_slot} if subtract else set())
    used |= segments.slots if segments else set()
    rescale = _rescale(token_slots, rescaled_slots - {merged_slot}, device) if rescaled_slots else None
    rescale_groups = frozenset().union(*(slot_groups[s] for s in rescale.slots)) if rescale else frozenset()
    return LoraPlan(n_tokens=len(token_slots), parts=parts, subtract=subtract, subtract_rank=subtract_rank,
                    active=frozenset().union(*(slot_groups[s] for s in used)) | rescale_groups, rescale=rescale,
                    rescale_groups=rescale_groups, segments=segments)


def _rescale(token_slots: list[int], slots: frozenset[int], device) -> Rescale | None:
    runs = [run for run in _runs(token_slots, None) if run[2] in slots]
    if not runs:
        return None
    tok = [t for start, end, _ in runs for t in range(start, end)]
    as_long = dict(dtype=torch.long, device=device)
    span = (tok[0], tok[-1] + 1) if tok[-1] + 1 - tok[0] == len(tok) else None
    return Rescale(torch.tensor(tok, **as_long), torch.tensor([s for a, b, s in runs for _ in range(a, b)], **as_long),
                   tuple(runs), span, frozenset(s for _, _, s in runs))
