"""LoRA-aware projections: the layer contract of the LoRA runtime.

As in vLLM's ``vllm/lora/`` layers: each targetable projection is replaced once at start-up by a
``LoraProjection``; its ``ProjectionGroup`` creates the slot buffers, writes or clears a slot
(``write`` / ``clear``), and adds the side paths of the step in progress, read from the step context
(``apply``). Projections that read the same input (q/k/v, gate/up) share one group, so the shrink x·A is
computed once for all of them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from adapters_store.errors import AdapterValidationError
from adapters_store.format import LoraAdapter, ModuleShape
from server.gemm import PackedLinear
from server.lora.ops import BufferViews, expand, rescale, shrink
from server.step_context import ForwardContext

MAX_DORA_SCALE = 1024.0  # |m / ||W + s·B·A|| | of a DoRA module against the base model it is served on


class ProjectionGroup:
    """Slot buffers of M projections that read the same input, and their side paths.

    A: [S, r_max, M, d_in]; B[j]: [S, r_max, d_out_j] (B transposed, pre-scaled by the module's scale), in
    `dtype`; the scales G, C, L below in `scale_dtype` (by default `dtype`).
    DoRA: G[j]: [S, d_out_j] the row scales m / ||W0 + s·B·A||_row (1 for other slots), and, for a projection
    with a bias b, C[j] = b·(1 - G[j]); a DoRA token's output is then y·G + C = b + G ⊙ (W0·x + s·B·A·x),
    PEFT's DoRA forward (its norm is computed once, when the adapter enters the slot).
    IA3 (rank 0): an output vector l is G[j] (with C = 0: PEFT scales the bias too); an input vector, for a
    feed-forward module, is L[j]: [S, d_in], and its tokens add W0·((l - 1) ⊙ x).
    """

    def __init__(self, index: int, names: list[str], shapes: list[ModuleShape], n_slots: int, max_rank: int,
                 device: torch.device, dtype: torch.dtype, context: ForwardContext,
                 biases: list[torch.Tensor | None] | None = None, scale_dtype: torch.dtype | None = None):
        self.index = index
        self.names = names
        self.shapes = shapes
        self.context = context
        self.A = torch.zeros(n_slots, max_rank, len(names), shapes[0].d_in, device=device, dtype=dtype)
        self.B = [torch.zeros(n_slots, max_rank, sh.d_out, device=device, dtype=dtype) for sh in shapes]
        kw = dict(device=device, dtype=scale_dtype or dtype)
        self.G = [torch.ones(n_slots, sh.d_out, **kw) for sh in shapes]
        self.biases = biases or [None] * len(names)
        self.C = [None if b is None else torch.zeros(n_slots, sh.d_out, **kw)
                  for b, sh in zip(self.biases, shapes, strict=True)]
        self.L = [torch.ones(n_slots, sh.d_in, **kw) for sh in shapes]  # IA3 input scales (feed-forward modules)
        self.input_slots: list[set[int]] = [set() for _ in names]  # per member: slots with IA3 input scales
        self.original: Callable[[str], torch.Tensor] | None = None  # unmerged base weight by name (the runtime's)
        self.member_ranks = torch.zeros(n_slots, len(names), dtype=torch.long)  # the rank each slot holds per member
        self.views = BufferViews(self.A, self.B, self.member_ranks)

    def write(self, slot: int, adapter: LoraAdapter) -> bool:
        """Copy the adapter's weights of this group's members into `slot` (and, for DoRA, compute their row
        scales against `self.original(name)`, the unmerged base weight); False if it adapts none of them."""
        self.clear(slot)
        found = False
        for j, name in enumerate(self.names):
            w = adapter.weights.get(name)
            if w is None:
                continue
            r = w.A.shape[0]
            self.member_ranks[slot, j] = r
            self.A[slot, :r, j].copy_(w.A)
            self.B[j][slot, :r].copy_(w.B.float().mul(w.scale).T)
            if w.magnitude is not None:
                self._write_dora(j, slot, w, self.original(name), adapter.id)
            if w.ia3 is not None and w.ia3_input:
                self.L[j][slot].copy_(w.ia3)
                self.input_slots[j].add(slot)
            elif w.ia3 is not None:  # IA3 scales the output, bias included: G = l, C = 0
                self.G[j][slot].copy_(w.ia3)
            found = True
        return found

    def _write_dora(self, j: int, slot: int, w, weight: torch.Tensor, adapter_id: str) -> None:
        w0 = weight.detach().float()
        if self.shapes[j].fan_in_fan_out:  # Conv1D stores [d_in, d_out]
            w0 = w0.T
        norm = torch.linalg.vector_norm(torch.addmm(w0, w.B.float(), w.A.float(), alpha=w.scale), dim=1)  # [d_out]
        g = w.magnitude.float() / norm
        if not torch.isfinite(g).all() or g.abs().max().item() > MAX_DORA_SCALE:
            raise AdapterValidationError(
                f"adapter '{adapter_id}': module {self.names[j]}: its DoRA scale m / ||W + scale·B·A|| reaches "
                f"{g.abs().max().item():.4g} on this base model (limit {MAX_DORA_SCALE:g})", status=422,
                code="adapter_incompatible")
        self.G[j][slot].copy_(g)
        if self.C[j] is not None:
            self.C[j][slot].copy_(self.biases[j].detach().float() * (1 - g))

    def clear(self, slot: int) -> None:
        self.A[slot].zero_()
        self.member_ranks[slot] = 0
        for j, (b, g, c) in enumerate(zip(self.B, self.G, self.C, strict=True)):
            b[slot].zero_()
            g[slot].fill_(1.0)
            if c is not None:
                c[slot].zero_()
            self.L[j][slot].fill_(1.0)
            self.input_slots[j].discard(slot)

    def base_output(self, x: torch.Tensor, packed: PackedLinear) -> torch.Tensor:
        """The members' stacked base GEMM of x [..., d_in] -> [..., sum d_out]: once per input tensor in a step."""
        ctx = self.context.current
        return packed(x) if ctx is None else ctx.shared(("base", self.index), x, lambda: packed(x))

    def apply(self, member: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (the base projection of x) plus this member's side paths for the step in progress."""
        ctx = self.context.current
        if ctx is None or self.index not in ctx.lora.active:
            return y
        plan = ctx.lora
        x2 = x.reshape(-1, x.shape[-1])  # [N, d_in]
        y2 = y.view(-1, y.shape[-1])  # [N, d_out]
        if not plan.empty:  # a step of IA3 rows only has no side path, only rescales
            shrunk = ctx.shared(self.index, x, lambda: shrink(x2.to(self.A.dtype), self.views, plan))
            expand(y2, shrunk, member, self.views, plan)
        if plan.rescale is not None and self.index in plan.rescale_groups:
            if self.input_slots[member] & plan.rescale.slots:
                self._input_scales(member, x2, y2, plan.rescale.runs)
            rescale(y2, plan.rescale, self.G[member], self.C[member])
        return y

    def _input_scales(self, member: int, x: torch.Tensor, y: torch.Tensor, runs) -> None:
        """IA3 on a feed-forward module: W0·(l ⊙ x) = W0·x + W0·((l - 1) ⊙ x); y holds W0·x (the merged delta,
        if any, already subtracted), so add the second term for each run of such a slot (W0: the unmerged weight)."""
        weight = self.original(self.names[member])
        w = weight if self.shapes[member].fan_in_fan_out else weight.T  # [d_in, d_out]
        for start, end, slot in runs:
            if slot in self.input_slots[member]:
                scaled = x[start:end].to(self.L[member].dtype) * (self.L[member][slot] - 1)  # [n, d_in]
                y[start:end] += (scaled.to(w.dtype) @ w).to(y.dtype)


class LoraProjection(nn.Module):
    """A base projection (through `packed`, its oneDNN-reordered GEMM, when given) plus its group's side paths.

    A `packed` GEMM of several members of the group (q/k/v stacked) runs once per input tensor in a step; each
    member takes its columns of it (a strided view). `index`: its place among the runtime's projections; under
    torch.compile the projection is the opaque op `loramux::projection(x, index, d_out)` (server/compiled.py),
    which runs `project`."""

    def __init__(self, base: nn.Module, group: ProjectionGroup, member: int, index: int,
                 packed: PackedLinear | None = None):
        super().__init__()
        self.base = base
        self.group = group
        self.member = member
        self.index = index
        self.packed = packed
        self.d_out = group.shapes[member].d_out

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def project(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            y = self.base(x)
        elif len(self.packed.modules) == 1:
            y = self.packed(x)
        else:
            y = self.group.base_output(x, self.packed)[..., self.packed.columns[self.member]]
        return self.group.apply(self.member, x, y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.ops.loramux.projection(x, self.index, self.d_out)
        return self.project(x)
