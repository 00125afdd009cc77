"""Per-row adapters of the input embedding and the output head, for the slots whose adapter has one.

An edge of a slot is one of: LoRA (its rows add ``scale · B·A``, times their weight in a composition), a
trained copy of the module (``modules_to_save``: its rows use the copy), or trained rows of some tokens
(``trainable_token_indices``: an embedding row of such a token is the trained one; tied, so are the head's
logits of those tokens). Only those slots hold tensors, allocated when the adapter enters the slot (an
embedding's LoRA A or a copy is as large as the vocabulary: nothing is preallocated). The embedding's rows are
every packed token's, the head's every sampled token's. Adapters with edges are never merged, so no row ever
subtracts one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from adapters_store.format import LoraAdapter


@dataclass(frozen=True)
class EdgeSlot:
    form: Literal["lora", "copy", "tokens"]
    a: torch.Tensor  # lora: A^T ([vocab, r] embed, [hidden, r] head); copy: the weight [vocab, hidden]; tokens: rows
    b: torch.Tensor | None = None  # lora: B^T times the scale ([r, hidden] / [r, vocab]); tokens: their ids [n]
    lookup: torch.Tensor | None = None  # tokens: [vocab] long, each id's row in `a` (-1: not trained)


class EdgeSlots:
    """`dtype`: of the LoRA side paths; copies and trained rows are kept in the model's `model_dtype`."""

    def __init__(self, device: torch.device, dtype: torch.dtype, model_dtype: torch.dtype, vocab: int):
        self.device, self.dtype, self.model_dtype, self.vocab = device, dtype, model_dtype, vocab
        self.embed: dict[int, EdgeSlot] = {}
        self.head: dict[int, EdgeSlot] = {}

    @property
    def active(self) -> bool:
        return bool(self.embed or self.head)

    @property
    def nbytes(self) -> int:
        tensors = [t for e in (*self.embed.values(), *self.head.values()) for t in (e.a, e.b, e.lookup)]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def write(self, slot: int, adapter: LoraAdapter) -> None:
        self.clear(slot)
        for edge, table in (("embed", self.embed), ("head", self.head)):
            entry = self._entry(adapter, edge)
            if entry is not None:
                table[slot] = entry

    def _entry(self, adapter: LoraAdapter, edge: str) -> EdgeSlot | None:
        w, replaces = adapter.edges.get(edge), adapter.replaces
        if w is not None:
            b = (w.B.t().to(self.device, torch.float64) * w.scale).to(self.dtype).contiguous()
            return EdgeSlot("lora", w.A.t().to(self.device, self.dtype).contiguous(), b)
        if replaces is None:
            return None
        if edge in replaces.copies:
            return EdgeSlot("copy", replaces.copies[edge].to(self.device, self.model_dtype).contiguous())
        tokens = replaces.tokens
        if tokens is None or not (edge == "embed" or tokens.tied_head):
            return None
        ids = tokens.indices.to(self.device)
        lookup = torch.full((self.vocab,), -1, dtype=torch.long, device=self.device)
        lookup[ids] = torch.arange(len(ids), device=self.device)
        return EdgeSlot("tokens", tokens.rows.to(self.device, self.model_dtype).contiguous(), ids, lookup)

    def clear(self, slot: int) -> None:
        self.embed.pop(slot, None)
        self.head.pop(slot, None)

    def add_embedding(self, x: torch.Tensor, ids: torch.Tensor, slots: torch.Tensor,
                      weighted: list[tuple[int, int, int, float]]) -> None:
        """x: [N, hidden] embeddings of the packed tokens ids [N] whose slots are `slots` [N]; weighted: the
        compositions' (start, end, slot, weight) token ranges; in place."""
        extra = [(slot, torch.arange(s, e, device=ids.device), w) for s, e, slot, w in weighted if slot in self.embed]
        for edge, idx, weight in _rows(self.embed, slots, extra):
            tok = ids[idx]
            if edge.form == "lora":
                delta = edge.a.index_select(0, tok) @ edge.b  # [n, r] @ [r, hidden]
                x.index_add_(0, idx, delta.to(x.dtype), alpha=weight)
            elif edge.form == "copy":
                x[idx] = edge.a.index_select(0, tok).to(x.dtype)
            else:
                pos = edge.lookup[tok]  # [n]: row of each token, -1 if not trained
                hit = pos >= 0
                x[idx[hit]] = edge.a.index_select(0, pos[hit]).to(x.dtype)

    def add_head(self, logits: torch.Tensor, hidden: torch.Tensor, slots: torch.Tensor,
                 weighted: list[tuple[int, int, int, float]], packed: torch.Tensor) -> None:
        """logits: [n, vocab] of the rows hidden [n, d]; slots [n]: each row's slot; packed [n]: each row's index
        among the step's tokens, in which the compositions' ranges are given; in place."""
        extra = [(slot, ((packed >= s) & (packed < e)).nonzero().flatten(), w) for s, e, slot, w in weighted
                 if slot in self.head]
        for edge, idx, weight in _rows(self.head, slots, extra):
            h = hidden.index_select(0, idx)  # [n, d]
            if edge.form == "lora":
                delta = (h.to(self.dtype) @ edge.a) @ edge.b  # [n, r] -> [n, vocab]
                logits.index_add_(0, idx, delta.to(logits.dtype), alpha=weight)
            elif edge.form == "copy":
                logits[idx] = (h.to(edge.a.dtype) @ edge.a.t()).to(logits.dtype)
            else:  # the trained tokens' columns
                logits[idx[:, None], edge.b[None, :]] = (h.to(edge.a.dtype) @ edge.a.t()).to(logits.dtype)


def _rows(table: dict[int, EdgeSlot], slots: torch.Tensor, extra: list[tuple[int, torch.Tensor, float]]
          ) -> Iterator[tuple[EdgeSlot, torch.Tensor, float]]:
    """(slot's edge, row indices, weight): the rows whose slot holds an edge of `table`, then the rows of each
    composition part (slot, rows, weight)."""
    for slot, edge in table.items():
        idx = (slots == slot).nonzero().flatten()
        if idx.numel():
            yield edge, idx, 1.0
    for slot, idx, weight in extra:
        if idx.numel():
            yield table[slot], idx, weight
