"""Helpers of the adapter format tests: tiny PEFT-made adapters and the parse/edit/reject wrappers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors.torch
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from adapters_store.errors import AdapterValidationError
from adapters_store.format import (
    LoraAdapter,
    ModuleShape,
    ValidationLimits,
    parse_adapter,
    read_adapter_dir,
)

PREFIX = "base_model.model."
Q0 = "model.layers.0.self_attn.q_proj"
K0 = "model.layers.0.self_attn.k_proj"
V0 = "model.layers.0.self_attn.v_proj"
LIMITS = ValidationLimits()


def tiny_llama() -> LlamaForCausalLM:
    """GQA: q_proj is 64 -> 64, k_proj and v_proj are 64 -> 32."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config)


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config)


def target_shapes(model: nn.Module) -> dict[str, ModuleShape]:
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            shapes[name] = ModuleShape(module.in_features, module.out_features)
        elif isinstance(module, Conv1D):
            d_in, d_out = module.weight.shape  # Conv1D weight: [d_in, d_out]
            shapes[name] = ModuleShape(d_in, d_out, fan_in_fan_out=True)
    return shapes


@dataclass
class Saved:
    config: bytes
    weights: bytes
    model: nn.Module  # the PeftModel that wrote them
    path: Path


def save_peft(directory: Path, base: nn.Module, dtype: torch.dtype | None = None, **lora: object) -> Saved:
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, **lora))
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(directory)
    config, weights = read_adapter_dir(directory)
    return Saved(config, weights, model, directory)


def peft_layers(saved: Saved) -> dict[str, LoraLayer]:
    return {
        name.removeprefix(PREFIX): m for name, m in saved.model.named_modules() if isinstance(m, LoraLayer)
    }


def assert_matches_peft(adapter: LoraAdapter, saved: Saved) -> None:
    layers = peft_layers(saved)
    assert sorted(adapter.weights) == sorted(layers)
    for name, w in adapter.weights.items():
        layer = layers[name]
        assert torch.equal(w.A, layer.lora_A["default"].weight.detach())
        assert torch.equal(w.B, layer.lora_B["default"].weight.detach())
        assert w.scale == pytest.approx(layer.scaling["default"], rel=1e-12)


def parse(
    config: bytes, weights: bytes, shapes: dict[str, ModuleShape], limits: ValidationLimits = LIMITS
) -> LoraAdapter:
    return parse_adapter("x", config, weights, shapes, limits)


def edit(saved: Saved, cfg: dict | None = None, tensors: dict | None = None) -> tuple[bytes, bytes]:
    """Re-encode ``saved`` with config keys updated by ``cfg`` and tensors replaced by ``tensors``."""
    config = json.loads(saved.config) | (cfg or {})
    weights = safetensors.torch.load(saved.weights) if tensors is None else tensors
    return json.dumps(config).encode(), safetensors.torch.save(weights)


def reject(
    config: bytes,
    weights: bytes,
    shapes: dict[str, ModuleShape],
    *fragments: str,
    status: int = 400,
    limits: ValidationLimits = LIMITS,
) -> AdapterValidationError:
    with pytest.raises(AdapterValidationError) as info:
        parse(config, weights, shapes, limits)
    err = info.value
    assert err.status == status, err.message
    assert err.message.startswith("adapter 'x': ")
    for fragment in fragments:
        assert fragment in err.message
    return err


def saved_tensors(saved: Saved) -> dict[str, torch.Tensor]:
    return safetensors.torch.load(saved.weights)


def lora_key(module: str, ab: str) -> str:
    return f"{PREFIX}{module}.lora_{ab}.weight"
