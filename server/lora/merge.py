"""Merged hot swap: fold one adapter slot into the base weights, exactly reversibly.

Unmerging by subtraction (dLoRA) drifts: fl(fl(W + D) - D) != W, and in bf16 the error grows with
every swap. Here the original weight of every projection an adapter touches is kept once (a
"golden" copy, made the first time that projection is merged), and a swap writes
`W = golden + D'` in one pass. Restoring is a copy, so weights equal the originals bitwise after any
number of swaps. A swap is one fused pass per projection, `addmm(golden, B, A, out=W)`. Cost: one extra
copy of the merged projections' weights, only once something merges. A DoRA slot folds as PEFT merges it,
`W = G ⊙ (golden + D)` with its row scales G (its rows then need nothing more; others could not be
corrected by a low-rank subtraction, so a merged DoRA adapter runs alone).

A fold whose weights come out non-finite (an adapter poisoned in memory; uploads are checked for
magnitudes) is undone and refused: merged weights are read by every row of a batch.
"""

from __future__ import annotations

import torch
from torch import nn

from adapters_store.format import ModuleShape
from server.gemm import PackedLinear
from server.lora.layers import ProjectionGroup


class MergeRefused(ValueError):
    """Folding this slot would make base weights non-finite; the weights are left at their originals."""


class MergedWeights:
    """The base weights of a runtime's projections, holding golden + the delta of at most one slot."""

    def __init__(self, groups: list[ProjectionGroup], modules: dict[str, nn.Module], shapes: dict[str, ModuleShape],
                 packed: dict[str, PackedLinear] | None = None):
        self._groups = groups
        self._modules = modules
        self._shapes = shapes
        self._packed = packed or {}  # projections whose GEMM reads a reordered copy: repacked after a change
        self._golden: dict[str, torch.Tensor] = {}
        self._touched: set[str] = set()  # projections currently differing from golden

    def original(self, name: str) -> torch.Tensor:
        """The projection's weight as loaded (its golden copy while something is merged into it)."""
        return self._golden.get(name, self._modules[name].weight)

    @torch.no_grad()
    def fold(self, slot: int | None, rank: int, groups: frozenset[int], dora: bool = False) -> None:
        """Make the weights hold `golden + delta(slot)` for the members of `groups` (plain golden for None);
        `dora`: times the slot's row scales."""
        targets = {} if slot is None else {
            name: (g, j) for g in self._groups if g.index in groups for j, name in enumerate(g.names)}
        restored = self._touched - targets.keys()
        for name in restored:
            self._modules[name].weight.copy_(self._golden[name])
        for name, (group, member) in targets.items():
            w = self._modules[name].weight
            if name not in self._golden:
                self._golden[name] = w.detach().clone()
            self._write_merged(name, group, member, slot, rank, w)
            if dora:
                g = group.G[member][slot].to(w.dtype)  # [d_out]
                w.mul_(g.unsqueeze(0) if self._shapes[name].fan_in_fan_out else g.unsqueeze(1))
        self._touched = set(targets)
        bad = [name for name in targets if not torch.isfinite(self._modules[name].weight).all()]
        if bad:
            for name in self._touched:
                self._modules[name].weight.copy_(self._golden[name])
            restored |= self._touched
            self._touched = set()
        changed = {id(p): p for name in restored | self._touched if (p := self._packed.get(name)) is not None}
        for packed in changed.values():  # a GEMM stacked over several projections repacks once
            packed.repack()
        if bad:
            raise MergeRefused(f"folding slot {slot} would make {len(bad)} projections non-finite (e.g. {bad[0]})")

    def _write_merged(self, name: str, group: ProjectionGroup, member: int, slot: int, rank: int,
                      w: torch.Tensor) -> None:
        """w = golden + s·B·A in one fused pass (addmm), sliced to the adapter's rank."""
        a = group.A[slot, :rank, member].to(w.dtype)  # [r, d_in]
        bt = group.B[member][slot, :rank].to(w.dtype)  # [r, d_out] (scaled)
        golden = self._golden[name]
        if self._shapes[name].fan_in_fan_out:  # Conv1D weight [d_in, d_out]: delta^T = A^T·B^T
            torch.addmm(golden, a.T, bt, out=w)
        else:  # weight [d_out, d_in]: delta = B·A
            torch.addmm(golden, bt.T, a, out=w)
