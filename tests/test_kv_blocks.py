"""The KV arena's buddy allocator, and its strided row views against plain slicing."""

from __future__ import annotations

import random

import pytest
import torch

from server.kv_blocks import Block, KVBlocks
from server.kv_cache import KVCache


def test_blocks_are_aligned_sized_and_coalesce():
    blocks = KVBlocks(units=16, unit=16, max_order=3)
    assert [blocks.order_for(n) for n in (1, 16, 17, 33, 64, 65, 128)] == [0, 0, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError, match="exceed the largest KV block"):
        blocks.order_for(129)
    a, b, c = blocks.alloc(10), blocks.alloc(40), blocks.alloc(100)
    assert (a, b, c) == (Block(0, 0), Block(4, 2), Block(8, 3))
    assert all(x.start % (1 << x.order) == 0 for x in (a, b, c)) and blocks.used_units == 13
    assert blocks.alloc(100) is None  # 3 units left, none a whole block of 8
    blocks.free(a)
    blocks.free(b)
    assert blocks.alloc(100) == Block(0, 3)  # the freed halves merged back into one block


def test_random_churn_never_overlaps_and_ends_whole():
    rng = random.Random(0)
    blocks = KVBlocks(units=64, unit=16, max_order=4)
    held: list[Block] = []
    for _ in range(2000):
        if held and rng.random() < 0.5:
            blocks.free(held.pop(rng.randrange(len(held))))
        elif (b := blocks.alloc(rng.randint(1, 256))) is not None:
            held.append(b)
        owned = [u for b in held for u in range(b.start, b.start + (1 << b.order))]
        assert len(owned) == len(set(owned)) == blocks.used_units
    for b in held:
        blocks.free(b)
    assert blocks.used_units == 0 and [blocks.alloc(256) for _ in range(4)] == [Block(i * 16, 4) for i in range(4)]


def test_rows_are_views_of_the_blocks():
    cache = KVCache(layers=1, tokens=256, kv_heads=2, head_dim=4, max_len=64, dtype=torch.float32,
                    device=torch.device("cpu"), unit=16)
    cache.k[0].copy_(torch.randn_like(cache.k[0]))
    for order in range(cache.blocks.max_order + 1):
        rows, _ = cache.rows(0, order)
        n = 16 << order
        for r in range(rows.shape[0]):
            assert torch.equal(rows[r], cache.k[0][:, r * n : (r + 1) * n])
        assert rows.data_ptr() == cache.k[0].data_ptr()  # a view: nothing is copied
    src, dst = Block(0, 1), Block(8, 2)
    cache.move(src, dst, 20)
    assert torch.equal(cache.k[0][:, 128:148], cache.k[0][:, 0:20])
    cache.clear(dst, 20)
    assert not cache.k[0][:, 128:148].any() and cache.k[0][:, 148:].any()
