"""The LoRA runtime of one model: its projections wrapped once, grouped by shared input, with slot buffers.

It is the ``SlotDevice`` behind the slot table: it writes and clears slots, and folds one slot into the
base weights (exactly reversibly, see ``merge.py``). It holds no bookkeeping of its own: which adapter
sits in which slot, with which rank, and which slot is merged, is the slot table's.
"""

from __future__ import annotations

import torch
from torch import nn

from adapters_store.format import LoraAdapter, ModuleShape
from server.gemm import PackedLinear, prepack_supported
from server.lora.edges import EdgeSlots
from server.lora.layers import LoraProjection, ProjectionGroup
from server.lora.merge import MergedWeights
from server.lora.packing import shared_input_groups
from server.step_context import ForwardContext

try:  # GPT-2 style projections (weight stored [d_in, d_out])
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()


def side_path_dtype(model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Of the side paths' scales and edges: fp32 on CPU, where bf16/f16 matmuls of LoRA's small shapes cost
    up to twice fp32's (the buffers then take twice the memory); the model's dtype elsewhere."""
    return torch.float32 if device.type == "cpu" else model_dtype


def slot_weight_dtype(model_dtype: torch.dtype, device: torch.device, kernels: bool) -> torch.dtype:
    """Of the slot buffers A and B: the side paths' dtype, except for a bf16 model on CPU whose decode rows go
    to loramux's kernels (`kernels`): bf16, half the memory at about fp32's speed (the kernels widen it in
    registers and sum in fp32, and are not bound by the bytes they read; its prefill side paths are torch's
    bf16 matmuls, as PEFT's are)."""
    if kernels and device.type == "cpu" and model_dtype == torch.bfloat16:
        return torch.bfloat16
    return side_path_dtype(model_dtype, device)


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


class LoraRuntime:
    """`prepack`: the base projections' GEMMs run through oneDNN over reordered weights (CPU; server/gemm.py).
    `kernels`: the side paths' runs go to loramux's CPU kernels (server/lora/kernels.py)."""

    def __init__(self, model: nn.Module, n_slots: int, max_rank: int, context: ForwardContext, prepack: bool = False,
                 kernels: bool = False):
        param = next(model.parameters())
        self.device = param.device
        self.dtype = slot_weight_dtype(param.dtype, param.device, kernels)  # of the slot buffers A and B
        scale_dtype = side_path_dtype(param.dtype, param.device)  # of DoRA / IA3 scales and the edges
        self.n_slots = n_slots
        self.modules = targetable_modules(model)
        self.shapes = {name: projection_shape(m) for name, m in self.modules.items()}  # what adapters may target
        self.groups: list[ProjectionGroup] = []
        self.packed: dict[str, PackedLinear] = {}
        self.projections: list[LoraProjection] = []  # by LoraProjection.index
        for names in shared_input_groups(model, self.modules):
            if len({self.shapes[n].d_in for n in names}) > 1:  # cannot happen for one input tensor
                raise ValueError(f"projections {names} read one input but differ in d_in")
            biases = [getattr(self.modules[n], "bias", None) for n in names]
            group = ProjectionGroup(len(self.groups), names, [self.shapes[n] for n in names], n_slots, max_rank,
                                    self.device, self.dtype, context, biases, scale_dtype)
            self.groups.append(group)
            packs = _pack_group([self.modules[n] for n in names], prepack)
            for member, (name, packed) in enumerate(zip(names, packs, strict=True)):
                self.projections.append(LoraProjection(self.modules[name], group, member, len(self.projections),
                                                       packed))
                _replace(model, name, self.projections[-1])
                if packed is not None:
                    self.packed[name] = packed
        context.projections = self.projections  # what the compiled graph's opaque op runs, by index
        vocab = model.get_input_embeddings().weight.shape[0]
        self.edges = EdgeSlots(self.device, scale_dtype, param.dtype, vocab)  # adapters of the embedding and head
        self.merged = MergedWeights(self.groups, self.modules, self.shapes, self.packed)
        for group in self.groups:
            group.original = self.merged.original

    @property
    def buffer_bytes(self) -> int:
        tensors = [t for g in self.groups for t in (g.A, *g.B)]
        return sum(t.numel() * t.element_size() for t in tensors)

    # SlotDevice of server.lora.slots
    @torch.no_grad()
    def write_slot(self, slot: int, adapter: LoraAdapter) -> frozenset[int]:
        self.edges.write(slot, adapter)
        return frozenset(g.index for g in self.groups if g.write(slot, adapter))

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        self.edges.clear(slot)
        for group in self.groups:
            group.clear(slot)

    def fold(self, slot: int | None, rank: int, groups: frozenset[int], dora: bool = False) -> None:
        self.merged.fold(slot, rank, groups, dora)


def _pack_group(modules: list[nn.Module], prepack: bool) -> list[PackedLinear | None]:
    """Each member's prepacked GEMM: one stacked GEMM shared by all members where every one can be packed (one
    input, one d_in and dtype), else one of its own where it can be."""
    if not prepack:
        return [None] * len(modules)
    if (len(modules) > 1 and all(prepack_supported(m.weight) for m in modules)
            and len({m.weight.dtype for m in modules}) == 1):
        return [PackedLinear(*modules)] * len(modules)
    return [PackedLinear(m) if prepack_supported(m.weight) else None for m in modules]


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)
