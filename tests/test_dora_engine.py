"""DoRA through the engine, in every mode: a dominant DoRA adapter is never merged beside other rows (its fold
is not a low-rank delta they could subtract), its outputs equal PEFT's, and it cannot be composed."""

from __future__ import annotations

import asyncio
import math
import uuid

import pytest
from engine_harness import build_engine, collect_together
from peft import PeftModel
from test_composition import MAX_TOKENS, peft_greedy
from tiny_models import save_peft_adapters
from transformers import AutoModelForCausalLM

from server.engine_types import GenerationRequest, WeightedAdapter
from server.errors import InvalidRequest
from server.sampling import SamplingParams

SPECS = {
    "d0": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    "d1": dict(r=8, lora_alpha=8, use_dora=True, target_modules="all-linear"),
    "l2": dict(r=8, lora_alpha=16, target_modules="all-linear"),
}


@pytest.fixture(scope="module")
def dora_dirs(tiny_model_dir, tmp_path_factory):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return save_peft_adapters(base, SPECS, tmp_path_factory.mktemp("dora-adapters"), b_std=0.5)


@pytest.fixture(scope="module")
def peft(tiny_model_dir, dora_dirs):
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), dora_dirs["d0"],
                                      adapter_name="d0")
    for name in ("d1", "l2"):
        model.load_adapter(dora_dirs[name], adapter_name=name)
    return model.eval()


@pytest.fixture(scope="module", params=["auto", "merged", "batched"])
def engine(request, tiny_model_dir, dora_dirs, tmp_path_factory):
    eng, records = build_engine(tiny_model_dir, dora_dirs, tmp_path_factory.mktemp("store"), mode=request.param,
                                max_batch_size=20, max_model_len=128, max_tokens_per_step=256, merge_share=0.6)
    yield eng, records
    eng.shutdown(drain_timeout=5)


def test_dora_in_every_mode_equals_peft(engine, peft):
    eng, records = engine
    assert {r.kind for r in records.values()} == {"dora", "lora"}
    whats = ["d0"] * 12 + ["d1", "l2", "l2", None]  # d0 holds 0.75 of the rows: auto would merge it
    work = [(w, [500 + 29 * i + 7 * k for k in range(5 + i % 4)]) for i, w in enumerate(whats)]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=0)

    reqs = [GenerationRequest(uuid.uuid4().hex, tuple(p), params, None if w is None else records[w]) for w, p in work]
    for (what, prompt), res in zip(work, asyncio.run(collect_together(eng, reqs)), strict=True):
        assert res.finish == ["length"], (what, res.finish)
        tokens, logprobs = peft_greedy(peft, what, prompt)
        assert res.token_ids[0] == tokens, what
        for got, want in zip(res.logprobs[0], logprobs, strict=True):
            assert math.isclose(got.logprob, want, abs_tol=1e-4), what
    stats = eng.stats()
    if stats.mode == "merged":  # every adapter had its turn, each merged alone
        assert stats.swaps >= 2 and stats.step_seconds["merged"] > 0
    assert stats.step_seconds["hybrid"] == 0  # a merged DoRA adapter never ran beside other rows


def test_dora_cannot_be_composed(engine):
    eng, records = engine
    mix = (WeightedAdapter(records["d0"], 0.5), WeightedAdapter(records["l2"], 0.5))
    with pytest.raises(InvalidRequest, match="'d0' is a DoRA adapter, which cannot be composed"):
        eng.validate(GenerationRequest(uuid.uuid4().hex, (5, 6), SamplingParams(max_tokens=2), None, mix=mix))
