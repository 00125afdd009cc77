"""The fast side paths against the plain per-token loop, for every plan the planner makes: torch's batched
matmuls, loramux's CPU kernels for every run (as the runner plans on CPU), and both beside each other (runs
of up to 16 tokens to the kernels: `kernel_max_run`; server/lora/kernels.py)."""

from __future__ import annotations

import random

import pytest
import torch
from lora_reference import lora_reference

from server.lora import kernels
from server.lora.ops import BufferViews, expand, shrink
from server.lora.plan import NO_ADAPTER, plan_lora
from server.lora.slots import place_slot

S, R, M, D_IN = 6, 8, 3, 32
D_OUT = [32, 16, 16]


GROUPS = [frozenset({0})] * S  # every slot adapts the one group of these tests
PATHS = {"torch": None, "kernels": kernels.MAX_RUN, "short_kernels": 16}  # 16: the long_runs case mixes both


@pytest.fixture(params=list(PATHS))
def kernel_max_run(request) -> int | None:
    """Each test through torch's matmuls, through the kernels, and with the short runs through the kernels (built
    here: CI has the C++ compiler, so a failed build fails the test)."""
    if PATHS[request.param] is not None:
        assert kernels.load(), "the LoRA CPU kernels did not build (see the warning)"
    return PATHS[request.param]


def plan_lora_batch(token_slots, slot_ranks, **kwargs):
    return plan_lora(token_slots, slot_ranks, slot_groups=GROUPS, **kwargs)


def buffers(seed: int):
    g = torch.Generator().manual_seed(seed)
    ranks = [2, 8, 4, 8, 6, 1]
    A = torch.zeros(S, R, M, D_IN)
    B = [torch.zeros(S, R, d) for d in D_OUT]
    for s, r in enumerate(ranks):
        A[s, :r] = torch.randn(r, M, D_IN, generator=g)
        for b in B:
            b[s, :r] = torch.randn(r, b.shape[2], generator=g)
    return A, B, ranks


