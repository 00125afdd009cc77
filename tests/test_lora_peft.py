"""Mixed-adapter batches and merged mode against PEFT, on tiny random Llama and GPT-2 models."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from tiny_models import (
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

from server.kv_blocks import Block
from server.model_runner import ModelRunner, StepInput

TOL = 1e-4
ORDER = 3  # the KV blocks of these tests: 2^3 units of 16 tokens, the model runners' whole context of 128


def block(row: int) -> Block:
    """The KV block a test calls row `row` (the tests place blocks themselves, without the allocator)."""
    return Block(row << ORDER, ORDER)


@pytest.fixture(scope="module", params=RUNNER_VARIANTS, ids=RUNNER_IDS)
def setup(request, tmp_path_factory):
    arch, prepack, compiled, kernels = request.param
    base, specs = (tiny_llama(), LLAMA_ADAPTERS) if arch == "llama" else (tiny_gpt2(), GPT2_ADAPTERS)
    aset = make_adapters(copy.deepcopy(base), specs, tmp_path_factory.mktemp(arch))
    runner = ModelRunner(copy.deepcopy(base), max_loras=8, max_rank=16, max_model_len=128, kv_tokens=12 * 128,
                         prepack=prepack, compile=compiled, lora_kernels=kernels,
                         attention_kernel=kernels)
    warm_up_checked(runner, compiled)
    assert (runner.kernel_max_run is not None) == kernels == runner.attention_kernel  # built, or the test fails
    calls = runner.context.opaque_calls
    yield runner, aset, pin_adapters(runner, aset.dirs)
    assert (runner.context.opaque_calls > calls) == compiled  # the tests' steps ran the compiled graph


def prefill_step(seqs: list[tuple[int, list[int], int]]) -> StepInput:
    """seqs: (row, token ids, slot) prefilled from position 0; logits for every token."""
    step = StepInput([], [], [], [])
    for row, ids, slot in seqs:
        start = len(step.token_ids)
        step.token_ids += ids
        step.blocks += [block(row)] * len(ids)
        step.positions += list(range(len(ids)))
        step.token_slots += [slot] * len(ids)
        step.prefills.append((start, start + len(ids), block(row), 0))
    step.logits_idx = list(range(len(step.token_ids)))
    return step


def decode_step(seqs: list[tuple[int, int, int, int]]) -> StepInput:
    """seqs: (row, token id, position, slot), one token each."""
    n = len(seqs)
    return StepInput(
        token_ids=[t for _, t, _, _ in seqs], blocks=[block(r) for r, _, _, _ in seqs],
        positions=[p for _, _, p, _ in seqs], token_slots=[s for _, _, _, s in seqs],
        decode=list(range(n)), logits_idx=list(range(n)),
    )


def rand_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(96) for _ in range(n)]


@pytest.mark.parametrize("order", ["sorted", "shuffled"])
def test_mixed_batch_matches_peft_per_row(setup, order):
    runner, aset, slots = setup
    rng = random.Random(7)
    names = list(slots) + [None, list(slots)[0]]  # every adapter, the base model, and one adapter twice
    rows = [(i, name, rand_ids(rng, rng.randint(3, 12))) for i, name in enumerate(names)]
    if order == "shuffled":
        rng.shuffle(rows)
    else:
        rows.sort(key=lambda r: -1 if r[1] is None else slots[r[1]])
    logits = runner.forward(prefill_step([(i, ids, -1 if n is None else slots[n]) for i, n, ids in rows]))
    offset = 0
    for _, name, ids in rows:
        ref = peft_logits(aset.peft, name, ids)
        torch.testing.assert_close(logits[offset : offset + len(ids)], ref, atol=TOL, rtol=0)
        offset += len(ids)
    # Two decode steps on the same rows: one batched attention call over the KV rows.
    seqs = {i: ids for i, _, ids in rows}
    for _ in range(2):
        toks = {i: rng.randrange(96) for i in seqs}
        step = decode_step([(i, toks[i], len(seqs[i]), -1 if n is None else slots[n]) for i, n, _ in rows])
        logits = runner.forward(step)
        for k, (i, name, _) in enumerate(rows):
            seqs[i] = seqs[i] + [toks[i]]
            ref = peft_logits(aset.peft, name, seqs[i])[-1]
            torch.testing.assert_close(logits[k], ref, atol=TOL, rtol=0)


def test_chunked_prefill_and_mixed_step(setup):
    runner, aset, slots = setup
    rng = random.Random(3)
    name = list(slots)[2]
    ids = rand_ids(rng, 23)
    for start in range(0, 23, 5):
        chunk = ids[start : start + 5]
        n = len(chunk)
        step = StepInput(chunk, [block(9)] * n, list(range(start, start + n)), [slots[name]] * n,
                         prefills=[(0, n, block(9), start)], logits_idx=list(range(n)))
        logits = runner.forward(step)
        torch.testing.assert_close(logits, peft_logits(aset.peft, name, ids)[start : start + n], atol=TOL, rtol=0)
    # One step mixing a decode token of row 9 with a fresh prefill on row 10 of another adapter.
    other = list(slots)[1]
    ids2 = rand_ids(rng, 6)
    tok = rng.randrange(96)
    step = StepInput([tok] + ids2, [block(9)] + [block(10)] * 6, [23] + list(range(6)),
                     [slots[name]] + [slots[other]] * 6, decode=[0], prefills=[(1, 7, block(10), 0)], logits_idx=[0, 6])
    logits = runner.forward(step)
    torch.testing.assert_close(logits[0], peft_logits(aset.peft, name, ids + [tok])[-1], atol=TOL, rtol=0)
    torch.testing.assert_close(logits[1], peft_logits(aset.peft, other, ids2)[-1], atol=TOL, rtol=0)


def test_merged_matches_peft_merged_and_hybrid_rows(setup):
    runner, aset, slots = setup
    rng = random.Random(11)
    merged = list(slots)[2]
    runner.slots.merge(slots[merged])
    try:
        ids = rand_ids(rng, 9)
        aset.peft.set_adapter(merged)
        aset.peft.merge_adapter()
        try:
            with torch.no_grad():
                ref = aset.peft(input_ids=torch.tensor([ids])).logits[0]
        finally:
            aset.peft.unmerge_adapter()
        got = runner.forward(prefill_step([(0, ids, slots[merged])]))
        torch.testing.assert_close(got, ref, atol=TOL, rtol=0)
        # Hybrid: merged rows first, then base and other adapters that subtract the merged delta.
        others = [None, list(slots)[0], list(slots)[4]]
        rows = [(0, merged, ids)] + [(i + 1, n, rand_ids(rng, 7)) for i, n in enumerate(others)]
        logits = runner.forward(prefill_step([(r, x, -1 if n is None else slots[n]) for r, n, x in rows]))
        offset = 0
        for _, name, x in rows:
            torch.testing.assert_close(logits[offset : offset + len(x)], peft_logits(aset.peft, name, x),
                                       atol=TOL, rtol=0)
            offset += len(x)
    finally:
        runner.slots.merge(None)


@pytest.mark.parametrize("prepack", [False, True], ids=["plain", "prepacked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_thousand_swaps_restore_weights_bitwise(tmp_path, dtype, prepack):
    base = tiny_llama()
    aset = make_adapters(copy.deepcopy(base), LLAMA_ADAPTERS, tmp_path)
    runner = ModelRunner(copy.deepcopy(base).to(dtype), max_loras=8, max_rank=16, max_model_len=128, kv_tokens=128,
                         prepack=prepack)
    slots = list(pin_adapters(runner, aset.dirs).values())
    original = {k: v.clone() for k, v in runner.model.state_dict().items()}
    probe = prefill_step([(0, list(range(1, 17)), -1)])
    before = runner.forward(probe)
    rng = random.Random(0)
    changed = False
    for _ in range(1000):
        runner.slots.merge(rng.choice([None, *slots]))
        if runner.slots.merged_slot is not None and not changed:
            changed = any(not torch.equal(v, original[k]) for k, v in runner.model.state_dict().items())
    runner.slots.merge(None)
    assert changed, "merging never changed a weight: the test would prove nothing"
    for k, v in runner.model.state_dict().items():
        assert torch.equal(v, original[k]), k
    assert torch.equal(runner.forward(probe), before)  # what the GEMMs read (a reordered copy, if any) too
