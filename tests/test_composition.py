"""Per-request weighted composition of adapters against PEFT's add_weighted_adapter, in every mode.

PEFT's `combination_type="cat"` concatenates the weighted A factors and the B factors, so its delta is exactly
sum_i w_i * s_i * B_i A_i: the composed rows must give its greedy tokens and logprobs while single-adapter
and base rows run in the same batch (and, in auto mode, beside a merged adapter that is also one of the
composition's adapters).
"""

from __future__ import annotations

import asyncio
import math
import uuid

import pytest
import torch
from engine_harness import MODES, assert_equals_reference, build_engine, collect_together, mode_options
from peft import PeftModel
from transformers import AutoModelForCausalLM

from server.engine_types import GenerationRequest, WeightedAdapter
from server.errors import InvalidRequest
from server.sampling import SamplingParams

MIXES = {  # name -> (adapters, weights): ranks 8+8, 4+16+12 (targets differ), one adapter at half strength
    "mix2": (("a1", "a4"), (0.7, 0.3)),
    "mix3": (("a0", "a2", "a6"), (0.5, -0.4, 1.2)),
    "half_a5": (("a5",), (0.5,)),
}
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def peft(tiny_model_dir, tiny_adapter_dirs):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    names = sorted(tiny_adapter_dirs)
    model = PeftModel.from_pretrained(base, tiny_adapter_dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(tiny_adapter_dirs[name], adapter_name=name)
    for mix, (adapters, weights) in MIXES.items():
        model.add_weighted_adapter(list(adapters), list(weights), mix, combination_type="cat")
    return model.eval()


@torch.no_grad()
def peft_greedy(peft: PeftModel, adapter: str | None, prompt: list[int]) -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs, from PEFT's forward over the whole sequence at each step."""
    ids, logprobs = list(prompt), []
    for _ in range(MAX_TOKENS):
        x = torch.tensor([ids])
        if adapter is None:
            with peft.disable_adapter():
                row = peft(input_ids=x).logits[0, -1].float().log_softmax(-1)
        else:
            peft.set_adapter(adapter)
            row = peft(input_ids=x).logits[0, -1].float().log_softmax(-1)
        token = int(row.argmax())
        ids.append(token)
        logprobs.append(row[token].item())
    return ids[len(prompt):], logprobs


def make_request(prompt: list[int], records: dict, what: str | None) -> GenerationRequest:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=0)
    if what in MIXES:
        adapters, weights = MIXES[what]
        mix = tuple(WeightedAdapter(records[a], w) for a, w in zip(adapters, weights, strict=True))
        return GenerationRequest(uuid.uuid4().hex, tuple(prompt), params, None, mix=mix)
    return GenerationRequest(uuid.uuid4().hex, tuple(prompt), params, None if what is None else records[what])


def workload() -> list[tuple[str | None, list[int]]]:
    """12 rows of a1 (merged in auto mode: 12 of 18 rows, over the fixture's merge share of 0.6), each
    composition (mix2 twice), a5 alone, the base model."""
    whats = ["a1"] * 12 + list(MIXES) + ["mix2", None, "a5"]
    return [(what, [300 + 37 * i + 11 * k for k in range(6 + i % 5)]) for i, what in enumerate(whats)]


@pytest.fixture(scope="module", params=MODES)
def engine(request, tiny_model_dir, tiny_adapter_dirs, tmp_path_factory):
    eng, records = build_engine(tiny_model_dir, tiny_adapter_dirs, tmp_path_factory.mktemp("store"),
                                **mode_options(request.param), max_batch_size=20, max_model_len=128,
                                max_tokens_per_step=256, merge_share=0.6)
    yield eng, records
    eng.shutdown(drain_timeout=5)


def test_compositions_equal_peft_in_a_mixed_batch(engine, peft):
    eng, records = engine
    work = workload()

    results = asyncio.run(collect_together(eng, [make_request(p, records, w) for w, p in work]))
    assert_equals_reference(work, results, lambda what, prompt: peft_greedy(peft, what, prompt))
    stats = eng.stats()
    assert stats.running == 0 and eng.runner.slots.stats.used <= len(records)
    if stats.mode == "auto":  # a1 was merged, and the compositions (one holds a1) ran beside it
        assert stats.step_seconds.get("hybrid", 0) > 0, stats.step_seconds


def test_a_composition_differs_from_its_parts(peft):
    """The references above would prove nothing if a composition gave one of its adapters' outputs."""
    prompt = [300 + 11 * k for k in range(8)]
    for mix, (adapters, _) in MIXES.items():
        got = peft_greedy(peft, mix, prompt)[1]
        for adapter in adapters:
            assert got != peft_greedy(peft, adapter, prompt)[1], (mix, adapter)


@pytest.mark.parametrize("change, message", [
    (lambda m, r: m + (m[0],), "names an adapter twice"),
    (lambda m, r: m + tuple(WeightedAdapter(r[f"a{i}"], 0.1) for i in range(2, 7)), "at most 4 may be composed"),
    (lambda m, r: (WeightedAdapter(m[0].record, 9.0),), "within [-8, 8]"),
    (lambda m, r: (WeightedAdapter(m[0].record, math.nan),), "must be finite"),
])
def test_bad_compositions_are_refused_and_queue_nothing(engine, change, message):
    eng, records = engine
    mix = (WeightedAdapter(records["a1"], 0.5), WeightedAdapter(records["a3"], 0.5))
    req = GenerationRequest(uuid.uuid4().hex, (5, 6, 7), SamplingParams(max_tokens=2), None, mix=change(mix, records))
    before = eng.host.stats

    async def run():
        await eng.generate(req)

    with pytest.raises(InvalidRequest, match=message.replace("[", r"\[").replace("]", r"\]")):
        asyncio.run(run())
    assert eng.stats().waiting == 0 and eng.host.stats == before


def test_one_adapter_and_a_composition_is_refused(engine):
    eng, records = engine
    req = GenerationRequest(uuid.uuid4().hex, (5, 6), SamplingParams(max_tokens=2), records["a0"],
                            mix=(WeightedAdapter(records["a1"], 0.5),))
    with pytest.raises(InvalidRequest, match="either one adapter or a composition"):
        eng.validate(req)
