"""PEFT IA3 adapters: config and tensors, validated against the base model.

An IA3 adapter (``peft_type: IA3``) learns one vector per targeted projection, saved as
``base_model.model.<module>.ia3_l``: [d_out, 1] scales the projection's output (its bias too), or, for a
module listed in ``feedforward_modules``, [1, d_in] scales its input, as PEFT's ``IA3Layer`` computes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from adapters_store.config import (
    AdapterConfig,
    ValidationLimits,
    check_deadline,
    check_entries,
    config_error,
    fullmatch,
    invalid,
    names_field,
)

if TYPE_CHECKING:
    from adapters_store.format import ModuleShape

MAX_IA3_SCALE = 1024.0  # |entry| of an IA3 vector (trained ones stay near 1)
_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.ia3_l(?:\.(?P<name>[^.]+))?(?:\.weight)?$")
_UNSUPPORTED = ("modules_to_save", "target_parameters")


def parse_ia3(adapter_id: str, raw: dict[str, Any], tensors: Mapping[str, torch.Tensor],
              target_shapes: Mapping[str, ModuleShape], limits: ValidationLimits,
              deadline: float) -> dict[str, tuple[torch.Tensor, bool]]:
    """module -> (its IA3 vector, flattened, and whether it scales the input); 4xx naming what is wrong."""
    bad = config_error(adapter_id)
    for field in _UNSUPPORTED:
        if raw.get(field):
            raise bad(f"{field}={raw[field]!r} is not supported for IA3 adapters")
    if raw.get("fan_in_fan_out") not in (None, False, True):
        raise bad(f"fan_in_fan_out must be true or false, got {raw['fan_in_fan_out']!r}")
    selection = AdapterConfig.selection(adapter_id, raw)
    feedforward = names_field(adapter_id, "feedforward_modules", raw.get("feedforward_modules"))
    vectors: dict[str, tuple[torch.Tensor, bool]] = {}
    for key, tensor in sorted(tensors.items()):
        check_deadline(adapter_id, deadline, limits, len(vectors), len(tensors))
        match = _KEY_RE.match(key)
        if match is None:
            raise invalid(adapter_id, f"unexpected tensor '{key}' in an IA3 adapter: expected '<module>.ia3_l'")
        module = match.group("module")
        if module in vectors:
            raise invalid(adapter_id, f"module {module} has two ia3_l tensors")
        vectors[module] = _check_vector(adapter_id, key, module, tensor, target_shapes, selection, feedforward)
    if not vectors:
        raise invalid(adapter_id, "the weights file holds no IA3 tensors")
    return vectors


def _check_vector(adapter_id: str, key: str, module: str, t: torch.Tensor, target_shapes: Mapping[str, ModuleShape],
                  selection: AdapterConfig, feedforward: str | tuple[str, ...] | None) -> tuple[torch.Tensor, bool]:
    shape = target_shapes.get(module)
    if shape is None:
        raise invalid(adapter_id, f"tensor '{key}' is for module '{module}', which is not a targetable module of "
                      "the base model", status=422, code="adapter_incompatible")
    if not selection.selects(module):
        raise invalid(adapter_id, f"tensor '{key}' is for module '{module}', which the config does not select")
    is_input = _is_feedforward(module, feedforward)
    want = [1, shape.d_in] if is_input else [shape.d_out, 1]
    if list(t.shape) != want:
        what = "a feed-forward module: its input" if is_input else "its output"
        raise invalid(adapter_id, f"tensor '{key}' has shape {list(t.shape)}, expected {want} ({what} features)",
                      status=422, code="adapter_incompatible")
    check_entries(adapter_id, key, t, MAX_IA3_SCALE, f"module {module}: its IA3 vector")
    return t.flatten(), is_input


def _is_feedforward(module: str, feedforward: str | tuple[str, ...] | None) -> bool:
    """peft's IA3 rule: a regex string fully matches the key, or a listed name ends it."""
    if feedforward is None:
        return False
    if isinstance(feedforward, str):
        return fullmatch(feedforward, module)
    return any(module.endswith(name) for name in feedforward)
