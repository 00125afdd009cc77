"""A bfloat16 model on CPU against the float32 PEFT oracle, as close as PEFT's own bfloat16 forward comes.

With loramux's kernels the slot weights are bfloat16 (half the bytes a decode step reads; the kernels widen
them and sum in float32, prefill's runs as decode's), without them float32 through torch's matmuls; either way
each row of a mixed batch, in prefill (one of its runs 24 tokens long) and in decode, must stay within
PEFT-bf16's distance of the float32 reference, a distance far below what an adapter changes.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from test_lora_peft import decode_step, prefill_step, rand_ids
from tiny_models import LLAMA_ADAPTERS, make_adapters, peft_logits, pin_adapters, tiny_llama

from server.model_runner import ModelRunner

SLACK = 1.5  # times PEFT-bf16's own largest distance from the float32 oracle


@pytest.fixture(scope="module", params=[True, False], ids=["kernels-bf16-slots", "torch-fp32-slots"])
def served(request, tmp_path_factory):
    base = tiny_llama()
    with torch.no_grad():  # weights in bf16 exactly: the float32 oracle and both bf16 models start from one model
        for p in base.parameters():
            p.copy_(p.bfloat16())
    aset = make_adapters(copy.deepcopy(base), LLAMA_ADAPTERS, tmp_path_factory.mktemp("bf16"))
    runner = ModelRunner(copy.deepcopy(base).bfloat16(), max_loras=8, max_rank=16, max_model_len=128,
                         kv_tokens=12 * 128, lora_kernels=request.param, attention_kernel=request.param)
    assert (runner.kernel_max_run is not None) == request.param
    assert runner.lora.dtype == (torch.bfloat16 if request.param else torch.float32)
    return runner, aset, copy.deepcopy(aset.peft).bfloat16(), pin_adapters(runner, aset.dirs)


def test_mixed_bf16_batch_is_as_close_to_the_fp32_oracle_as_peft_bf16(served):
    runner, aset, peft_bf16, slots = served
    rng = random.Random(11)
    names = list(slots) + [None, list(slots)[2]]
    lengths = [rng.randint(3, 12) for _ in names]
    lengths[-1] = 24  # a run of several of the kernels' token tiles and blocks
    seqs = {i: rand_ids(rng, n) for i, n in enumerate(lengths)}
    slot_of = [-1 if n is None else slots[n] for n in names]
    ours, peft, effect = [], [], []  # per row: distances from the fp32 oracle; what its adapter changes

    def record(logits: torch.Tensor, rows: list[int]) -> None:
        for k, i in enumerate(rows):
            ref = peft_logits(aset.peft, names[i], seqs[i])[-1]
            ours.append((logits[k] - ref).abs().max().item())
            peft.append((peft_logits(peft_bf16, names[i], seqs[i])[-1] - ref).abs().max().item())
            if names[i] is not None:
                effect.append((ref - peft_logits(aset.peft, None, seqs[i])[-1]).abs().max().item())

    logits = runner.forward(prefill_step([(i, seqs[i], slot_of[i]) for i in seqs]))
    ends = torch.tensor(lengths).cumsum(0) - 1
    record(logits[ends], list(seqs))
    for _ in range(2):
        toks = {i: rng.randrange(96) for i in seqs}
        logits = runner.forward(decode_step([(i, toks[i], len(seqs[i]), slot_of[i]) for i in seqs]))
        for i in seqs:
            seqs[i] = seqs[i] + [toks[i]]
        record(logits, list(seqs))
    bound = SLACK * max(peft)
    assert max(ours) <= bound, f"largest distance {max(ours):.4g} from the fp32 oracle, PEFT-bf16's {max(peft):.4g}"
    assert min(effect) > 10 * bound  # a dropped or wrong side path would be seen
