"""Packed attention over the KV arena against a per-token float64 loop, in fp32 and bf16, through torch's batched
matmuls and through loramux's CPU decode-attention kernel (server/csrc/decode_attention.cpp)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny_models import tiny_llama

from server.attention import build_attn_meta, kernel_available, packed_attention
from server.kv_blocks import Block
from server.kv_cache import KVCache
from server.lora.plan import NO_ADAPTER
from server.model_runner import ModelRunner, StepInput
from server.step_context import ForwardContext, StepContext

HEADS, KV_HEADS, DIM = 4, 2, 8
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # bf16: the output's own rounding
PATHS = {"torch": False, "kernel": True}


@pytest.fixture(scope="module", autouse=True)
def built():
    assert kernel_available(), "the decode-attention kernel did not build (see the warning)"


def reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """One token. q: [H, D]; keys/values: [T, Hkv, D] (all it may see) -> [H, D] float64."""
    kv_of = torch.arange(HEADS) // (HEADS // KV_HEADS)
    k, v = keys.double()[:, kv_of], values.double()[:, kv_of]  # [T, H, D]
    scores = torch.einsum("hd,thd->ht", q.double(), k) / DIM**0.5
    return torch.einsum("ht,thd->hd", scores.softmax(-1), v)


class Packed:
    """Runs steps through packed_attention and keeps every row's keys and values for the reference."""

    def __init__(self, dtype: torch.dtype, kernel: bool):
        self.cache = KVCache(1, 4 * 32, KV_HEADS, DIM, 32, dtype, torch.device("cpu"), unit=8)  # 4 blocks of 32
        self.dtype, self.kernel = dtype, kernel
        self.history: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # row -> ([T, Hkv, D], [T, Hkv, D])
        self.gen = torch.Generator().manual_seed(0)

    def step(self, rows: list[int], positions: list[int], decode: list[int],
             prefills: list[tuple[int, int, int, int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One step; returns (output, float64 reference) per packed token."""
        n = len(rows)
        q, k, v = (torch.randn(1, h, n, DIM, generator=self.gen).to(self.dtype) for h in (HEADS, KV_HEADS, KV_HEADS))
        blocks = [Block(r * 4, 2) for r in rows]  # row r: the r-th block of 4 units of 8 tokens
        chunks = [(s, e, Block(r * 4, 2), p) for s, e, r, p in prefills]
        meta = build_attn_meta(self.cache, blocks, positions, decode, chunks, torch.device("cpu"), kernel=self.kernel)
        context = ForwardContext()
        with context.bind(StepContext(attn=meta, lora=None)):
            out = packed_attention(SimpleNamespace(layer_idx=0), q, k, v, None, scaling=DIM**-0.5)[0]
        for t, (row, pos) in enumerate(zip(rows, positions, strict=True)):
            ks, vs = self.history.get(row, (k.new_empty(0, KV_HEADS, DIM), v.new_empty(0, KV_HEADS, DIM)))
            assert ks.shape[0] == pos, "the test writes each row's positions in order"
            self.history[row] = (torch.cat([ks, k[0, :, t][None]]), torch.cat([vs, v[0, :, t][None]]))
        return [(out[0, t], reference(q[0, :, t], *(h[: pos + 1] for h in self.history[row])))
                for t, (row, pos) in enumerate(zip(rows, positions, strict=True))]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_then_decode_equal_the_per_token_loop(dtype, path):
    attn = Packed(dtype, PATHS[path])
    results = attn.step([0] * 5 + [2] * 3, [*range(5), *range(3)], [], [(0, 5, 0, 0), (5, 8, 2, 0)])
    # Row 1 lies between the decoding rows but is not decoding; row 3 prefills a chunk in the same step.
    results += attn.step([0, 2, 3, 3], [5, 3, 0, 1], [0, 1], [(2, 4, 3, 0)])
    results += attn.step([2, 0, 3, 3, 3], [4, 6, 2, 3, 4], [0, 1], [(2, 5, 3, 2)])  # a chunk that continues
    for out, ref in results:
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), ref, atol=TOLERANCE[dtype], rtol=0)


def kernel_out(q, kc, vc, rows, scaling):
    out = torch.full_like(q, 7.0)  # rows no decode token names keep this
    torch.ops.loramux_attention.decode_attention(q, kc, vc, torch.tensor(rows, dtype=torch.long), scaling, out)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (6, 6, 20), (24, 2, 8), (10, 2, 20)])  # 20: part vector
def test_kernel_over_model_geometries(dtype, heads, kv_heads, dim):
    """The default model's heads (9 over 3 of 64), no GQA with a head_dim that is not whole vectors, more query
    heads per KV head than the kernel sums at once (in bf16 it takes a KV head's query heads 4 at a time: 12 and
    5 per KV head leave whole and partial groups); keys from 1 to 150, one rounding of the output."""
    gen = torch.Generator().manual_seed(1)
    kc, vc = (torch.randn(kv_heads, 300, dim, generator=gen).to(dtype) for _ in range(2))
    q = torch.randn(6, heads, dim, generator=gen).to(dtype)
    rows = [(0, 0, 1), (2, 10, 37), (3, 50, 150), (5, 299, 1), (4, 200, 9)]  # token 1 is not decoding
    out = kernel_out(q, kc, vc, rows, dim**-0.5)
    group = heads // kv_heads
    for token, first, length in rows:
        k, v = (t[:, first : first + length].double().repeat_interleave(group, 0) for t in (kc, vc))  # [H, T, D]
        scores = torch.einsum("hd,htd->ht", q[token].double(), k) * dim**-0.5
        ref = torch.einsum("ht,htd->hd", scores.softmax(-1), v)
        err = (out[token].double() - ref).abs()
        bound = 1e-5 if dtype == torch.float32 else ref.abs() * 2**-8 + 1e-5  # bf16: half an ulp of rounding, once
        assert (err <= bound).all(), f"token {token}: max error {err.max():.3g}"
    assert (out[1] == 7).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # a task per head; per group of heads
def test_kernel_reads_only_each_sequences_keys(dtype):
    """NaN and inf past a sequence's length (a block's stale tail, a neighbour's keys) never reach its output."""
    gen = torch.Generator().manual_seed(2)
    kc, vc = (torch.randn(2, 64, 8, generator=gen).to(dtype) for _ in range(2))
    q = torch.randn(2, 4, 8, generator=gen).to(dtype)
    clean = kernel_out(q, kc, vc, [(0, 16, 5), (1, 32, 16)], 0.3)
    for t in (kc, vc):
        t[:, :16] = float("nan")
        t[:, 21:32] = float("inf")
        t[:, 48:] = float("-inf")
    torch.testing.assert_close(kernel_out(q, kc, vc, [(0, 16, 5), (1, 32, 16)], 0.3), clean, atol=0, rtol=0)


@pytest.mark.parametrize("rows,message", [
    ([(2, 0, 4)], "token 2 outside 0..2"),
    ([(0, 60, 5)], "keys 60\\+5 outside the arena's 64"),
    ([(0, 0, 0)], "keys 0\\+0 outside"),
])
def test_kernel_rejects_rows_outside_the_step_or_the_arena(rows, message):
    kc = vc = torch.zeros(2, 64, 8)
    q = torch.zeros(2, 4, 8)
    out = torch.full_like(q, 7.0)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.loramux_attention.decode_attention(q, kc, vc, torch.tensor(rows), 1.0, out)
    assert (out == 7).all()  # checked before anything is written


def test_a_float16_model_decodes_through_torchs_path():
    """The kernel reads float32 and bfloat16 only: a float16 model on CPU takes the torch path, and decodes."""
    runner = ModelRunner(tiny_llama().half(), max_loras=2, max_rank=8, max_model_len=64, kv_tokens=64)
    assert not runner.attention_kernel
    block = Block(0, 2)
    runner.forward(StepInput([1, 2, 3], [block] * 3, [0, 1, 2], [NO_ADAPTER] * 3, prefills=[(0, 3, block, 0)],
                             logits_idx=[2]))
    logits = runner.forward(StepInput([4], [block], [3], [NO_ADAPTER], decode=[0], logits_idx=[0]))
    assert logits.shape == (1, 96) and torch.isfinite(logits).all()
