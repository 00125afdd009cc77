"""What a LoRA adapter may replace outright beside its deltas: a trained copy of the embedding or the head
(``modules_to_save``), and trained rows of the embedding (``trainable_token_indices``).

- ``modules_to_save``: PEFT saves the whole trained module as ``<module>.weight``. Only the embedding and the
  head are servable per request (each copy holds vocab x hidden values in the adapter's device slot: 28.3M, 113
  MB in fp32, for the default model); any other module is refused with its size.
- ``trainable_token_indices`` (a list of token ids, or ``{"<embedding>": [...]}``): PEFT saves
  ``<embedding>.token_adapter.trainable_tokens_delta`` [n, hidden], the new rows of those tokens (PEFT's
  ``index_copy``); with tied embeddings the head's rows of those tokens are the same (PEFT ties them).

Neither is a delta, so such an adapter is never merged or composed. An edge takes one of LoRA, a copy or
trained rows.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from adapters_store.config import INCOMPATIBLE, brief, check_entries, config_error, invalid
from adapters_store.edges import edge_modules
from adapters_store.prompt import ModelGeometry

MAX_TRAINABLE_TOKENS = 4096  # token ids of one adapter whose rows it trains
MAX_ROW_ENTRY = 1e4  # |entry| of a replaced embedding or head row (trained ones stay within ~1)
_TOKENS_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.token_adapter\.trainable_tokens_delta$")


@dataclass(frozen=True, eq=False)
class TokenRows:
    """Trained rows of the embedding (and, tied, of the head)."""

    indices: torch.Tensor  # [n] long, distinct token ids
    rows: torch.Tensor  # [n, hidden]
    tied_head: bool  # the head's rows of these tokens are these rows too


@dataclass(frozen=True, eq=False)
class Replacements:
    copies: Mapping[str, torch.Tensor]  # "embed" / "head" -> its trained copy [vocab, hidden]
    tokens: TokenRows | None


def take_replacements(adapter_id: str, raw: dict[str, Any], tensors: dict[str, torch.Tensor],
                      geometry: ModelGeometry | None) -> Replacements:
    """Remove the replacements' tensors from `tensors` (what is left is LoRA's) and return them, checked."""
    edges = edge_modules(geometry)
    copies = _copies(adapter_id, raw.get("modules_to_save"), tensors, edges, geometry)
    tokens = _tokens(adapter_id, raw.get("trainable_token_indices"), tensors, edges, geometry)
    return Replacements(copies, tokens)


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _copies(adapter_id: str, names: Any, tensors: dict[str, torch.Tensor], edges: dict[str, str],
            g: ModelGeometry | None) -> dict[str, torch.Tensor]:
    bad = config_error(adapter_id)
    if not names:
        return {}
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(names) > 8:
        raise bad(f"modules_to_save must be a list of at most 8 module names, got {names!r}")
    copies = {}
    for name in names:
        module = next((m for m in edges if m == name or _short(m) == name), None)
        if module is None:
            size = sum(tensors[k].numel() for k in _module_keys(tensors, name))
            raise bad(f"modules_to_save entry '{name}' ({size} trained parameters) is not supported: only the "
                      f"embedding and the head ({', '.join(_short(m) for m in edges) or 'none here'}) can be "
                      "replaced per request")
        key = next((k for k in _module_keys(tensors, module) if k.endswith(".weight")), None)
        if key is None:
            raise invalid(adapter_id, f"modules_to_save names '{name}', but the weights file has no "
                          f"'{module}.weight'")
        t = tensors.pop(key)
        _check_rows(adapter_id, key, t, g, g.vocab)
        copies[edges[module]] = t
    return copies


def _module_keys(tensors: Mapping[str, torch.Tensor], name: str) -> list[str]:
    """The keys of a module's own parameters (a trained copy PEFT saves: '<module>.weight', '.bias')."""
    keys = []
    for key in tensors:
        path = key.removeprefix("base_model.model.")
        module = path.rpartition(".")[0]
        if "lora_" not in path and (module == name or module.endswith(f".{name}")):
            keys.append(key)
    return keys


def _tokens(adapter_id: str, spec: Any, tensors: dict[str, torch.Tensor], edges: dict[str, str],
            g: ModelGeometry | None) -> TokenRows | None:
    bad = config_error(adapter_id)
    if spec is None:
        return None
    embed = next((m for m, edge in edges.items() if edge == "embed"), None)
    if isinstance(spec, dict):
        if len(spec) != 1 or embed is None or next(iter(spec)) not in (embed, _short(embed)):
            raise bad(f"trainable_token_indices={brief(spec, 120)}: only the input embedding's tokens are servable "
                      f"(key '{_short(embed) if embed else 'none here'}')", **INCOMPATIBLE)
        spec = next(iter(spec.values()))
    if embed is None:
        raise bad("trainable_token_indices needs the base model's embedding, which this validator was not given",
                  **INCOMPATIBLE)
    ints = isinstance(spec, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in spec)
    if not ints or not 1 <= len(spec) <= MAX_TRAINABLE_TOKENS:
        raise bad(f"trainable_token_indices must list 1 to {MAX_TRAINABLE_TOKENS} token ids, got {brief(spec, 120)}")
    out = [i for i in spec if not 0 <= i < g.vocab]
    if out or len(set(spec)) != len(spec):
        what = f"ids outside [0, {g.vocab})" if out else "repeated ids"
        raise bad(f"trainable_token_indices has {what}: {brief(out or spec, 120)}")
    keys = [k for k in tensors if (m := _TOKENS_KEY.match(k)) and m.group("module") == embed]
    if len(keys) != 1:
        raise invalid(adapter_id, f"trainable_token_indices is set, but the weights file has no "
                      f"'{embed}.token_adapter.trainable_tokens_delta'")
    rows = tensors.pop(keys[0])
    _check_rows(adapter_id, keys[0], rows, g, len(spec))
    return TokenRows(torch.tensor(spec, dtype=torch.long), rows, tied_head=g.tied)


def _check_rows(adapter_id: str, key: str, t: torch.Tensor, g: ModelGeometry, n: int) -> None:
    if list(t.shape) != [n, g.hidden]:
        raise invalid(adapter_id, f"tensor '{key}' has shape {list(t.shape)}, expected [{n}, {g.hidden}]",
                      **INCOMPATIBLE)
    check_entries(adapter_id, key, t, MAX_ROW_ENTRY, f"tensor '{key}'")
