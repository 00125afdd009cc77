"""LoRA side-path math for a group of projections that read the same input (pure tensor code).

Buffers of one group of M projections over S slots:
    A:    [S, r_max, M, d_in]   (rank-major so that slicing to the batch's rank stays a view)
    B[j]: [S, r_max, d_out_j]   (B transposed, pre-scaled by the adapter's s = alpha/r for that module)
x and the buffers share one dtype; y may have another (a bf16 model with fp32 side paths on CPU): a
member's products are then summed in the buffers' dtype and added into y once, in its own. Buffers of y's own
dtype (bf16 slot weights of a bf16 model on CPU, the model's dtype on CUDA) add each product into y.

Semantics, as a plain loop (the test oracle `tests/lora_reference.py` is exactly this):

    for t in range(N):
        s = token_slots[t]
        if s >= 0 and s != merged:  y_j[t] += (A[s, :, j] @ x[t]) @ B[j][s]
        if merged is not None and s != merged:  y_j[t] -= (A[merged, :, j] @ x[t]) @ B[j][merged]
        for (slot, w) in weighted[t]:  y_j[t] += w * (A[slot, :, j] @ x[t]) @ B[j][slot]

The shrink (x @ A) is done once for all M members; each member then expands its own slice. A decode step
calls these for every group of every layer, a few thousand small products: the buffer views they read are
made once and kept (`BufferViews`), since the buffers never move. The plan's kernel runs (`segments`, on CPU)
go to loramux's kernels instead: one call per group, one per member (server/lora/kernels.py); where they
are a member's only side path and no token is in two of them, a bf16 y takes the kernel's sums directly (the
same single rounding, without the float32 buffer).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from server.lora import kernels
from server.lora.plan import LoraPart, LoraPlan, Rescale


@dataclass
class BufferViews:
    """Views of one group's buffers by (what, slot range, rank): sliced once, read every step."""

    A: torch.Tensor
    B: list[torch.Tensor]
    member_ranks: torch.Tensor | None = None  # [S, M] int64 CPU: each slot's rank per member (for the kernels)
    _cache: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)

    def a(self, lo: int, n: int, r: int) -> torch.Tensor:
        """A of slots lo..lo+n-1 at rank r: [n, r*M, d_in] (a single slot: [r*M, d_in] for n == 0)."""
        key = ("a", lo, n, r)
        view = self._cache.get(key)
        if view is None:
            d_in = self.A.shape[-1]
            view = self.A[lo, :r].reshape(-1, d_in) if n == 0 else self.A[lo : lo + n, :r].reshape(n, -1, d_in)
            self._cache[key] = view
        return view

    def b(self, member: int, lo: int, n: int, r: int) -> torch.Tensor:
        """B of one member, slots lo..lo+n-1 at rank r: [n, r, d_out] ([r, d_out] for n == 0)."""
        key = ("b", member, lo, n, r)
        view = self._cache.get(key)
        if view is None:
            b = self.B[member]
            view = b[lo, :r] if n == 0 else b[lo : lo + n, :r]
            self._cache[key] = view
        return view


@dataclass
class ShrunkPart:
    """x·A of one rank bucket, in the layout of its plan."""

    runs: list[torch.Tensor]  # per run: [M, n_run, r]
    bmm: torch.Tensor | None  # [M, G, L, r] (each member's slice contiguous for its expand)


@dataclass
class Shrunk:
    """x·A for one step of one group."""

    parts: list[ShrunkPart]
    subtract: torch.Tensor | None  # [M, n_sub, r_sub]
    segments: torch.Tensor | None = None  # [rows, R*M]: x·A of the plan's segments (rank-major, as A)


def _members_first(xa: torch.Tensor, m: int) -> torch.Tensor:
    # [..., r*M] (rank-major) -> [M, ..., r], contiguous
    return xa.unflatten(-1, (-1, m)).movedim(-1, 0).contiguous()


def _shrink_part(x: torch.Tensor, views: BufferViews, part: LoraPart) -> ShrunkPart:
    m, r = views.A.shape[2], part.rank
    if part.kind != "bmm":
        return ShrunkPart([_members_first(x[s:e] @ views.a(slot, 0, r).T, m) for s, e, slot in part.runs], None)
    g, length = part.groups, part.group_len
    if part.gather_slots is None:
        a = views.a(part.slot_lo, g, r)  # [G, r*M, d_in] view
    else:
        a = views.A[:, :r].index_select(0, part.gather_slots).reshape(g, r * m, -1)  # only the bucket's rank
    if part.tok_idx is None:
        xg = x[part.bmm_start : part.bmm_start + g * length].view(g, length, -1)  # [G, L, d_in]
    else:  # the part's tokens in a zeroed buffer: padding rows hold no other row's values
        rows = x.index_select(0, part.tok_idx)  # [n, d_in]
        if part.tok_weight is not None:  # weighted runs: w * x (the delta is linear in x)
            rows = rows.mul_(part.tok_weight.to(rows.dtype).unsqueeze(1))
        xg = x.new_zeros(g * length, x.shape[1]).index_copy_(0, part.pad_pos, rows)
        xg = xg.view(g, length, -1)
    xa = torch.bmm(xg, a.transpose(1, 2))  # [G, L, r*M]
    return ShrunkPart([], _members_first(xa, m))


