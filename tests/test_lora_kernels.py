"""loramux's CPU kernels (server/lora/kernels.py) on their own: each run's product against plain torch, and
the refusals of runs that would read or write outside their tensors (nothing is written then).

Their use inside whole plans (merged, weighted, poisoned slots, every case of the planner) is in
test_lora_ops.py; inside the model, against PEFT, in test_lora_peft.py and test_dora.py."""

from __future__ import annotations

import pytest
import torch

from server.lora import kernels

S, R, M, D_IN, D_OUT = 4, 16, 2, 40, 72  # widths that are not multiples of the vectors: the tails run too


@pytest.fixture(scope="module", autouse=True)
def built():
    assert kernels.load(), "the LoRA CPU kernels did not build (see the warning)"


def tensors(seed: int = 0, dtype: torch.dtype = torch.float32):
    """x [9, D_IN], A [S, R, M, D_IN], B [S, R, D_OUT] in `dtype` (the slot weights' and x's)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(9, D_IN, generator=g).to(dtype), torch.randn(S, R, M, D_IN, generator=g).to(dtype),
            torch.randn(S, R, D_OUT, generator=g).to(dtype))


WEIGHT_DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16_weights"])


RUNS = [(0, 3, 2, 16, 0), (3, 4, 0, 5, 3), (4, 9, 3, 1, 4), (1, 3, 1, 7, 9)]  # the last overlaps the first's tokens
WEIGHTS = [1.0, -1.0, 0.25, 2.0]


@WEIGHT_DTYPES
def test_each_run_adds_its_own_slot_at_its_own_rank(dtype):
    """bf16 x, A and B are widened exactly and summed in float32: the float64 product of the same values."""
    x, A, B = tensors(0, dtype)
    runs = torch.tensor(RUNS)
    xa = kernels.shrink(x, A, runs, 11)
    assert xa.dtype == torch.float32
    y = torch.randn(9, D_OUT)
    ref = y.double().clone()
    for j in range(M):
        yj = y.clone()
        kernels.expand(yj, xa, B, runs, torch.tensor(WEIGHTS), j, M)
        ref_j = ref.clone()
        for (start, end, slot, rank, off), w in zip(RUNS, WEIGHTS, strict=True):
            a = A[slot, :rank, j].double()  # [rank, d_in]
            xa_ref = x[start:end].double() @ a.T
            torch.testing.assert_close(xa[off : off + end - start].view(-1, R, M)[:, :rank, j].double(), xa_ref,
                                       atol=1e-4, rtol=1e-5)
            ref_j[start:end] += w * xa_ref @ B[slot, :rank].double()
        torch.testing.assert_close(yj.double(), ref_j, atol=1e-4, rtol=1e-5)


def test_a_bf16_output_takes_each_runs_float32_sum_rounded_once():
    """Disjoint runs into a bf16 y: bit for bit what adding a float32 buffer of the same sums into y gives."""
    x, A, B = tensors(1)
    disjoint = [run for run in RUNS if run[0] != 1]
    runs, weights = torch.tensor(disjoint), torch.tensor(WEIGHTS[: len(disjoint)])
    xa = kernels.shrink(x, A, runs, 11)
    y = (torch.randn(9, D_OUT, generator=torch.Generator().manual_seed(2)) * 8).bfloat16()
    for j in range(M):
        direct = y.clone()
        kernels.expand(direct, xa, B, runs, weights, j, M)
        sums = torch.zeros(9, D_OUT)
        kernels.expand(sums, xa, B, runs, weights, j, M)
        assert torch.equal(direct, y.clone().add_(sums))
        assert not torch.equal(direct, y)


LONG_RUNS = [(0, 37, 2, 16, 0), (37, 38, 0, 5, 37), (38, 59, 3, 3, 38), (3, 25, 1, 7, 59)]  # prefill's lengths


@pytest.mark.parametrize("y_dtype", [torch.float32, torch.bfloat16], ids=["y_fp32", "y_bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16_x_and_weights"])
def test_long_runs_split_over_blocks_and_tiles(dtype, y_dtype):
    """Runs of many tokens (several of the kernels' 16-token blocks and 4-token tiles, with partial ones; one
    overlapping another) equal the float64 product of the same values; a bf16 y is within its own rounding."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(59, D_IN, generator=g).to(dtype)
    _, A, B = tensors(4, dtype)
    runs, weights = torch.tensor(LONG_RUNS), torch.tensor([1.0, 0.5, -1.0, 2.0])
    xa = kernels.shrink(x, A, runs, 81)
    y = torch.randn(59, D_OUT, generator=g).to(y_dtype)
    for j in range(M):
        yj = y.clone()
        kernels.expand(yj, xa, B, runs, weights, j, M)
        ref = y.double().clone()
        for (start, end, slot, rank, off), w in zip(LONG_RUNS, weights.tolist(), strict=True):
            xa_ref = x[start:end].double() @ A[slot, :rank, j].double().T
            torch.testing.assert_close(xa[off : off + end - start].view(-1, R, M)[:, :rank, j].double(), xa_ref,
                                       atol=1e-4, rtol=1e-5)
            ref[start:end] += w * xa_ref @ B[slot, :rank].double()
        # a bf16 y: each run's sum rounded once into it (rows 3..24 twice), each rounding within 2^-8 of the largest
        bf16_bound = 2 * 2**-8 * float(ref.abs().max())
        tol = dict(atol=1e-4, rtol=1e-5) if y_dtype == torch.float32 else dict(atol=bf16_bound, rtol=0)
        torch.testing.assert_close(yj.double(), ref, **tol)
        assert (yj.double() - y.double()).abs().max() > 10 * tol["atol"]  # the runs' products are far larger


