"""Prompt tuning and prefix tuning against PEFT's forward, in one mixed batch with LoRA, composed and base rows.

PEFT's `generate` drops prefix and prompt tuning with transformers 5 (its output equals the base model's), so
the reference is PEFT's forward over the whole sequence at each step (logits of the last position). A request
may carry virtual tokens beside a LoRA adapter or a composition: the reference then is PEFT's prompt learning
model over the base model with that LoRA merged (or the weighted adapter PEFT builds, merged). Prefill is
chunked (16 tokens per step), so virtual tokens and prompts split across steps.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
import torch
from engine_harness import MODES, assert_equals_reference, build_engine, collect_together, mode_options
from peft import PeftModel
from transformers import AutoModelForCausalLM

from server.engine_types import GenerationRequest, WeightedAdapter
from server.errors import InvalidRequest
from server.sampling import SamplingParams

MAX_TOKENS = 8
# row -> (LoRA adapter, or composition (adapters, weights), or None; prompt learning adapter or None)
ROWS = {
    "pt5": (None, "pt5"), "px4": (None, "px4"), "px3proj": (None, "px3proj"),
    "a1": ("a1", None), "base": (None, None),
    "a1+px4": ("a1", "px4"), "a4+pt5": ("a4", "pt5"), "mix+px3proj": ((("a1", "a4"), (0.7, 0.3)), "px3proj"),
}


def reference(tiny_model_dir, tiny_adapter_dirs, virtual_dirs, lora, virtual):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    if isinstance(lora, str):
        base = PeftModel.from_pretrained(base, tiny_adapter_dirs[lora]).merge_and_unload()
    elif lora is not None:
        (a, b), weights = lora
        model = PeftModel.from_pretrained(base, tiny_adapter_dirs[a], adapter_name=a)
        model.load_adapter(tiny_adapter_dirs[b], adapter_name=b)
        model.add_weighted_adapter([a, b], list(weights), "mix", combination_type="cat")
        model.set_adapter("mix")
        base = model.merge_and_unload(adapter_names=["mix"])
    return (base if virtual is None else PeftModel.from_pretrained(base, virtual_dirs[virtual])).eval()


@pytest.fixture(scope="module")
def references(tiny_model_dir, tiny_adapter_dirs, virtual_dirs):
    return {row: reference(tiny_model_dir, tiny_adapter_dirs, virtual_dirs, *spec) for row, spec in ROWS.items()}


@torch.no_grad()
def greedy(model, prompt: list[int]) -> tuple[list[int], list[float]]:
    ids, logprobs = list(prompt), []
    for _ in range(MAX_TOKENS):
        x = torch.tensor([ids])
        row = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].float().log_softmax(-1)
        token = int(row.argmax())
        ids.append(token)
        logprobs.append(row[token].item())
    return ids[len(prompt):], logprobs


def make_request(prompt: list[int], records: dict, row: str) -> GenerationRequest:
    lora, virtual = ROWS[row]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=0)
    mix = ()
    if lora is not None and not isinstance(lora, str):
        mix, lora = tuple(WeightedAdapter(records[a], w) for a, w in zip(*lora, strict=True)), None
    return GenerationRequest(uuid.uuid4().hex, tuple(prompt), params, None if lora is None else records[lora],
                             mix=mix, virtual=None if virtual is None else records[virtual])


@pytest.fixture(scope="module", params=MODES)
def engine(request, tiny_model_dir, tiny_adapter_dirs, virtual_dirs, tmp_path_factory):
    eng, records = build_engine(tiny_model_dir, tiny_adapter_dirs | virtual_dirs, tmp_path_factory.mktemp("store"),
                                **mode_options(request.param), max_batch_size=24, max_model_len=64,
                                max_tokens_per_step=16, merge_share=0.4)
    yield eng, records
    eng.shutdown(drain_timeout=5)


def workload() -> list[tuple[str, list[int]]]:
    """Every row twice, and a1 six times more: in auto mode a1 (10 of 22 rows with a1+px4) is merged and the other
    rows run beside it (hybrid)."""
    rows = list(ROWS) * 2 + ["a1"] * 6
    return [(row, [300 + 37 * i + 11 * k for k in range(6 + i % 5)]) for i, row in enumerate(rows)]


def test_virtual_tokens_equal_peft_in_a_mixed_batch(engine, references):
    eng, records = engine
    work = workload()
    results = asyncio.run(collect_together(eng, [make_request(p, records, row) for row, p in work]))
    assert_equals_reference(work, results, lambda row, prompt: greedy(references[row], prompt))
    stats = eng.stats()
    assert stats.running == 0 and stats.kv_tokens_used == 0
    if stats.mode == "auto":
        assert stats.step_seconds.get("hybrid", 0) > 0, stats.step_seconds


def test_virtual_tokens_change_the_output(references):
    """The references would prove nothing if an adapter's virtual tokens left the base model's output."""
    prompt = [300 + 11 * k for k in range(8)]
    base = greedy(references["base"], prompt)[1]
    for row in ("pt5", "px4", "px3proj"):
        assert greedy(references[row], prompt)[1] != base, row
    assert greedy(references["a1+px4"], prompt)[1] != greedy(references["a1"], prompt)[1]


def test_the_context_limit_counts_virtual_tokens(engine):
    eng, records = engine
    params = SamplingParams(max_tokens=64 - 10 - 4 + 1)  # 4 virtual + 10 prompt + 51 > 64
    req = GenerationRequest(uuid.uuid4().hex, tuple(range(300, 310)), params, virtual=records["px4"])
    before = eng.host.stats

    async def run():
        await eng.generate(req)

    with pytest.raises(InvalidRequest, match=r"virtual tokens of 'px4' \(4\) \+ prompt \(10 tokens\)"):
        asyncio.run(run())
    assert eng.stats().waiting == 0 and eng.host.stats == before


@pytest.mark.parametrize("field, message", [
    ("adapter", "goes in the request's virtual tokens, not its weights"),
    ("virtual", "has no virtual tokens"),
])
def test_kinds_in_the_wrong_field_are_refused(engine, field, message):
    eng, records = engine
    record = records["pt5"] if field == "adapter" else records["a1"]
    req = GenerationRequest(uuid.uuid4().hex, (300, 301), SamplingParams(max_tokens=2), **{field: record})

    async def run():
        await eng.generate(req)

    with pytest.raises(InvalidRequest, match=message):
        asyncio.run(run())


def test_preempted_sequences_with_virtual_tokens_resume_exactly(tiny_model_dir, tiny_adapter_dirs, virtual_dirs,
                                                                tmp_path):
    """A KV arena of 512 tokens for six sequences that grow to 150 positions: the youngest give their blocks back
    and are recomputed (prefix keys written again, virtual embeddings prefilled again); every output equals the
    request served alone."""
    eng, records = build_engine(tiny_model_dir, tiny_adapter_dirs | virtual_dirs, tmp_path, mode="auto",
                                max_batch_size=8, max_model_len=256, kv_cache_tokens=512, max_tokens_per_step=64)
    params = SamplingParams(max_tokens=115, temperature=0, ignore_eos=True)
    rows = ["pt5", "px4", "a1+px4", "a4+pt5", "px3proj", "pt5"]
    reqs = [make_request([300 + 7 * i + 13 * k for k in range(30)], records, row) for i, row in enumerate(rows)]
    reqs = [GenerationRequest(uuid.uuid4().hex, r.prompt_ids, params, r.adapter, mix=r.mix, virtual=r.virtual)
            for r in reqs]
    try:
        batched = asyncio.run(collect_together(eng, reqs))
        preempted = eng.metrics.total("loramux_preemptions")
        solo = [asyncio.run(collect_together(eng, [r]))[0] for r in reqs]
    finally:
        eng.shutdown(drain_timeout=5)
    assert preempted > 0
    for row, got, ref in zip(rows, batched, solo, strict=True):
        assert got.finish == ["length"] and got.token_ids == ref.token_ids, row
    assert eng.stats().kv_tokens_used == 0
