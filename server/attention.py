"""Packed-batch attention over the KV arena (`kv_cache.py`), plugged into transformers' models.

A step packs the new tokens of all sequences into one [1, N] batch (decode tokens and prefill chunks mixed).
Keys and values are written in place at each token's arena position; nothing is re-padded or copied between
steps. On CPU decode tokens attend through loramux's kernel (csrc/decode_attention.cpp: one call per layer, each
token over its own sequence's keys in place); elsewhere, or where the kernel cannot be built, in one batched call
per block order over the blocks of that order they occupy (rows of a strided view of the arena: the plain-torch
path the kernel is tested against). Prefill chunks attend per sequence (SDPA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from server import native
from server.kv_blocks import Block
from server.kv_cache import KVCache
from server.step_context import running


@dataclass(frozen=True)
class DecodeGroup:
    """The decode tokens whose sequences hold blocks of one order, attended in one call."""

    order: int
    idx: torch.Tensor  # [n] long: packed index of each decode token
    rows: torch.Tensor  # [n] long: its block's row (among blocks of this order) minus `lo`
    lo: int
    span: int  # rows lo .. lo + span - 1 are attended in one call
    mask: torch.Tensor  # [span, 1, 1, length] bool: key visible
    length: int  # longest of these sequences (keys 0..length-1)


@dataclass(frozen=True)
class AttnMeta:
    """Where each packed token of a step lives in the arena and what it attends to."""

    cache: KVCache
    slots: torch.Tensor  # [N] long: arena position of each token (its block's first token + its position)
    positions: torch.Tensor  # [N] long: position of each token in its sequence
    decode: tuple[DecodeGroup, ...]  # the torch path's groups; empty where `decode_rows` is set
    decode_rows: torch.Tensor | None  # [n, 3] long CPU (token, block's first arena token, length): the kernel's
    prefills: tuple[tuple[int, int, int, int], ...]  # (start, end, block's first arena token, pos0) chunks


KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # what csrc/decode_attention.cpp reads


def kernel_available() -> bool:
    """Build (once) and load the CPU decode-attention kernel; False (with a warning) where it cannot be."""
    return native.build("decode_attention.cpp", "loramux_attention", "decode_attention",
                        "decode attention runs through torch's batched matmuls")


def kernel_serves(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a model on `device` in `dtype` decodes through the kernel (built here on first use)."""
    return device.type == "cpu" and dtype in KERNEL_DTYPES and kernel_available()


def build_attn_meta(cache: KVCache, blocks: list[Block], positions: list[int], decode: list[int],
                    prefills: list[tuple[int, int, Block, int]], device: torch.device,
                    kernel: bool = False) -> AttnMeta:
    """blocks: each packed token's sequence's block; decode: packed indices of single decode tokens (one per
    sequence); prefills: (start, end, block, pos0) chunks; kernel: decode tokens through the CPU kernel."""
    as_long = dict(dtype=torch.long, device=device)
    unit = cache.unit
    slots = [b.start * unit + p for b, p in zip(blocks, positions, strict=True)]
    rows = [(i, blocks[i].start * unit, positions[i] + 1) for i in decode] if kernel else None
    return AttnMeta(cache=cache, slots=torch.tensor(slots, **as_long), positions=torch.tensor(positions, **as_long),
                    decode=() if kernel else _decode_groups(blocks, positions, decode, device),
                    decode_rows=None if rows is None else torch.tensor(rows, dtype=torch.long).view(-1, 3),
                    prefills=tuple((s, e, b.start * unit, p) for s, e, b, p in prefills))


