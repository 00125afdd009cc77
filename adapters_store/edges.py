"""LoRA on the model's edges: the input embedding and the output head.

PEFT saves LoRA on an embedding as ``<embedding>.lora_embedding_A`` ([r, vocab]) and ``lora_embedding_B``
([hidden, r]): a token t gets ``scale · B @ A[:, t]`` added to its embedding. LoRA on the head is plain
linear LoRA (``lora_A`` [r, hidden], ``lora_B`` [vocab, r]). Both are checked as projections of shape
(vocab -> hidden) and (hidden -> vocab).

With either in ``target_modules`` PEFT also saves the frozen base layers (``<module>.base_layer.weight``,
``save_embedding_layers``). loramux serves the base model's own weights, so such a copy is accepted only when
it is the base model's (same shape, row norms within ``BASE_COPY_RTOL``); a changed copy is a fully trained
embedding (modules_to_save), which is refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from adapters_store.config import INCOMPATIBLE, invalid
from adapters_store.prompt import ModelGeometry

BASE_COPY_RTOL = 1e-2  # bf16 rounding moves a row norm by ~1e-3; a trained or resized row moves it far more
EDGES = ("embed", "head")
_BASE_COPY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.base_layer\.weight$")


def edge_modules(geometry: ModelGeometry | None) -> dict[str, str]:
    """module name -> 'embed' or 'head', for the edges the base model has."""
    if geometry is None:
        return {}
    return {name: edge for edge, name in (("embed", geometry.embed_name), ("head", geometry.head_name)) if name}


def without_base_copies(adapter_id: str, tensors: Mapping[str, torch.Tensor],
                        geometry: ModelGeometry | None) -> dict[str, torch.Tensor]:
    """The tensors less the copies of the base embedding and head PEFT saves beside edge LoRA (each checked to be
    the base model's own)."""
    edges = edge_modules(geometry)
    kept = {}
    for key, t in tensors.items():
        match = _BASE_COPY.match(key)
        edge = edges.get(match.group("module")) if match else None
        if edge is None:
            kept[key] = t
            continue
        _check_base_copy(adapter_id, key, t, geometry, edge)
    return kept


def _check_base_copy(adapter_id: str, key: str, t: torch.Tensor, g: ModelGeometry, edge: str) -> None:
    want = [g.vocab, g.hidden]
    if list(t.shape) != want:
        raise invalid(adapter_id, f"tensor '{key}' (a copy of the base {edge} PEFT saves) has shape {list(t.shape)}, "
                      f"but the base model's is {want}: a resized vocabulary is not supported", **INCOMPATIBLE)
    norms = g.embed_norms if edge == "embed" else g.head_norms
    if norms is None:
        return
    got = t.float().norm(dim=1)
    bad = ~torch.isclose(got, norms, rtol=BASE_COPY_RTOL, atol=1e-6)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise invalid(adapter_id, f"tensor '{key}' is not the base model's {edge}: {int(bad.sum())} of {g.vocab} rows "
                      f"differ (row {row}: norm {got[row]:.4g}, the base model's {norms[row]:.4g}); a trained "
                      f"{edge} (modules_to_save) is not supported, and its copy is not needed (PEFT: "
                      "save_embedding_layers=False)")
