"""Packed attention over the row KV cache against a per-token float64 loop, in fp32 and bf16."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from server.attention import build_attn_meta, packed_attention
from server.kv_blocks import Block
from server.kv_cache import KVCache
from server.step_context import ForwardContext, StepContext

HEADS, KV_HEADS, DIM = 4, 2, 8
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # bf16: the output's own rounding


def reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """One token. q: [H, D]; keys/values: [T, Hkv, D] (all it may see) -> [H, D] float64."""
    kv_of = torch.arange(HEADS) // (HEADS // KV_HEADS)
    k, v = keys.double()[:, kv_of], values.double()[:, kv_of]  # [T, H, D]
    scores = torch.einsum("hd,thd->ht", q.double(), k) / DIM**0.5
    return torch.einsum("ht,thd->hd", scores.softmax(-1), v)


class Packed:
    """Runs steps through packed_attention and keeps every row's keys and values for the reference."""

    def __init__(self, dtype: torch.dtype):
        self.cache = KVCache(1, 4 * 32, KV_HEADS, DIM, 32, dtype, torch.device("cpu"), unit=8)  # 4 blocks of 32
        self.dtype = dtype
        self.history: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # row -> ([T, Hkv, D], [T, Hkv, D])
        self.gen = torch.Generator().manual_seed(0)

    def step(self, rows: list[int], positions: list[int], decode: list[int],
             prefills: list[tuple[int, int, int, int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One step; returns (output, float64 reference) per packed token."""
        n = len(rows)
        q, k, v = (torch.randn(1, h, n, DIM, generator=self.gen).to(self.dtype) for h in (HEADS, KV_HEADS, KV_HEADS))
        blocks = [Block(r * 4, 2) for r in rows]  # row r: the r-th block of 4 units of 8 tokens
        chunks = [(s, e, Block(r * 4, 2), p) for s, e, r, p in prefills]
        meta = build_attn_meta(self.cache, blocks, positions, decode, chunks, torch.device("cpu"))
        context = ForwardContext()
        with context.bind(StepContext(attn=meta, lora=None)):
            out = packed_attention(SimpleNamespace(layer_idx=0), q, k, v, None, scaling=DIM**-0.5)[0]
        for t, (row, pos) in enumerate(zip(rows, positions, strict=True)):
            ks, vs = self.history.get(row, (k.new_empty(0, KV_HEADS, DIM), v.new_empty(0, KV_HEADS, DIM)))
            assert ks.shape[0] == pos, "the test writes each row's positions in order"
            self.history[row] = (torch.cat([ks, k[0, :, t][None]]), torch.cat([vs, v[0, :, t][None]]))
        return [(out[0, t], reference(q[0, :, t], *(h[: pos + 1] for h in self.history[row])))
                for t, (row, pos) in enumerate(zip(rows, positions, strict=True))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_then_decode_equal_the_per_token_loop(dtype):
    attn = Packed(dtype)
    results = attn.step([0] * 5 + [2] * 3, [*range(5), *range(3)], [], [(0, 5, 0, 0), (5, 8, 2, 0)])
    # Row 1 lies between the decoding rows but is not decoding; row 3 prefills a chunk in the same step.
    results += attn.step([0, 2, 3, 3], [5, 3, 0, 1], [0, 1], [(2, 4, 3, 0)])
    results += attn.step([2, 0, 3, 3, 3], [4, 6, 2, 3, 4], [0, 1], [(2, 5, 3, 2)])  # a chunk that continues
    for out, ref in results:
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), ref, atol=TOLERANCE[dtype], rtol=0)
