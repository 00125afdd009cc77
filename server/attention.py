"""Packed-batch attention over a preallocated row KV cache, plugged into transformers' models.

Each running sequence owns one row of the cache for its whole life; a step packs the new tokens of
all sequences into one [1, N] batch (decode tokens and prefill chunks mixed). Keys and values are
written in place at (row, position); nothing is re-padded or copied between steps. Decode tokens
attend in one batched SDPA call over the rows they occupy; prefill chunks attend per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from server.step_context import ForwardContext


class KVCache:
    """Per layer K and V: [rows, kv_heads, max_len, head_dim], allocated once."""

    def __init__(self, layers: int, rows: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (rows, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.rows, self.max_len = rows, max_len

    @property
    def nbytes(self) -> int:
        return 2 * sum(t.numel() * t.element_size() for t in self.k)

    def clear(self, row: int, length: int) -> None:
        """Zero positions [0, length) of a row being given back. Attention masks a row's later positions, but
        a masked key still multiplies its value by a softmax weight of 0, and 0 * NaN is NaN: what one sequence
        left in a row must not reach the next one."""
        for k, v in zip(self.k, self.v, strict=True):
            k[row, :, :length].zero_()
            v[row, :, :length].zero_()


@dataclass(frozen=True)
class AttnMeta:
    """Where each packed token of a step lives in the cache and what it attends to."""

    cache: KVCache
    rows: torch.Tensor  # [N] long: cache row of each token
    positions: torch.Tensor  # [N] long: position of each token in its sequence
    dec_idx: torch.Tensor | None  # [n_dec] long: packed index of each decode token
    dec_rows: torch.Tensor | None  # [n_dec] long: its row minus dec_row_lo
    dec_row_lo: int
    dec_row_span: int  # rows dec_row_lo .. dec_row_lo + span - 1 are attended in one call
    dec_mask: torch.Tensor | None  # [span, 1, 1, dec_len] bool: key visible
    dec_len: int  # longest decode sequence (keys 0..dec_len-1)
    prefills: tuple[tuple[int, int, int, int], ...]  # (start, end, row, pos0) chunks


def build_attn_meta(cache: KVCache, rows: list[int], positions: list[int], decode: list[int],
                    prefills: list[tuple[int, int, int, int]], device: torch.device) -> AttnMeta:
    """decode: packed indices of single decode tokens (one per sequence); prefills: chunks."""
    as_long = dict(dtype=torch.long, device=device)
    dec_idx = dec_rows = dec_mask = None
    lo = span = dec_len = 0
    if decode:
        d_rows = [rows[i] for i in decode]
        lens = [positions[i] + 1 for i in decode]
        lo, span, dec_len = min(d_rows), max(d_rows) - min(d_rows) + 1, max(lens)
        mask = torch.zeros(span, dec_len, dtype=torch.bool)
        mask[:, 0] = True  # rows not decoding this step attend to key 0 (result discarded, no NaN)
        for r, n in zip(d_rows, lens, strict=True):
            mask[r - lo, :n] = True
        dec_idx = torch.tensor(decode, **as_long)
        dec_rows = torch.tensor([r - lo for r in d_rows], **as_long)
        dec_mask = mask.view(span, 1, 1, dec_len).to(device)
    return AttnMeta(
        cache=cache,
        rows=torch.tensor(rows, **as_long),
        positions=torch.tensor(positions, **as_long),
        dec_idx=dec_idx, dec_rows=dec_rows, dec_row_lo=lo, dec_row_span=span,
        dec_mask=dec_mask, dec_len=dec_len, prefills=tuple(prefills),
    )


def packed_attention(context: ForwardContext, module, query, key, value, attention_mask, scaling=None,
                     dropout=0.0, **kwargs):
    """transformers attention interface (bound to a model's ForwardContext, which holds the step's AttnMeta).

    query: [1, H, N, D]; key/value: [1, Hkv, N, D]. Returns ([1, N, H, D], None).
    """
    meta: AttnMeta = context.current.attn
    layer = module.layer_idx
    kc, vc = meta.cache.k[layer], meta.cache.v[layer]  # [R, Hkv, T, D]
    kc[meta.rows, :, meta.positions] = key[0].transpose(0, 1)  # [N, Hkv, D]
    vc[meta.rows, :, meta.positions] = value[0].transpose(0, 1)
    n, heads, dim = query.shape[2], query.shape[1], query.shape[3]
    gqa = heads != kc.shape[1]
    out = query.new_empty(n, heads, dim)  # [N, H, D]
    if meta.dec_idx is not None:
        # CPU's bf16/f16 SDPA kernel takes 5-10x fp32's time for one query token (the same error: it
        # accumulates in fp32 too), so on CPU decode attends in fp32 and casts the result back.
        work = torch.float32 if query.device.type == "cpu" else query.dtype
        q = query[0].index_select(1, meta.dec_idx).transpose(0, 1).to(work)  # [n_dec, H, D]
        qd = query.new_zeros(meta.dec_row_span, heads, 1, dim, dtype=work)  # [span, H, 1, D]
        qd[meta.dec_rows, :, 0] = q
        lo, hi = meta.dec_row_lo, meta.dec_row_lo + meta.dec_row_span
        k = kc[lo:hi, :, : meta.dec_len].to(work)  # [span, Hkv, T, D]
        v = vc[lo:hi, :, : meta.dec_len].to(work)
        o = F.scaled_dot_product_attention(
            qd, k, v, attn_mask=meta.dec_mask, scale=scaling, enable_gqa=gqa,
        )  # [span, H, 1, D]
        out[meta.dec_idx] = o[meta.dec_rows, :, 0].to(out.dtype)
    for start, end, row, pos0 in meta.prefills:
        length = pos0 + end - start
        q = query[:, :, start:end]  # [1, H, n, D]
        k, v = kc[row : row + 1, :, :length], vc[row : row + 1, :, :length]
        if pos0 == 0:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
        else:
            qpos = torch.arange(pos0, length, device=q.device)
            mask = qpos[:, None] >= torch.arange(length, device=q.device)[None, :]  # [n, length]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa)
        out[start:end] = o[0].transpose(0, 1)
    return out.unsqueeze(0), None


def _no_mask(*args, **kwargs):
    return None


def register(context: ForwardContext) -> str:
    """Register the packed attention of one model (reading `context`) with transformers; returns its name."""
    name = f"loramux_{id(context):x}"
    AttentionInterface.register(name, partial(packed_attention, context))
    AttentionMaskInterface.register(name, _no_mask)
    return name