@WEIGHT_DTYPES
def test_member_ranks_bound_what_each_member_reads(dtype):
    """member_ranks: a run reads member m's A and B rows only up to its slot's rank for m (0: none at all); the
    rows past it hold NaN here and reach no output."""
    x, A, B = tensors(3, dtype)
    member_ranks = torch.tensor([[3, 0], [7, 7], [16, 9], [0, 1]])  # [S, M]
    for slot in range(S):
        for j in range(M):
            A[slot, member_ranks[slot, j]:, j] = float("nan")
    B_member = [B.clone() for _ in range(M)]  # each member's B, NaN past that member's rank
    for j, b in enumerate(B_member):
        for slot in range(S):
            b[slot, member_ranks[slot, j]:] = float("nan")
    runs = torch.tensor(RUNS)
    xa = kernels.shrink(x, A, runs, 11, member_ranks)
    y = torch.randn(9, D_OUT)
    for j in range(M):
        yj = y.clone()
        kernels.expand(yj, xa, B_member[j], runs, torch.tensor(WEIGHTS), j, M, member_ranks)
        ref = y.double().clone()
        for (start, end, slot, rank, _), w in zip(RUNS, WEIGHTS, strict=True):
            r = min(rank, int(member_ranks[slot, j]))
            ref[start:end] += w * (x[start:end].double() @ A[slot, :r, j].double().T) @ B_member[j][slot, :r].double()
        torch.testing.assert_close(yj.double(), ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("ranks, message", [
    (torch.tensor([[3, 0], [7, 7], [17, 9], [0, 1]]), r"member_ranks\[2, 0\] = 17 outside 0..16"),
    (torch.tensor([[3, 0], [7, -1], [1, 9], [0, 1]]), r"member_ranks\[1, 1\] = -1"),
    (torch.zeros(3, 2, dtype=torch.long), r"member_ranks must be a contiguous \[4, 2\] int64"),
    (torch.zeros(4, 2, dtype=torch.int32), r"member_ranks must be a contiguous \[4, 2\] int64"),
])
def test_bad_member_ranks_are_refused_and_nothing_written(ranks, message):
    x, A, B = tensors()
    runs = torch.tensor(RUNS)
    with pytest.raises(RuntimeError, match=message):
        kernels.shrink(x, A, runs, 11, ranks)
    xa = kernels.shrink(x, A, runs, 11)
    y = torch.randn(9, D_OUT)
    before = y.clone()
    with pytest.raises(RuntimeError, match=message):
        kernels.expand(y, xa, B, runs, torch.tensor(WEIGHTS), 0, M, ranks)
    assert torch.equal(y, before)


def test_no_runs_leave_y_unchanged():
    x, A, B = tensors()
    none = torch.zeros(0, 5, dtype=torch.long)
    y = torch.randn(9, D_OUT)
    before = y.clone()
    kernels.expand(y, kernels.shrink(x, A, none, 0), B, none, torch.zeros(0), 0, M)
    assert torch.equal(y, before)


BAD_RUNS = {
    "tokens past the end": ((0, 10, 0, 4, 0), "tokens 0..10 outside 0..9"),
    "reversed tokens": ((5, 3, 0, 4, 0), "tokens 5..3"),
    "slot past the buffers": ((0, 2, 4, 4, 0), "slot 4 outside 0..4"),
    "negative slot": ((0, 2, -1, 4, 0), "slot -1"),
    "rank past the buffers": ((0, 2, 1, 17, 0), "rank 17 outside 0..16"),
    "rows past x·A": ((0, 4, 1, 4, 8), "rows 8\\+4 outside 0..9"),
}


@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_a_run_outside_its_tensors_is_refused_and_nothing_written(case):
    run, message = BAD_RUNS[case]
    x, A, B = tensors()
    runs = torch.tensor([run])
    with pytest.raises(RuntimeError, match=message):
        kernels.shrink(x, A, runs, 9)
    xa = torch.zeros(9, R * M)
    y = torch.randn(9, D_OUT)
    before = y.clone()
    with pytest.raises(RuntimeError, match=message):
        kernels.expand(y, xa, B, runs, torch.ones(1), 0, M)
    assert torch.equal(y, before)


def test_tensors_of_the_wrong_kind_are_refused():
    x, A, B = tensors()
    runs = torch.tensor(RUNS)
    with pytest.raises(RuntimeError, match="x must be a 2-d float32 or bfloat16"):
        kernels.shrink(x.half(), A.half(), runs, 11)
    with pytest.raises(RuntimeError, match="A must be contiguous"):
        kernels.shrink(x, A.transpose(0, 1), runs, 11)
    with pytest.raises(RuntimeError, match="x has 39 features, A 40"):
        kernels.shrink(x[:, :39], A, runs, 11)
    with pytest.raises(RuntimeError, match=r"runs must be a contiguous \[n, 5\] int64"):
        kernels.shrink(x, A, runs.int(), 11)
    xa = kernels.shrink(x, A, runs, 11)
    y = torch.zeros(9, D_OUT)
    with pytest.raises(RuntimeError, match="one weight per run"):
        kernels.expand(y, xa, B, runs, torch.ones(3), 0, M)
    with pytest.raises(RuntimeError, match="is not the shrink of 3 members"):
        kernels.expand(y, xa, B, runs, torch.ones(4), 0, 3)
    with pytest.raises(RuntimeError, match="y has 71 columns, B 72"):
        kernels.expand(y[:, :71], xa, B, runs, torch.ones(4), 0, M)
    with pytest.raises(RuntimeError, match="y must be a 2-d float32 or bfloat16"):
        kernels.expand(y.half(), xa, B, runs, torch.ones(4), 0, M)
    with pytest.raises(RuntimeError, match="B must be a 3-d float32 or bfloat16"):
        kernels.expand(y, xa, B.half(), runs, torch.ones(4), 0, M)
    with pytest.raises(RuntimeError, match="xa must be a 2-d float32 CPU"):
        kernels.expand(y, xa.bfloat16(), B, runs, torch.ones(4), 0, M)
    assert not y.any()