CASES = {
    "one_run": [3] * 7,
    "aligned_view": [1, 1, 2, 2, 3, 3, 4, 4],
    "aligned_with_base_prefix": [NO_ADAPTER, NO_ADAPTER, 0, 1, 2, 3],
    "padded_view": [0, 0, 0, 1, 2, 2, 3],
    "sparse_gather": [0, 5, 5, 0],
    "aligned_gather": [0, 0, 5, 5],
    "padded_gather": [0, 0, 5, 5, 5],
    "shuffled": [2, NO_ADAPTER, 4, 2, 1, 4, 1, NO_ADAPTER, 3, 0],
    "long_runs": [0] * 100 + [1, 2, 3, 4, 5],
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("merged", [None, 2])
@pytest.mark.parametrize("one_bucket", [False, True], ids=["true_ranks", "one_bucket"])
@pytest.mark.parametrize("max_ranges", [4, 1], ids=["split_by_slot_range", "gathered"])
@pytest.mark.parametrize("y_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "fp32_into_bf16"])
def test_fast_path_equals_reference(case, merged, one_bucket, max_ranges, y_dtype, kernel_max_run):
    """y_dtype bf16: a bf16 model's outputs with fp32 side paths (as on CPU) get the delta added in bf16."""
    A, B, ranks = buffers(0)
    if one_bucket:  # plan every slot at the full rank (rows past an adapter's rank are zero)
        ranks = [R] * S
    slots = list(CASES[case])
    if merged is not None:  # merged rows must be packed first
        slots = [merged] * 2 + [s for s in slots if s != merged]
    x = torch.randn(len(slots), D_IN, generator=torch.Generator().manual_seed(1))
    plan = plan_lora_batch(slots, ranks, merged_slot=merged, max_slot_ranges=max_ranges,
                           kernel_max_run=kernel_max_run)
    assert (plan.segments is not None) == (kernel_max_run is not None)
    if plan.segments is not None:
        assert plan.segments.disjoint  # one slot per token (the merged subtraction is not a segment)
    assert_expands_to_reference(x, slots, A, B, plan, y_dtype, seed=2, merged_slot=merged)


def assert_expands_to_reference(x, slots, A, B, plan, y_dtype, seed: int, **reference) -> None:
    """shrink + expand of every member into random base outputs of y_dtype equal the float64 loop."""
    views = BufferViews(A, B)
    shrunk = shrink(x, views, plan)
    for j in range(M):
        base = torch.randn(len(slots), D_OUT[j], generator=torch.Generator().manual_seed(seed)).to(y_dtype)
        y = base.clone()
        expand(y, shrunk, j, views, plan)
        ref = base.double() + lora_reference(x, slots, A, B[j], j, **reference)
        if y_dtype == torch.float32:
            torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-5)
        else:  # bf16 roundings of the sums (two where a merged delta is subtracted)
            torch.testing.assert_close(y.double(), ref, atol=2**-7 * ref.abs().max().item(), rtol=0)


def test_planner_picks_the_batched_paths():
    same_rank = [8] * S
    (part,) = plan_lora_batch(CASES["aligned_view"], same_rank).parts
    assert part.kind == "bmm" and part.tok_idx is None
    assert plan_lora_batch(CASES["padded_view"], same_rank).parts[0].pad_pos is not None
    assert plan_lora_batch(CASES["sparse_gather"], same_rank, max_slot_ranges=1).parts[0].gather_slots is not None
    (part,) = plan_lora_batch([0, 0, 5, 5], same_rank, max_slot_ranges=1).parts  # gathered, contiguous tokens
    assert part.gather_slots is not None and part.tok_idx is None and part.group_len == 2
    split = plan_lora_batch([0, 0, 1, 1, 4, 4], same_rank).parts  # slot ranges 0-1 and 4: views, no gather
    assert [(p.kind, p.gather_slots, p.tok_idx, p.runs) for p in split] == [
        ("bmm", None, None, ((0, 2, 0), (2, 4, 1))), ("runs", None, None, ((4, 6, 4),))]
    assert plan_lora_batch(CASES["long_runs"], same_rank).parts[0].kind == "runs"
    assert plan_lora_batch([NO_ADAPTER] * 4, same_rank).empty


def test_ranks_are_bucketed_not_padded_to_the_largest():
    ranks = [2, 8, 4, 64, 6, 1]
    plan = plan_lora_batch([0, 1, 2, 3, 4, 5], ranks)
    assert [(p.rank, sorted(s for _, _, s in p.runs)) for p in plan.parts] == [
        (1, [5]), (2, [0]), (4, [2]), (8, [1]), (6, [4]), (64, [3])]


def fill(n_slots: int, ranks: list[int]) -> list[int]:
    slot_ranks = [0] * n_slots
    for r in ranks:
        free = [s for s, held in enumerate(slot_ranks) if not held]
        slot = place_slot(slot_ranks, r, free)
        assert slot in free
        slot_ranks[slot] = r
    return slot_ranks


def test_placement_keeps_rank_buckets_contiguous():
    # 16 adapters arriving with ranks cycling 4..64 (the engine benchmark's W1)
    assert fill(16, [4, 8, 16, 32, 64] * 3 + [4]) == [4, 4, 4, 32, 32, 32, 16, 16, 16, 4, 64, 64, 64, 8, 8, 8]
    assert fill(8, [8, 16] * 4) == [8, 8, 8, 8, 16, 16, 16, 16]
    assert fill(4, [16] * 4) == [16] * 4


def test_placement_picks_a_free_slot_whatever_the_table():
    rng = random.Random(0)
    for _ in range(200):
        slot_ranks = [rng.choice([0, 0, 4, 8, 16, 64]) for _ in range(rng.randint(1, 12))]
        free = [s for s, r in enumerate(slot_ranks) if not r]
        if free:
            assert place_slot(slot_ranks, rng.choice([1, 4, 8, 16, 64]), free) in free


def test_merged_rows_must_come_first():
    _, _, ranks = buffers(0)
    with pytest.raises(ValueError, match="packed first"):
        plan_lora_batch([0, 2, 1, 2], ranks, merged_slot=2)


def test_random_batches(kernel_max_run):
    A, B, ranks = buffers(5)
    rng = random.Random(0)
    for _ in range(30):
        slots = [rng.choice([NO_ADAPTER, *range(S)]) for _ in range(rng.randint(1, 24))]
        if rng.random() < 0.5:
            slots.sort()
        x = torch.randn(len(slots), D_IN)
        plan = plan_lora_batch(slots, ranks, kernel_max_run=kernel_max_run and rng.choice([1, 2, 16]))
        views = BufferViews(A, B)
        shrunk = shrink(x, views, plan)
        y = torch.zeros(len(slots), D_OUT[0])
        expand(y, shrunk, 0, views, plan)
        torch.testing.assert_close(y.double(), lora_reference(x, slots, A, B[0], 0), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("merged", [None, 2])
@pytest.mark.parametrize("one_bucket", [False, True], ids=["true_ranks", "one_bucket"])
@pytest.mark.parametrize("max_ranges", [4, 1], ids=["split_by_slot_range", "gathered"])
def test_a_poisoned_slot_reaches_no_other_token(case, merged, one_bucket, max_ranges, kernel_max_run):
    """A slot whose weights are NaN/Inf: every token of another slot (or of none) gets exactly its clean result,
    in every path the planner picks (views, gathers, padded groups); no masking by multiplying with zero."""
    slots = list(CASES[case])
    if merged is not None:
        slots = [merged] * 2 + [s for s in slots if s != merged]
    for poisoned in sorted({s for s in slots if s not in (merged, NO_ADAPTER)}):
        _check_poisoned(slots, poisoned, merged, one_bucket, max_ranges, kernel_max_run)


def _check_poisoned(slots: list[int], poisoned: int, merged: int | None, one_bucket: bool, max_ranges: int,
                    kernel_max_run: int | None) -> None:
    A, B, ranks = buffers(0)
    if one_bucket:
        ranks = [R] * S
    clean_A, clean_B = A.clone(), [b.clone() for b in B]
    A[poisoned, :, 0] = float("nan")
    for j, b in enumerate(B):
        b[poisoned, 0] = float("inf") if j % 2 else float("nan")
    x = torch.randn(len(slots), D_IN, generator=torch.Generator().manual_seed(1))
    plan = plan_lora_batch(slots, ranks, merged_slot=merged, max_slot_ranges=max_ranges,
                           kernel_max_run=kernel_max_run)
    views = BufferViews(A, B)
    shrunk = shrink(x, views, plan)
    for j in range(M):
        y = torch.zeros(len(slots), D_OUT[j])
        expand(y, shrunk, j, views, plan)
        ref = lora_reference(x, slots, clean_A, clean_B[j], j, merged_slot=merged)
        for t, s in enumerate(slots):
            if s == poisoned:
                assert not torch.isfinite(y[t]).all()
            else:
                torch.testing.assert_close(y[t].double(), ref[t], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("case", ["one_run", "aligned_view", "shuffled", "sparse_gather"])
@pytest.mark.parametrize("merged", [None, 2])
@pytest.mark.parametrize("y_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "fp32_into_bf16"])
def test_weighted_runs_equal_reference(case, merged, y_dtype, kernel_max_run):
    """Composed tokens (no single slot; several weighted slots, the merged one among them) beside the case's
    single-slot tokens, and a weighted run over tokens that have a slot of their own."""
    A, B, ranks = buffers(3)
    slots = list(CASES[case])
    if merged is not None:
        slots = [merged] * 2 + [s for s in slots if s != merged]
    n = len(slots)
    slots += [NO_ADAPTER] * 3
    weighted = [(n, n + 3, 1, 0.7), (n, n + 3, 4, 0.3), (n + 1, n + 2, 2, -0.5), (0, 2, 5, 1.5)]
    x = torch.randn(len(slots), D_IN, generator=torch.Generator().manual_seed(4))
    plan = plan_lora_batch(slots, ranks, merged_slot=merged, weighted=weighted, kernel_max_run=kernel_max_run)
    assert plan.active == frozenset({0})
    if kernel_max_run is None:
        assert any(p.kind == "bmm" and p.tok_weight is not None for p in plan.parts)  # slots 1 and 4: one bucket
    else:  # every weighted run is short: each is a segment with its weight
        seg = plan.segments
        assert not seg.disjoint  # composed tokens sit in several runs: a bf16 y takes one float32 sum of them all
        table = {(a, b, c): w for (a, b, c, _, _), w in zip(seg.runs.tolist(), seg.weights.tolist(), strict=True)}
        assert all(table[run[:3]] == pytest.approx(run[3]) for run in weighted)
    assert_expands_to_reference(x, slots, A, B, plan, y_dtype, seed=5, merged_slot=merged, weighted=weighted)


def test_a_weighted_run_alone_activates_its_groups():
    groups = [frozenset({0}), frozenset({1, 2})] + [frozenset()] * (S - 2)
    plan = plan_lora([NO_ADAPTER] * 4, [8] * S, slot_groups=groups, weighted=[(1, 3, 1, 0.5)])
    assert not plan.empty and plan.active == frozenset({1, 2})
    assert plan.parts[0].weights == (0.5,) and plan.parts[0].runs == ((1, 3, 1),)
