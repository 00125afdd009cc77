"""IA3 adapters against PEFT: rows of IA3 adapters (output scales, and input scales on feed-forward modules) in
mixed batches with LoRA and base rows, beside a merged LoRA adapter; and IA3 uploads that are refused."""

from __future__ import annotations

import copy
import json
import random

import pytest
import safetensors.torch
import torch
from adapter_format_helpers import reject, target_shapes
from peft import IA3Config, PeftModel, get_peft_model
from test_lora_peft import TOL, prefill_step, rand_ids
from tiny_models import (
    GPT2_ADAPTERS,
    LLAMA_ADAPTERS,
    make_adapters,
    peft_logits,
    pin_adapters,
    tiny_gpt2,
    tiny_llama,
    warm_up_checked,
)

from adapters_store.format import read_adapter_dir
from server.model_runner import ModelRunner

IA3_LLAMA = {
    "ia3_ff": dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "ia3_out": dict(target_modules=["q_proj", "o_proj", "up_proj"], feedforward_modules=[]),
}
IA3_GPT2 = {
    "ia3_ff": dict(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True),
    "ia3_out": dict(target_modules=["c_attn", "c_fc"], feedforward_modules=[], fan_in_fan_out=True),
}


def save_ia3(base, specs: dict[str, dict], root) -> dict[str, PeftModel]:
    """IA3 adapters made by PEFT, their vectors set to 1 + 0.4·N(0, 1); name -> (directory, PeftModel)."""
    out = {}
    for i, (name, spec) in enumerate(specs.items()):
        model = get_peft_model(copy.deepcopy(base), IA3Config(init_ia3_weights=True, **spec))
        gen = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "ia3_l" in n:
                    p.copy_(1 + 0.4 * torch.randn(p.shape, generator=gen))
        model.save_pretrained(root / name)
        out[name] = (root / name, model.eval())
    return out


@pytest.fixture(scope="module", params=[("llama", False, False), ("gpt2", False, False), ("gpt2", True, False),
                                        ("llama", True, True)],
                ids=["llama", "gpt2", "gpt2-prepacked", "llama-compiled"])
def setup(request, tmp_path_factory):
    arch, prepack, compiled = request.param
    root = tmp_path_factory.mktemp(f"ia3-{arch}")
    if arch == "llama":
        base, lora, ia3 = tiny_llama(), {k: LLAMA_ADAPTERS[k] for k in ("attn_r4", "all_r16")}, IA3_LLAMA
    else:
        base, lora, ia3 = tiny_gpt2(), {k: GPT2_ADAPTERS[k] for k in ("attn_r4", "all_r16")}, IA3_GPT2
        with torch.no_grad():  # GPT-2 initialises its biases to zero: IA3 on outputs scales them too
            for name, p in base.named_parameters():
                if name.endswith(".bias") and p.dim() == 1:
                    p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    aset = make_adapters(copy.deepcopy(base), lora, root / "lora")
    ia3_models = save_ia3(base, ia3, root)
    runner = ModelRunner(copy.deepcopy(base), max_loras=8, max_rank=16, max_model_len=128, kv_tokens=12 * 128,
                         prepack=prepack, compile=compiled)
    warm_up_checked(runner, compiled)
    slots = pin_adapters(runner, aset.dirs | {name: d for name, (d, _) in ia3_models.items()})
    refs = {name: (lambda ids, m=m: _logits(m, ids)) for name, (_, m) in ia3_models.items()}
    refs |= {name: (lambda ids, n=name: peft_logits(aset.peft, n, ids)) for name in [*lora, None]}
    return runner, slots, refs, base


@torch.no_grad()
def _logits(model: PeftModel, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).logits[0].float()


def check(runner, slots, refs, names: list[str | None], seed: int) -> None:
    rng = random.Random(seed)
    rows = [(i, name, rand_ids(rng, rng.randint(3, 10))) for i, name in enumerate(names)]
    logits = runner.forward(prefill_step([(r, ids, -1 if n is None else slots[n]) for r, n, ids in rows]))
    offset = 0
    for _, name, ids in rows:
        torch.testing.assert_close(logits[offset : offset + len(ids)], refs[name](ids), atol=TOL, rtol=TOL,
                                   msg=str(name))
        offset += len(ids)


def test_ia3_rows_in_a_mixed_batch_equal_peft(setup):
    runner, slots, refs, _ = setup
    check(runner, slots, refs, ["ia3_ff", "attn_r4", "ia3_out", None, "ia3_ff", "all_r16", "ia3_out"], 1)


def test_ia3_changes_the_outputs(setup):
    runner, slots, refs, _ = setup
    ids = [3, 14, 15, 92, 65]
    for name in ("ia3_ff", "ia3_out"):
        assert (refs[name](ids) - refs[None](ids)).abs().max() > 20 * TOL


def test_ia3_rows_beside_a_merged_lora_equal_peft(setup):
    runner, slots, refs, _ = setup
    assert runner.slots.merge(slots["all_r16"])
    try:
        check(runner, slots, refs, ["all_r16", "all_r16", "ia3_ff", "ia3_out", None], 2)
    finally:
        assert runner.slots.merge(None)


def test_ia3_is_never_merged(setup):
    runner, slots, refs, base = setup
    assert not runner.slots.merge(slots["ia3_ff"]) and runner.slots.merged_slot is None
    check(runner, slots, refs, ["ia3_ff", None], 3)


@pytest.fixture(scope="module")
def ia3_files(tmp_path_factory):
    (path, _), = save_ia3(tiny_llama(), {"x": IA3_LLAMA["ia3_ff"]}, tmp_path_factory.mktemp("ia3-bad")).values()
    return read_adapter_dir(path)


K0 = "base_model.model.model.layers.0.self_attn.k_proj.ia3_l"
D0 = "base_model.model.model.layers.0.mlp.down_proj.ia3_l"


@pytest.mark.parametrize("change, status, fragment", [
    (lambda c, t: (c, t | {K0: torch.ones(1, 32)}), 422, "has shape [1, 32], expected [32, 1] (its output"),
    (lambda c, t: (c, t | {D0: torch.ones(64, 1)}), 422, "expected [1, 96] (a feed-forward module"),
    (lambda c, t: (c, t | {K0: torch.full((32, 1), float("inf"))}), 400, "has 32 NaN/Inf values"),
    (lambda c, t: (c, t | {K0: torch.full((32, 1), 2000.0)}), 400, "above the limit of 1024"),
    (lambda c, t: (c, t | {K0.replace("k_proj", "nope"): torch.ones(32, 1)}), 422, "not a targetable module"),
    (lambda c, t: (c, t | {K0.replace("ia3_l", "lora_A.weight"): torch.ones(2, 64)}), 400, "unexpected tensor"),
    (lambda c, t: (c | {"target_modules": ["v_proj", "down_proj"]}, t), 400, "which the config does not select"),
    (lambda c, t: (c | {"modules_to_save": ["lm_head"]}, t), 400, "modules_to_save"),
    (lambda c, t: (c | {"target_modules": "(a+)+$x"}, t), 400, ""),
])
def test_bad_ia3_is_refused(ia3_files, change, status, fragment):
    config, weights = ia3_files
    cfg, tensors = change(json.loads(config), safetensors.torch.load(weights))
    reject(json.dumps(cfg).encode(), safetensors.torch.save(tensors), target_shapes(tiny_llama()), fragment,
           status=status)
