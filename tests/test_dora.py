"""DoRA adapters against PEFT: in mixed batches with LoRA and base rows, merged alone, and beside a merged LoRA.

PEFT cannot batch DoRA adapters of different rows (`adapter_names` refuses DoRA), so the reference is PEFT's
forward with each row's adapter set, row by row. GPT-2's projections have biases: DoRA rescales the
projection without its bias (b + g * (W x + s B A x)), so the bias path is checked too.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from test_lora_peft import TOL, prefill_step, rand_ids
from tiny_models import (
    DORA_GPT2,
    DORA_LLAMA,
    GPT2_ADAPTERS,
    LLAMA_ADAPTERS,
    RUNNER_IDS,
    RUNNER_VARIANTS,
    make_adapters,
    peft_logits,
    pin_adapters,
    tiny_gpt2,
    tiny_llama,
    warm_up_checked,
)

from server.lora.plan import plan_lora
from server.model_runner import ModelRunner


@pytest.fixture(scope="module", params=RUNNER_VARIANTS, ids=RUNNER_IDS)
def setup(request, tmp_path_factory):
    arch, prepack, compiled, kernels = request.param
    if arch == "llama":
        base, specs = tiny_llama(), {**DORA_LLAMA, "attn_r4": LLAMA_ADAPTERS["attn_r4"],
                                     "all_r16": LLAMA_ADAPTERS["all_r16"]}
    else:
        base, specs = tiny_gpt2(), {**DORA_GPT2, "attn_r4": GPT2_ADAPTERS["attn_r4"],
                                    "all_r16": GPT2_ADAPTERS["all_r16"]}
        with torch.no_grad():  # GPT-2 initialises its biases to zero: give them values the rescale must keep
            for name, p in base.named_parameters():
                if name.endswith(".bias") and p.dim() == 1:
                    p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    aset = make_adapters(copy.deepcopy(base), specs, tmp_path_factory.mktemp(f"dora-{arch}"))
    runner = ModelRunner(copy.deepcopy(base), max_loras=8, max_rank=16, max_model_len=128, kv_tokens=12 * 128,
                         prepack=prepack, compile=compiled, lora_kernels=kernels,
                         attention_kernel=kernels)
    warm_up_checked(runner, compiled)
    assert (runner.kernel_max_run is not None) == kernels == runner.attention_kernel  # built, or the test fails
    return runner, aset, pin_adapters(runner, aset.dirs)


def rows_for(slots: dict[str, int], names: list[str | None], seed: int) -> list[tuple[int, str | None, list[int]]]:
    rng = random.Random(seed)
    return [(i, name, rand_ids(rng, rng.randint(3, 10))) for i, name in enumerate(names)]


def check_rows(runner, aset, slots, rows) -> None:
    step = prefill_step([(row, ids, -1 if name is None else slots[name]) for row, name, ids in rows])
    logits = runner.forward(step)
    offset = 0
    for _, name, ids in rows:
        ref = peft_logits(aset.peft, name, ids)
        torch.testing.assert_close(logits[offset : offset + len(ids)], ref, atol=TOL, rtol=TOL, msg=str(name))
        offset += len(ids)


def test_dora_rows_in_a_mixed_batch_equal_peft(setup):
    runner, aset, slots = setup
    assert runner.slots.dora_slots() == {slots[n] for n in slots if n.startswith("dora")}
    names = [n for n in slots if n.startswith("dora")] * 2 + ["attn_r4", "all_r16", None]
    check_rows(runner, aset, slots, rows_for(slots, names, 3))


def test_dora_changes_the_outputs_beyond_its_lora_part(setup):
    """With magnitudes equal to the norms DoRA is its LoRA; these are not, so the rescale must matter."""
    runner, aset, slots = setup
    name = next(n for n in slots if n.startswith("dora"))
    ids = [5, 17, 33, 2, 60]
    aset.peft.set_adapter(name)
    with torch.no_grad():
        dora = aset.peft(input_ids=torch.tensor([ids])).logits[0]
        layers = [m for m in aset.peft.modules() if hasattr(m, "lora_magnitude_vector")
                  and name in m.lora_magnitude_vector]
        saved = [m.lora_magnitude_vector[name].weight.clone() for m in layers]
        for m in layers:  # DoRA with magnitudes = ||W + s B A||: exactly its LoRA part
            w = m.get_base_layer().weight.float()
            w = w.T if m.fan_in_fan_out else w
            delta = m.lora_B[name].weight @ m.lora_A[name].weight * m.scaling[name]
            m.lora_magnitude_vector[name].weight.copy_(torch.linalg.vector_norm(w + delta, dim=1))
        plain = aset.peft(input_ids=torch.tensor([ids])).logits[0]
        for m, s in zip(layers, saved, strict=True):
            m.lora_magnitude_vector[name].weight.copy_(s)
    assert (dora - plain).abs().max() > 20 * TOL  # the oracle tests compare at TOL


def test_merged_dora_runs_alone_and_equals_peft(setup):
    runner, aset, slots = setup
    name = "dora_attn_r4"
    assert runner.slots.merge(slots[name])
    try:
        check_rows(runner, aset, slots, rows_for(slots, [name, name, name], 5))
        with pytest.raises(ValueError, match="DoRA"):  # nothing may run beside it
            runner.forward(prefill_step([(0, [1, 2, 3], slots[name]), (1, [4, 5], -1)]))
    finally:
        assert runner.slots.merge(None)
    check_rows(runner, aset, slots, rows_for(slots, [name, "attn_r4", None], 6))  # unmerged exactly


def test_dora_rows_beside_a_merged_lora_equal_peft(setup):
    runner, aset, slots = setup
    assert runner.slots.merge(slots["all_r16"])
    try:
        names = ["all_r16", "all_r16"] + [n for n in slots if n.startswith("dora")] + [None, "attn_r4"]
        check_rows(runner, aset, slots, rows_for(slots, names, 7))
    finally:
        assert runner.slots.merge(None)


def test_planner_refuses_weighted_dora():
    groups = [frozenset({0})] * 4
    with pytest.raises(ValueError, match="cannot be composed"):
        plan_lora([-1, -1], [8] * 4, slot_groups=groups, weighted=[(0, 2, 1, 0.5)], rescaled_slots=frozenset({1}))
    plan = plan_lora([1, 1, 2, -1], [8] * 4, slot_groups=groups, rescaled_slots=frozenset({1}))
    assert plan.rescale.tok.tolist() == [0, 1] and plan.rescale.slot.tolist() == [1, 1]
    assert plan.rescale.runs == ((0, 2, 1),) and plan.rescale.span == (0, 2)
    assert plan.rescale_groups == frozenset({0})
    scattered = plan_lora([1, 2, 3, 1], [8] * 4, slot_groups=groups, rescaled_slots=frozenset({1, 3}))
    assert scattered.rescale.tok.tolist() == [0, 2, 3] and scattered.rescale.span is None


@pytest.mark.parametrize("token_slots", [
    [1, 1, 2, -1, 3, 3],  # two DoRA runs: scaled in place
    [1, 3, 1, 3, 1, 3, 0, 0],  # six runs, one span
    [1, 0, 3, 0, 1, 2, 3, 0, 1, 3],  # six runs, scattered
], ids=["runs", "span", "scattered"])
@pytest.mark.parametrize("y_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_rescale_paths_equal_a_loop(token_slots, y_dtype, bias):
    from server.lora.ops import rescale

    gen = torch.Generator().manual_seed(0)
    G, C = torch.rand(4, 12, generator=gen) + 0.5, torch.randn(4, 12, generator=gen) if bias else None
    y = torch.randn(len(token_slots), 12, generator=gen).to(y_dtype)
    plan = plan_lora(token_slots, [8] * 4, slot_groups=[frozenset({0})] * 4, rescaled_slots=frozenset({1, 3}))
    want = y.double().clone()
    for t, s in enumerate(token_slots):
        if s in (1, 3):
            want[t] = want[t] * G[s].double() + (C[s].double() if bias else 0)
    got = y.clone()
    rescale(got, plan.rescale, G, C)
    torch.testing.assert_close(got.double(), want, atol=1e-5 if y_dtype == torch.float32 else 2e-2, rtol=1e-2)
    untouched = [t for t, s in enumerate(token_slots) if s not in (1, 3)]
    assert torch.equal(got[untouched], y[untouched])
