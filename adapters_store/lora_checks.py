"""The checks of one LoRA module's tensors: shapes against the base module and the config, DoRA magnitudes,
and the size of the delta (each a 4xx naming the module and the numbers)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from adapters_store.config import INCOMPATIBLE, AdapterConfig, ValidationLimits, check_entries, invalid

if TYPE_CHECKING:
    from adapters_store.format import ModuleShape

MAX_MAGNITUDE = 1e4  # |entry| of a DoRA magnitude vector (trained ones hold weight-row norms, ~1-100)


def dora_magnitude(adapter_id: str, module: str, m_key: str | None, m: torch.Tensor | None, shape: ModuleShape,
                   use_dora: bool) -> torch.Tensor | None:
    """The module's DoRA magnitude vector m [d_out] (None for plain LoRA), checked: present iff use_dora, shape,
    finite, within MAX_MAGNITUDE."""
    if not use_dora:
        if m is not None:
            raise invalid(adapter_id, f"tensor '{m_key}' is a DoRA magnitude vector, but the config does not "
                          "set use_dora=true")
        return None
    if m is None:
        raise invalid(adapter_id, f"module {module} has no lora_magnitude_vector, which use_dora=true requires")
    if m.ndim != 1 or m.shape[0] != shape.d_out:
        raise invalid(adapter_id, f"lora_magnitude_vector for {module} has shape {list(m.shape)}, expected "
                      f"[{shape.d_out}] (d_out)", **INCOMPATIBLE)
    check_entries(adapter_id, m_key, m, MAX_MAGNITUDE, f"module {module}: its magnitude vector")
    return m


def check_magnitude(adapter_id: str, module: str, A: torch.Tensor, B: torch.Tensor, scale: float,
                    limits: ValidationLimits) -> None:
    """|scale| and the largest entry of scale·B·A within the limits (400 naming the numbers)."""
    if not abs(scale) <= limits.max_scale:
        raise invalid(adapter_id, f"module {module}: its scale (lora_alpha / r, or / sqrt(r) for rsLoRA, with the "
                      f"alpha and rank patterns) is {scale:.4g}, above the limit of {limits.max_scale:g}")
    a, b = A.float(), B.float()  # [r, d_in], [d_out, r]
    bound = abs(scale) * b.norm(dim=1).max().item() * a.norm(dim=0).max().item()  # Cauchy-Schwarz, per entry
    if bound <= limits.max_delta:
        return
    peak = max(abs(scale) * (rows @ a).abs().max().item() for rows in b.split(1024))
    if peak > limits.max_delta:
        raise invalid(adapter_id, f"module {module}: the largest entry of scale * B @ A is {peak:.4g}, above the "
                      f"limit of {limits.max_delta:g} (trained adapters stay far below; such a delta would only "
                      "overflow this adapter's own outputs)")


def check_shapes(adapter_id: str, module: str, A: torch.Tensor, B: torch.Tensor, shape: ModuleShape,
                  config: AdapterConfig, limits: ValidationLimits) -> int:
    """A: [r, d_in] and B: [d_out, r] against the module and the config; returns r."""
    r_cfg, r_source = config.rank_for(module)
    for name, t in (("lora_A", A), ("lora_B", B)):
        if t.ndim != 2:
            raise invalid(adapter_id, f"{name} for {module} has shape {list(t.shape)}, expected a 2-d matrix")
    if A.shape[1] != shape.d_in:
        hint = " (looks transposed)" if A.shape[0] == shape.d_in else ""
        raise invalid(adapter_id, f"lora_A for {module} has shape {list(A.shape)}, "
                      f"expected [{r_cfg}, {shape.d_in}] (r x d_in){hint}", **INCOMPATIBLE)
    if B.shape[0] != shape.d_out:
        hint = " (looks transposed)" if B.shape[1] == shape.d_out else ""
        raise invalid(adapter_id, f"lora_B for {module} has shape {list(B.shape)}, "
                      f"expected [{shape.d_out}, {r_cfg}] (d_out x r){hint}", **INCOMPATIBLE)
    r = A.shape[0]
    if B.shape[1] != r:
        raise invalid(adapter_id, f"module {module}: lora_A has rank {r} (shape {list(A.shape)}) "
                      f"but lora_B has rank {B.shape[1]} (shape {list(B.shape)})")
    if r > limits.max_rank:
        raise invalid(adapter_id, f"module {module} has rank {r}, above the server's max rank {limits.max_rank}",
                      status=422)
    if r != r_cfg:
        raise invalid(adapter_id, f"module {module} has tensor rank {r} but the config says {r_source}={r_cfg}")
    return r


def show(value: Any) -> str:
    return repr(list(value)) if isinstance(value, tuple) else repr(value)
