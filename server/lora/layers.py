"""LoRA-aware projections: the layer contract of the LoRA runtime.

As in vLLM's ``vllm/lora/`` layers: each targetable projection is replaced once at start-up by a
``LoraProjection``; its ``ProjectionGroup`` creates the slot buffers, writes or clears a slot
(``write`` / ``clear``), and adds the side paths of the step in progress, read from the step context
(``apply``). Projections that read the same input (q/k/v, gate/up) share one group, so the shrink x·A is
computed once for all of them.
"""

from __future__ import annotations

import torch
from torch import nn

from adapters_store.format import LoraAdapter, ModuleShape
from server.gemm import PackedLinear
from server.lora.ops import BufferViews, expand, shrink
from server.step_context import ForwardContext


class ProjectionGroup:
    """Slot buffers of M projections that read the same input, and their side paths.

    A: [S, r_max, M, d_in]; B[j]: [S, r_max, d_out_j] (B transposed, pre-scaled by the module's scale).
    """

    def __init__(self, index: int, names: list[str], shapes: list[ModuleShape], n_slots: int, max_rank: int,
                 device: torch.device, dtype: torch.dtype, context: ForwardContext):
        self.index = index
        self.names = names
        self.shapes = shapes
        self.context = context
        kw = dict(device=device, dtype=dtype)
        self.A = torch.zeros(n_slots, max_rank, len(names), shapes[0].d_in, **kw)
        self.B = [torch.zeros(n_slots, max_rank, sh.d_out, **kw) for sh in shapes]
        self.views = BufferViews(self.A, self.B)

    def write(self, slot: int, adapter: LoraAdapter) -> bool:
        """Copy the adapter's weights of this group's members into `slot`; False if it adapts none of them."""
        self.A[slot].zero_()
        found = False
        for j, name in enumerate(self.names):
            self.B[j][slot].zero_()
            w = adapter.weights.get(name)
            if w is None:
                continue
            r = w.A.shape[0]
            self.A[slot, :r, j].copy_(w.A)
            self.B[j][slot, :r].copy_(w.B.float().mul(w.scale).T)
            found = True
        return found

    def clear(self, slot: int) -> None:
        self.A[slot].zero_()
        for b in self.B:
            b[slot].zero_()

    def apply(self, member: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (the base projection of x) plus this member's side paths for the step in progress."""
        ctx = self.context.current
        if ctx is None or self.index not in ctx.lora.active:
            return y
        plan = ctx.lora
        x2 = x.reshape(-1, x.shape[-1])  # [N, d_in]
        shrunk = ctx.shared(self.index, x, lambda: shrink(x2.to(self.A.dtype), self.views, plan))
        expand(y.view(-1, y.shape[-1]), shrunk, member, self.views, plan)
        return y


class LoraProjection(nn.Module):
    """A base projection (through `packed`, its oneDNN-reordered GEMM, when given) plus its group's side paths."""

    def __init__(self, base: nn.Module, group: ProjectionGroup, member: int, packed: PackedLinear | None = None):
        super().__init__()
        self.base = base
        self.group = group
        self.member = member
        self.packed = packed

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x) if self.packed is None else self.packed(x)
        return self.group.apply(self.member, x, y)
