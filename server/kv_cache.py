"""The KV cache: one arena of tokens per layer, shared by all running sequences by blocks (`kv_blocks.py`).

Per layer, K and V are [kv_heads, tokens, head_dim] (head-major, a sequence's tokens in order within its
block), allocated once: the memory is bounded by a token budget, not by rows of the longest context, so
hundreds of short sequences fit where a few rows of `max_model_len` would. The blocks of one order are the
rows of a strided view of the arena, [rows, kv_heads, block_tokens, head_dim]: attention reads them in place.
"""

from __future__ import annotations

import torch

from server.kv_blocks import Block, KVBlocks

UNIT = 16  # tokens per allocation unit: the smallest block


class KVCache:
    def __init__(self, layers: int, tokens: int, kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device, unit: int = UNIT):
        max_order = max(0, (-(-max_len // unit) - 1).bit_length())
        block = 1 << max_order  # units of the largest block
        needed = -(-tokens // unit)  # ceil
        units = max(block, -(-needed // block) * block)  # rounded up to whole largest blocks
        shape = (kv_heads, units * unit, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.blocks = KVBlocks(units, unit, max_order)
        self.unit, self.max_len, self.kv_heads, self.head_dim = unit, max_len, kv_heads, head_dim

    @property
    def tokens(self) -> int:
        return self.blocks.units * self.unit

    @property
    def nbytes(self) -> int:
        return 2 * sum(t.numel() * t.element_size() for t in self.k)

    def rows(self, layer: int, order: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of every block of `order` as [rows, kv_heads, block_tokens, head_dim] views."""
        n = self.unit << order
        k, v = self.k[layer], self.v[layer]
        heads, total, dim = k.shape
        return (k.view(heads, total // n, n, dim).transpose(0, 1), v.view(heads, total // n, n, dim).transpose(0, 1))

    def clear(self, block: Block, length: int) -> None:
        """Zero positions [0, length) of a block being given back. Attention masks positions past a sequence's
        length, but a masked key still multiplies its value by a softmax weight of 0, and 0 * NaN is NaN: what
        one sequence left in the arena must not reach the next one."""
        start = block.start * self.unit
        for k, v in zip(self.k, self.v, strict=True):
            k[:, start : start + length].zero_()
            v[:, start : start + length].zero_()

    def write(self, block: Block, kv: torch.Tensor) -> None:
        """Put keys and values at a block's first positions: kv [layers, 2, kv_heads, n, head_dim] (a prefix)."""
        start, n = block.start * self.unit, kv.shape[3]
        for layer, (k, v) in enumerate(zip(self.k, self.v, strict=True)):
            k[:, start : start + n] = kv[layer, 0]
            v[:, start : start + n] = kv[layer, 1]

    def move(self, src: Block, dst: Block, length: int) -> None:
        """Copy positions [0, length) of `src` to `dst` (a sequence outgrowing its block)."""
        a, b = src.start * self.unit, dst.start * self.unit
        for k, v in zip(self.k, self.v, strict=True):
            k[:, b : b + length] = k[:, a : a + length]
            v[:, b : b + length] = v[:, a : a + length]
