"""Which part of the KV arena each sequence holds: a buddy allocator over units of `unit` tokens.

A sequence holds one aligned block of 2^order units, so that every block of one order is a row of a strided
view of the arena (`KVCache.rows`): the sequences of one order are attended in one batched call, and no key
or value is ever gathered or copied per step. A block is sized for what its sequence needs now (prompt plus
the first output tokens), not for the whole context; when the sequence fills it, it moves to a block twice the
size (the scheduler moves it). Free buddies coalesce, so the arena does not fragment into small pieces for good.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Block:
    start: int  # first unit
    order: int  # 2^order units

    def tokens(self, unit: int) -> int:
        return unit << self.order

    @property
    def row(self) -> int:
        """Its index among the blocks of its order (the row of `KVCache.rows(order)`)."""
        return self.start >> self.order


class KVBlocks:
    def __init__(self, units: int, unit: int, max_order: int):
        if units <= 0 or units % (1 << max_order):
            raise ValueError(f"{units} units is not a positive multiple of the largest block (2^{max_order})")
        self.unit, self.units, self.max_order = unit, units, max_order
        self._free: list[set[int]] = [set() for _ in range(max_order + 1)]  # free block starts, by order
        self._free[max_order] = set(range(0, units, 1 << max_order))
        self.used_units = 0

    def order_for(self, tokens: int) -> int:
        """The smallest order whose blocks hold `tokens` (ValueError past the largest)."""
        order = max(0, (-(-tokens // self.unit) - 1).bit_length())
        if order > self.max_order:
            raise ValueError(f"{tokens} tokens exceed the largest KV block ({self.unit << self.max_order})")
        return order

    def alloc(self, tokens: int) -> Block | None:
        """A free block for `tokens` tokens, or None when the arena has none that large."""
        order = self.order_for(tokens)
        have = next((k for k in range(order, self.max_order + 1) if self._free[k]), None)
        if have is None:
            return None
        start = min(self._free[have])  # low addresses first: keeps the high ones whole for large blocks
        self._free[have].discard(start)
        while have > order:  # split, keeping the lower half
            have -= 1
            self._free[have].add(start + (1 << have))
        self.used_units += 1 << order
        return Block(start, order)

    def free(self, block: Block) -> None:
        start, order = block.start, block.order
        self.used_units -= 1 << order
        while order < self.max_order:
            buddy = start ^ (1 << order)
            if buddy not in self._free[order]:
                break
            self._free[order].discard(buddy)
            start, order = min(start, buddy), order + 1
        self._free[order].add(start)
