"""oneDNN prepacked GEMMs (server/gemm.py) against torch's linear, and the stacked q/k/v and gate/up GEMMs."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama
from transformers.pytorch_utils import Conv1D

from server.gemm import PackedLinear
from server.kv_blocks import Block
from server.model_runner import ModelRunner, StepInput

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN is not built in")


def linears(dtype: torch.dtype, bias: list[bool]) -> list[torch.nn.Linear]:
    torch.manual_seed(0)
    return [torch.nn.Linear(48, d_out, bias=b).to(dtype) for d_out, b in zip((40, 16, 24), bias, strict=False)]


@pytest.mark.parametrize("bias", [[False, False, False], [True, False, True]], ids=["no-bias", "mixed-bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_stacked_gemm_equals_each_linear(dtype, bias):
    mods = linears(dtype, bias)
    packed = PackedLinear(*mods)
    x = torch.randn(1, 37, 48).to(dtype)  # [1, N, d_in], as the model passes it
    y = packed(x)
    assert y.shape == (1, 37, 80) and [c.stop - c.start for c in packed.columns] == [40, 16, 24]
    for mod, cols in zip(mods, packed.columns, strict=True):
        want = torch.nn.functional.linear(x.double(), mod.weight.double(), None if mod.bias is None
                                          else mod.bias.double())  # float64 of the same values
        err = (y[..., cols].double() - want).abs().max().item()
        assert err <= (1e-5 if dtype == torch.float32 else 2e-2), (cols, err)


def test_conv1d_members_and_repack():
    torch.manual_seed(1)
    mods = [Conv1D(40, 48), Conv1D(24, 48)]  # GPT-2 layout: weight [d_in, d_out]
    packed = PackedLinear(*mods)
    x = torch.randn(9, 48)
    for mod, cols in zip(mods, packed.columns, strict=True):
        torch.testing.assert_close(packed(x)[:, cols], mod(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        mods[1].weight.mul_(-2.0)
    stale = packed(x)[:, packed.columns[1]]
    assert not torch.allclose(stale, mods[1](x), atol=1e-3)  # the reordered copy is what runs until repacked
    packed.repack()
    torch.testing.assert_close(packed(x)[:, packed.columns[1]], mods[1](x), rtol=1e-5, atol=1e-5)


def count_gemms(monkeypatch) -> list[int]:
    calls = [0]
    real = torch.ops.mkldnn._linear_pointwise

    def counted(*args):
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", counted)
    return calls


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_runner_stacks_groups_and_matches_unpacked(arch, monkeypatch):
    """q/k/v and gate/up share one GEMM per layer (a llama layer: qkv, o, gate-up, down; GPT-2's projections are
    already fused), and the step's logits equal the unpacked runner's."""
    base = tiny_llama() if arch == "llama" else tiny_gpt2()
    runners = [ModelRunner(copy.deepcopy(base), max_loras=2, max_rank=8, max_model_len=64, kv_tokens=256,
                           prepack=p) for p in (False, True)]
    packed = runners[1].lora.packed
    if arch == "llama":
        attn = "model.layers.0.self_attn."
        assert packed[attn + "q_proj"] is packed[attn + "k_proj"] is packed[attn + "v_proj"]
        mlp = "model.layers.0.mlp."
        assert packed[mlp + "gate_proj"] is packed[mlp + "up_proj"] is not packed[mlp + "down_proj"]
    step = StepInput(list(range(1, 12)), [Block(0, 1)] * 11, list(range(11)), [-1] * 11,
                     prefills=[(0, 11, Block(0, 1), 0)], logits_idx=list(range(11)))
    want = runners[0].forward(step)
    calls = count_gemms(monkeypatch)
    got = runners[1].forward(step)
    layers = base.config.num_hidden_layers
    assert calls[0] == 4 * layers + 1  # every layer's 4 GEMMs (llama: qkv, o, gate-up, down; GPT-2's four), head
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