def _add_product(y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> None:
    """y += alpha * a @ b in place, fused (2-D or batched 3-D; y has the operands' dtype)."""
    if a.dim() == 3:
        y.baddbmm_(a, b, alpha=alpha)
    else:
        y.addmm_(a, b, alpha=alpha)


def shrink(x: torch.Tensor, views: BufferViews, plan: LoraPlan) -> Shrunk:
    """x: [N, d_in] -> the low-rank activations of every part (and of the merged adapter to subtract)."""
    sub = None
    if plan.subtract is not None:
        start, end, slot = plan.subtract
        sub = _members_first(x[start:end] @ views.a(slot, 0, plan.subtract_rank).T, views.A.shape[2])
    seg = plan.segments
    xa = None if seg is None else kernels.shrink(x, views.A, seg.runs, seg.rows, views.member_ranks)
    return Shrunk([_shrink_part(x, views, part) for part in plan.parts], sub, xa)


def _expand_part(acc: torch.Tensor, s: ShrunkPart, member: int, views: BufferViews, part: LoraPart) -> None:
    r = part.rank
    if s.bmm is None:
        weights = part.weights or (1.0,) * len(part.runs)
        for (start, end, slot), xa, w in zip(part.runs, s.runs, weights, strict=True):
            _add_product(acc[start:end], xa[member], views.b(member, slot, 0, r), alpha=w)
        return
    g, length = part.groups, part.group_len
    if part.gather_slots is None:
        b = views.b(member, part.slot_lo, g, r)  # [G, r, d_out] view
    else:
        b = views.B[member][:, :r].index_select(0, part.gather_slots)
    if part.tok_idx is None:  # the part's rows, in place: [G, L, d_out]
        _add_product(acc[part.bmm_start : part.bmm_start + g * length].view(g, length, -1), s.bmm[member], b)
    else:  # only the rows that hold the part's tokens are added back, each into its own token
        delta = torch.bmm(s.bmm[member], b).view(g * length, -1)  # [G*L, d_out]
        acc.index_add_(0, part.tok_idx, delta.index_select(0, part.pad_pos))


def expand(y: torch.Tensor, s: Shrunk, member: int, views: BufferViews, plan: LoraPlan) -> None:
    """y: [N, d_out] += this member's side paths (in place)."""
    seg = plan.segments
    # one rounding into y: a y of another dtype takes a buffer of the sums, except where the kernel's disjoint
    # runs are the only side path and y is bf16 (the kernel rounds each run's sum into y itself)
    kernel_only = s.segments is not None and not s.parts and s.subtract is None and seg.disjoint
    buffered = y.dtype != views.A.dtype and not (kernel_only and y.dtype == torch.bfloat16)
    acc = torch.zeros(y.shape, dtype=views.A.dtype, device=y.device) if buffered else y
    for shrunk, part in zip(s.parts, plan.parts, strict=True):
        _expand_part(acc, shrunk, member, views, part)
    if s.subtract is not None:
        start, end, slot = plan.subtract
        _add_product(acc[start:end], s.subtract[member], views.b(member, slot, 0, plan.subtract_rank), alpha=-1)
    if s.segments is not None:
        kernels.expand(acc, s.segments, views.B[member], seg.runs, seg.weights, member, views.A.shape[2],
                       views.member_ranks)
    if buffered:
        y.add_(acc)


def rescale(y: torch.Tensor, r: Rescale, G: torch.Tensor, C: torch.Tensor | None) -> None:
    """DoRA and IA3 rows, in place: y[t] = y[t] * G[slot_t] (+ C[slot_t]) for the plan's rescaled tokens.

    y: [N, d_out]; G, C: [S, d_out] (the side-path dtype). A few runs are scaled in place by their slot's row;
    otherwise the rows are gathered (or sliced, for one span), scaled and written back."""
    if len(r.runs) <= 4 and y.dtype == G.dtype:
        for start, end, slot in r.runs:
            y[start:end].mul_(G[slot])
            if C is not None:
                y[start:end].add_(C[slot])
        return
    g = G.index_select(0, r.slot)  # [n, d_out]
    rows = y[r.span[0] : r.span[1]] if r.span is not None else y.index_select(0, r.tok)
    out = rows.to(G.dtype).mul(g)
    if C is not None:
        out.add_(C.index_select(0, r.slot))
    if r.span is not None:
        rows.copy_(out)
    else:
        y.index_copy_(0, r.tok, out.to(y.dtype))
