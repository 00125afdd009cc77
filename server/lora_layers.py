"""LoRA-aware projections: each targetable projection is wrapped once at start-up.

Layer contract (as in vLLM's `vllm/lora/`): replace once (`LoraRuntime.attach`), set or reset a
slot (`load_slot` / `clear_slot`), forward with the step's per-token slot plan (`LoraRuntime.batch`,
set by the model runner before each forward). Projections that read the same input (q/k/v,
gate/up) share one group, so the shrink x·A is computed once for all of them.
"""

from __future__ import annotations

import torch
from torch import nn

from adapters_store.format import LoraAdapter, ModuleShape
from server.lora_batch import LoraBatch, place_slot
from server.lora_ops import Shrunk, expand, shrink

try:  # GPT-2 style projections (weight stored [d_in, d_out])
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()

# Sibling projections that every supported architecture feeds with the same input.
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))


def side_path_dtype(model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """fp32 on CPU, where bf16/f16 matmuls of LoRA's small shapes cost about twice fp32's (the buffers
    then take twice the memory); the model's dtype elsewhere."""
    return torch.float32 if device.type == "cpu" else model_dtype


def projection_shape(module: nn.Module) -> ModuleShape:
    if isinstance(module, nn.Linear):
        return ModuleShape(module.in_features, module.out_features)
    d_in, d_out = module.weight.shape  # Conv1D
    return ModuleShape(d_in, d_out, fan_in_fan_out=True)


def targetable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every nn.Linear / Conv1D of the model except the output head."""
    head = model.get_output_embeddings()
    return {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, (nn.Linear, Conv1D)) and mod is not head
    }


class ProjectionGroup:
    """Slot buffers and shared shrink of M projections that read the same input."""

    def __init__(self, runtime: LoraRuntime, names: list[str], shapes: list[ModuleShape]):
        self.runtime = runtime
        self.names = names
        self.shapes = shapes
        s, r = runtime.max_loras, runtime.max_rank
        kw = dict(device=runtime.device, dtype=runtime.dtype)
        d_in = shapes[0].d_in
        self.A = torch.zeros(s, r, len(names), d_in, **kw)  # [S, r_max, M, d_in]
        self.B = [torch.zeros(s, r, sh.d_out, **kw) for sh in shapes]  # [S, r_max, d_out] each (B transposed)
        self.has = [False] * s  # slot has weights for at least one member
        self._key: tuple[int, int] | None = None
        self._shrunk: Shrunk | None = None

    def active(self, batch: LoraBatch) -> bool:
        if batch.subtract is not None and self.has[batch.subtract[2]]:
            return True
        return any(self.has[slot] for slot in batch.slots)

    def apply(self, member: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch = self.runtime.batch
        if batch is None or batch.empty or not self.active(batch):
            return y
        x2 = x.reshape(-1, x.shape[-1])  # [N, d_in]
        key = (self.runtime.step, x2.data_ptr())
        if self._key != key:
            self._shrunk = shrink(x2.to(self.A.dtype), self.A, batch)
            self._key = key
        expand(y.view(-1, y.shape[-1]), self._shrunk, member, self.B[member], batch)
        return y

    def load(self, slot: int, adapter: LoraAdapter) -> None:
        self.A[slot].zero_()
        found = False
        for j, name in enumerate(self.names):
            self.B[j][slot].zero_()
            w = adapter.weights.get(name)
            if w is None:
                continue
            r = w.A.shape[0]
            self.A[slot, :r, j].copy_(w.A)
            self.B[j][slot, :r].copy_(w.B.float().mul(w.scale).T)
            found = True
        self.has[slot] = found

    def clear(self, slot: int) -> None:
        self.A[slot].zero_()
        for b in self.B:
            b[slot].zero_()
        self.has[slot] = False

    def delta(self, member: int, slot: int) -> torch.Tensor:
        """s·B·A of one member for the adapter in `slot`, float32: [d_out, d_in]."""
        return self.B[member][slot].float().T @ self.A[slot, :, member].float()


class LoraProjection(nn.Module):
    """A base projection plus the side paths of its group."""

    def __init__(self, base: nn.Module, group: ProjectionGroup, member: int):
        super().__init__()
        self.base = base
        self.group = group
        self.member = member

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.apply(self.member, x, self.base(x))


class LoraRuntime:
    """All LoRA slots of one model: buffers, the step's batch plan, and the slot ranks."""

    def __init__(self, model: nn.Module, max_loras: int, max_rank: int):
        self.max_loras = max_loras
        self.max_rank = max_rank
        param = next(model.parameters())
        self.device = param.device
        self.dtype = side_path_dtype(param.dtype, param.device)  # of the slot buffers and side paths
        self.batch: LoraBatch | None = None
        self.step = 0
        self.slot_ranks = [0] * max_loras
        self.modules: dict[str, nn.Module] = targetable_modules(model)
        self.shapes = {name: projection_shape(m) for name, m in self.modules.items()}
        self.groups: list[ProjectionGroup] = []
        self.member_of: dict[str, tuple[ProjectionGroup, int]] = {}
        self._attach(model)

    def _attach(self, model: nn.Module) -> None:
        by_parent: dict[str, list[str]] = {}
        for name in self.modules:
            parent, _, _ = name.rpartition(".")
            by_parent.setdefault(parent, []).append(name)
        for names in by_parent.values():
            leaf = {n.rpartition(".")[2]: n for n in names}
            grouped: set[str] = set()
            for members in SHARED_INPUT:
                present = [leaf[m] for m in members if m in leaf]
                if len(present) > 1 and len({self.shapes[n].d_in for n in present}) == 1:
                    self._add_group(model, present)
                    grouped.update(present)
            for n in names:
                if n not in grouped:
                    self._add_group(model, [n])

    def _add_group(self, model: nn.Module, names: list[str]) -> None:
        group = ProjectionGroup(self, names, [self.shapes[n] for n in names])
        self.groups.append(group)
        for j, name in enumerate(names):
            self.member_of[name] = (group, j)
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, leaf, LoraProjection(self.modules[name], group, j))

    @property
    def target_shapes(self) -> dict[str, ModuleShape]:
        return dict(self.shapes)

    def set_batch(self, batch: LoraBatch | None) -> None:
        """Install the plan of the next forward (the per-token slots travel as data in it)."""
        self.batch = batch
        self.step += 1

    # SlotLoader protocol of adapters_store.residency
    def load_slot(self, slot: int, adapter: LoraAdapter) -> None:
        with torch.no_grad():
            for group in self.groups:
                group.load(slot, adapter)
        self.slot_ranks[slot] = adapter.rank

    def clear_slot(self, slot: int) -> None:
        with torch.no_grad():
            for group in self.groups:
                group.clear(slot)
        self.slot_ranks[slot] = 0

    def choose_slot(self, rank: int, free: list[int]) -> int:
        return place_slot(self.slot_ranks, rank, free)