def _decode_groups(blocks: list[Block], positions: list[int], decode: list[int],
                   device: torch.device) -> tuple[DecodeGroup, ...]:
    """The torch path's decode tokens, by the order of their sequences' blocks."""
    as_long = dict(dtype=torch.long, device=device)
    by_order: dict[int, list[int]] = {}
    for i in decode:
        by_order.setdefault(blocks[i].order, []).append(i)
    groups = []
    for order, idx in sorted(by_order.items()):
        rows = [blocks[i].row for i in idx]
        lens = [positions[i] + 1 for i in idx]
        lo, span, length = min(rows), max(rows) - min(rows) + 1, max(lens)
        mask = torch.zeros(span, length, dtype=torch.bool)
        mask[:, 0] = True  # rows not decoding this step attend to key 0 (result discarded, no NaN)
        for r, n in zip(rows, lens, strict=True):
            mask[r - lo, :n] = True
        groups.append(DecodeGroup(order, torch.tensor(idx, **as_long), torch.tensor([r - lo for r in rows], **as_long),
                                  lo, span, mask.view(span, 1, 1, length).to(device), length))
    return tuple(groups)


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: the step's AttnMeta is in the forward context bound on this thread
    (`step_context.running`).

    query: [1, H, N, D]; key/value: [1, Hkv, N, D]. Returns ([1, N, H, D], None). Under torch.compile the
    attention is the opaque `loramux::attention` op (server/compiled.py), which runs `attend`.
    """
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if torch.compiler.is_compiling():
        out = torch.ops.loramux.attention(query, key, value, module.layer_idx, scale)
    else:
        out = attend(running().current.attn, module.layer_idx, query, key, value, scale)
    return out.unsqueeze(0), None


def attend(meta: AttnMeta, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           scaling: float) -> torch.Tensor:
    """Write the step's keys and values into the arena, then attend: [N, H, D] (query: [1, H, N, D])."""
    kc, vc = meta.cache.k[layer], meta.cache.v[layer]  # [Hkv, T_arena, D]
    kc[:, meta.slots] = key[0]
    vc[:, meta.slots] = value[0]
    n, heads, dim = query.shape[2], query.shape[1], query.shape[3]
    gqa = heads != kc.shape[0]
    out = query.new_empty(n, heads, dim)  # [N, H, D]
    if meta.decode_rows is not None and len(meta.decode_rows):
        q = query[0].transpose(0, 1)  # [N, H, D]
        q = q if q.stride(-1) == 1 else q.contiguous()
        torch.ops.loramux_attention.decode_attention(q, kc, vc, meta.decode_rows, scaling, out)
    for g in meta.decode:
        _decode(meta.cache, layer, g, query, out, scaling)
    for start, end, first, pos0 in meta.prefills:
        length = pos0 + end - start
        q = query[:, :, start:end]  # [1, H, n, D]
        k, v = kc[None, :, first : first + length], vc[None, :, first : first + length]  # [1, Hkv, length, D]
        if pos0 == 0:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
        else:
            qpos = torch.arange(pos0, length, device=q.device)
            mask = qpos[:, None] >= torch.arange(length, device=q.device)[None, :]  # [n, length]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa)
        out[start:end] = o[0].transpose(0, 1)
    return out


def _decode(cache: KVCache, layer: int, g: DecodeGroup, query: torch.Tensor, out: torch.Tensor,
            scaling: float) -> None:
    """One query token per row of `g`'s blocks: out[g.idx] = attention over each block's first g.length keys.

    Per KV head, two batched matmuls and a softmax in fp32 over the blocks' keys and values in place, in the
    model's dtype: each head's [span, T, D] is a plain strided batch of the arena (rows of one order are evenly
    spaced), so nothing is copied; over all heads at once the batch dimensions (rows, heads) do not flatten to one
    stride and matmul would copy every attended key and value each step (a quarter of a 64-row fp32 decode step
    of the default model). On CPU this takes a fraction of SDPA's one-query time (5-10x slower in bf16)."""
    heads, dim = query.shape[1], query.shape[3]
    kv_heads = cache.kv_heads
    group = heads // kv_heads  # query head h reads KV head h // group
    q = query[0].index_select(1, g.idx).transpose(0, 1)  # [n, H, D]
    qd = query.new_zeros(g.span, heads, dim)  # [span, H, D]: rows not decoding this step stay zero
    qd[g.rows] = q
    kr, vr = cache.rows(layer, g.order)  # [rows, Hkv, block_tokens, D] views
    hidden = ~g.mask.view(g.span, 1, g.length)  # [span, 1, T]
    o = qd.new_empty(g.span, heads, dim)
    for h in range(kv_heads):
        k = kr[g.lo : g.lo + g.span, h, : g.length]  # [span, T, D], strided in place
        v = vr[g.lo : g.lo + g.span, h, : g.length]
        heads_h = slice(h * group, (h + 1) * group)
        if k.dtype == torch.bfloat16:  # oneDNN copies a strided k^T operand; k @ q^T reads k in place, same sums
            scores = torch.bmm(k, qd[:, heads_h].transpose(1, 2)).transpose(1, 2).float()  # [span, G, T]
        else:
            scores = torch.bmm(qd[:, heads_h], k.transpose(1, 2)).float()  # [span, G, T]
        scores.mul_(scaling).masked_fill_(hidden, float("-inf"))
        o[:, heads_h] = torch.bmm(scores.softmax(-1).to(v.dtype), v)  # [span, G, D]
    out[g.idx] = o[g.rows].to(out.dtype)


def _no_mask(*args, **kwargs):
    return None


ATTENTION = "loramux"


def register() -> str:
    """Register the packed attention with transformers (the same for every model); returns its name."""
    AttentionInterface.register(ATTENTION, packed_attention)
    AttentionMaskInterface.register(ATTENTION, _no_mask)
    return ATTENTION
