"""PEFT prompt tuning and prefix tuning adapters: virtual tokens, validated against the base model.

Both save one tensor, ``prompt_embeddings``, as PEFT's ``save_pretrained`` writes it (a prefix projection
is already folded in: the saved tensor is the encoder's output):

- ``PROMPT_TUNING``: [n, hidden], virtual input embeddings that run through the model before the prompt
  (positions 0..n-1; the prompt starts at position n).
- ``PREFIX_TUNING``: [n, layers * 2 * kv_heads * head_dim], per-layer keys and values that sit in the KV
  cache before the prompt (PEFT's ``get_prompt`` view: layer l's keys are the 2l-th slice, its values the
  (2l+1)-th; positions 0..n-1 of the cache, no rotary embedding applied; the prompt starts at position n).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from adapters_store.config import INCOMPATIBLE, check_entries, config_error, invalid

PROMPT_TYPES = {"PROMPT_TUNING": "prompt", "PREFIX_TUNING": "prefix"}
MAX_VIRTUAL_TOKENS = 512  # virtual tokens of one adapter (PEFT's examples use 8-30)
MAX_VIRTUAL_ENTRY = 1e4  # |entry| of a virtual embedding, key or value (trained ones stay within 1-100)
TENSOR_KEY = "prompt_embeddings"


@dataclass(frozen=True, eq=False)
class ModelGeometry:
    """What virtual tokens must fit (the base model's embedding width and its KV cache's shape), and what LoRA on
    the input embedding and the output head must fit (their module names, the vocabulary, and their weights'
    row norms, against which a copy PEFT saves beside such an adapter is checked)."""

    hidden: int
    layers: int
    kv_heads: int
    head_dim: int
    vocab: int = 0
    embed_name: str = ""  # e.g. model.embed_tokens (empty: LoRA on the embedding is not servable)
    head_name: str = ""  # e.g. lm_head
    embed_norms: torch.Tensor | None = None  # [vocab] float32: the embedding's row norms
    head_norms: torch.Tensor | None = None  # [vocab] float32: the head's row norms
    tied: bool = False  # the head's weight is the embedding's


@dataclass(frozen=True, eq=False)
class VirtualTokens:
    """The virtual tokens of a prompt or prefix tuning adapter, in the form the engine uses them."""

    kind: Literal["prompt", "prefix"]
    count: int  # n: the sequence's first n positions are these tokens
    tensor: torch.Tensor  # prompt: [n, hidden]; prefix: [layers, 2, kv_heads, n, head_dim] (keys, values)


def parse_prompt(adapter_id: str, raw: dict[str, Any], tensors: Mapping[str, torch.Tensor],
                 geometry: ModelGeometry | None) -> VirtualTokens:
    """The adapter's virtual tokens; 4xx naming what is wrong (422 when they do not fit the base model)."""
    bad = config_error(adapter_id)
    kind = PROMPT_TYPES[raw["peft_type"]]
    if geometry is None:
        raise invalid(adapter_id, f"{raw['peft_type']} adapters need the base model's geometry, which this "
                      "validator was not given", **INCOMPATIBLE)
    _check_config(bad, raw, geometry, kind)
    n = raw["num_virtual_tokens"]
    if set(tensors) != {TENSOR_KEY}:
        raise invalid(adapter_id, f"a {raw['peft_type']} adapter holds exactly one tensor, '{TENSOR_KEY}'; this "
                      f"one holds {sorted(tensors)[:8]}")
    t = tensors[TENSOR_KEY]
    g = geometry
    width = g.hidden if kind == "prompt" else g.layers * 2 * g.kv_heads * g.head_dim
    if list(t.shape) != [n, width]:
        what = "hidden size" if kind == "prompt" else f"layers {g.layers} x 2 x kv_heads {g.kv_heads} x head_dim " \
               f"{g.head_dim}"
        raise invalid(adapter_id, f"tensor '{TENSOR_KEY}' has shape {list(t.shape)}, expected [{n}, {width}] "
                      f"(num_virtual_tokens x {what})", **INCOMPATIBLE)
    check_entries(adapter_id, TENSOR_KEY, t, MAX_VIRTUAL_ENTRY, f"tensor '{TENSOR_KEY}'")
    if kind == "prompt":
        return VirtualTokens("prompt", n, t)
    kv = t.view(n, g.layers, 2, g.kv_heads, g.head_dim).permute(1, 2, 3, 0, 4).contiguous()
    return VirtualTokens("prefix", n, kv)  # [layers, 2, kv_heads, n, head_dim]


def _check_config(bad, raw: dict[str, Any], g: ModelGeometry, kind: str) -> None:
    task = raw.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        raise bad(f"task_type={task!r}: only CAUSAL_LM prompt learning adapters are served")
    if raw.get("num_transformer_submodules") not in (None, 1):
        raise bad(f"num_transformer_submodules={raw['num_transformer_submodules']!r}: only decoder-only models "
                  "(1) are served", **INCOMPATIBLE)
    if raw.get("modules_to_save"):
        raise bad(f"modules_to_save={raw['modules_to_save']!r} is not supported")
    n = raw.get("num_virtual_tokens")
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_VIRTUAL_TOKENS:
        raise bad(f"num_virtual_tokens must be an integer in [1, {MAX_VIRTUAL_TOKENS}], got {n!r}")
    layers = raw.get("num_layers")
    if kind == "prefix" and layers not in (None, g.layers):
        raise bad(f"num_layers={layers!r}, but the base model has {g.layers} layers", **INCOMPATIBLE)
