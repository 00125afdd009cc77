"""Merged hot swap: fold one adapter into the base weights, exactly reversibly.

Unmerging by subtraction (dLoRA) drifts: fl(fl(W + D) - D) != W, and in bf16 the error grows with
every swap. Here the original weight of every projection an adapter touches is kept once (a
"golden" copy, made the first time that projection is merged), and a swap writes
`W = golden + D'` in one pass. Restoring is a copy, so weights equal the originals bitwise after any
number of swaps. A swap is one fused pass per projection, `addmm(golden, B, A, out=W)`. Cost: one extra
copy of the merged projections' weights, only once something merges.
"""

from __future__ import annotations

import torch

from server.lora_layers import LoraRuntime


class MergedWeights:
    """Which adapter slot (if any) is folded into the base weights of a LoraRuntime's projections."""

    def __init__(self, runtime: LoraRuntime):
        self.runtime = runtime
        self.slot: int | None = None
        self._golden: dict[str, torch.Tensor] = {}
        self._touched: set[str] = set()  # projections currently differing from golden

    def _weight(self, name: str) -> torch.Tensor:
        return self.runtime.modules[name].weight

    @torch.no_grad()
    def merge(self, slot: int | None) -> None:
        """Make the weights hold `golden + delta(slot)` (or plain golden for None)."""
        if slot == self.slot:
            return
        targets: set[str] = set()
        if slot is not None:
            targets = {n for n, (g, _) in self.runtime.member_of.items() if g.has[slot]}
        for name in self._touched - targets:
            self._weight(name).copy_(self._golden[name])
        for name in targets:
            w = self._weight(name)
            if name not in self._golden:
                self._golden[name] = w.detach().clone()
            self._write_merged(name, slot, w)
        self._touched = targets
        self.slot = slot

    def _write_merged(self, name: str, slot: int, w: torch.Tensor) -> None:
        """w = golden + s·B·A in one fused pass (addmm), sliced to the adapter's rank."""
        group, member = self.runtime.member_of[name]
        r = self.runtime.slot_ranks[slot]
        a = group.A[slot, :r, member].to(w.dtype)  # [r, d_in]
        bt = group.B[member][slot, :r].to(w.dtype)  # [r, d_out] (scaled)
        golden = self._golden[name]
        if self.runtime.shapes[name].fan_in_fan_out:  # Conv1D weight [d_in, d_out]: delta^T = A^T·B^T
            torch.addmm(golden, a.T, bt, out=w)
        else:  # weight [d_out, d_in]: delta = B·A
            torch.addmm(golden, bt.T, a, out=w)

    def unmerge(self) -> None:
        self.merge(None)

    @property
    def golden_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._golden.values())
