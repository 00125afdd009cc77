"""Which projections of a model read the same input (q/k/v, gate/up, ...), taken from the model itself.

transformers exposes no packed-module map, and a table per architecture goes stale. So the map is
measured: one forward of two tokens with a pre-hook on every targetable projection records the input
tensor each receives, and projections called one after another, under one parent, with the very same
tensor object form a group. Their LoRA shrink x·A is then computed once for the whole group. The
grouping only saves work: the LoRA layers check at every step that the group's members receive the same
tensor (``StepContext.shared``) and recompute otherwise.
"""

from __future__ import annotations

import torch
from torch import nn


def shared_input_groups(model: nn.Module, modules: dict[str, nn.Module]) -> list[list[str]]:
    """Partition `modules` (name -> module of `model`) into groups that read the same input, in call order.

    Modules the probe forward does not reach form groups of their own.
    """
    calls: list[tuple[str, torch.Tensor]] = []
    hooks = [mod.register_forward_pre_hook(_recorder(calls, name)) for name, mod in modules.items()]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    groups: list[list[str]] = []
    last: torch.Tensor | None = None
    seen: set[str] = set()
    for name, x in calls:
        if name in seen:
            continue
        seen.add(name)
        if groups and x is last and _parent(name) == _parent(groups[-1][0]):
            groups[-1].append(name)
        else:
            groups.append([name])
            last = x
    groups += [[name] for name in modules if name not in seen]
    return groups


def _recorder(calls: list[tuple[str, torch.Tensor]], name: str):
    def hook(module: nn.Module, args: tuple) -> None:
        calls.append((name, args[0]))

    return hook


def _parent(name: str) -> str:
    return name.rpartition(".")[0]
