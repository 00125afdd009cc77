"""Engine behaviour under concurrency, in every mode, against each request served alone."""

from __future__ import annotations

import asyncio
import math
import random
import time

import pytest
import torch
from engine_harness import Result, build_engine, collect, request
from peft import PeftModel
from transformers import AutoModelForCausalLM

from server.errors import EngineOverloaded

TIE_GAP = 1e-4


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tiny_adapter_dirs, tmp_path_factory):
    eng, records = build_engine(tiny_model_dir, tiny_adapter_dirs, tmp_path_factory.mktemp("store"),
                                mode="batched", max_batch_size=16, max_model_len=256, max_tokens_per_step=64)
    yield eng, records
    eng.shutdown(drain_timeout=5)


def workload(records, n_per_adapter=4, n_base=4, seed=0):
    rng = random.Random(seed)
    reqs = []
    for rec in [*records.values()] * n_per_adapter + [None] * n_base:
        prompt = [rng.randrange(200, 3000) for _ in range(rng.randint(5, 40))]
        reqs.append(request(prompt, rec, max_tokens=rng.randint(6, 14), temperature=0, ignore_eos=True, logprobs=2))
    rng.shuffle(reqs)
    return reqs


@pytest.fixture(scope="module")
def alone(engine):
    """Each request of the workload served with nothing else in the batch."""
    eng, records = engine
    reqs = workload(records)

    async def run():
        return [await collect(eng, r) for r in reqs]

    return reqs, asyncio.run(run())


def test_adapters_change_the_outputs(engine, alone):
    """The workload would prove nothing if an adapter left the base model's outputs as they are: every
    adapter's requests get other tokens or other logprobs than the same prompts on the base model."""
    eng, _ = engine
    reqs, refs = alone
    with_adapter = [(r, ref) for r, ref in zip(reqs, refs, strict=True) if r.adapter is not None]

    async def run():
        return [await collect(eng, request(list(r.prompt_ids), None, max_tokens=r.params.max_tokens, temperature=0,
                                           ignore_eos=True, logprobs=2)) for r, _ in with_adapter]

    base = asyncio.run(run())
    unchanged = {r.adapter.id for r, _ in with_adapter}
    for b, (r, ref) in zip(base, with_adapter, strict=True):
        first, first_base = ref.logprobs[0][0], b.logprobs[0][0]
        if b.token_ids != ref.token_ids or abs(first.logprob - first_base.logprob) > 1e-3:
            unchanged.discard(r.adapter.id)
    assert not unchanged, f"adapters whose outputs equal the base model's: {sorted(unchanged)}"


def assert_same_or_tie(got: Result, ref: Result, what: str) -> None:
    a, b = got.token_ids[0], ref.token_ids[0]
    if a == b:
        return
    i = next(k for k in range(min(len(a), len(b))) if a[k] != b[k])
    top = ref.logprobs[0][i].top
    gap = top[0][2] - top[1][2]
    assert gap < TIE_GAP, f"{what}: token {i} differs ({a[i]} vs {b[i]}) with a top-2 gap of {gap:.2e}"


@pytest.mark.parametrize("mode", ["batched", "merged", "auto"])
def test_concurrent_outputs_equal_alone(engine, alone, mode):
    eng, records = engine
    reqs, refs = alone
    eng.set_mode(mode)
    rng = random.Random(1)
    before = eng.stats()

    async def run():
        return await asyncio.gather(*(collect(eng, r, delay=rng.random() * 0.3) for r in reqs))

    try:
        results = asyncio.run(run())
    finally:
        eng.set_mode("batched")
    for k, (got, ref) in enumerate(zip(results, refs, strict=True)):
        assert got.finish == ["length"]
        assert_same_or_tie(got, ref, f"{mode} request {k}")
    after = eng.stats()
    assert after.running == 0 and after.steps > before.steps
    spent = {k: after.step_seconds[k] - before.step_seconds[k] for k in after.step_seconds}
    if mode == "batched":
        assert spent["merged"] == spent["hybrid"] == 0 and spent["batched"] > 0
    elif mode == "merged":  # adapters take turns, each merged (auto, on this wide mix, may never merge)
        assert after.swaps - before.swaps >= len(records) and spent["merged"] > 0


def test_mode_switch_mid_traffic_stays_exact(engine, alone):
    eng, _ = engine
    reqs, refs = alone

    before = eng.stats().swaps

    async def run():
        tasks = [asyncio.create_task(collect(eng, r, delay=i * 0.01)) for i, r in enumerate(reqs)]
        for mode in ["auto", "merged", "batched", "auto"]:
            await asyncio.sleep(0.05)
            eng.set_mode(mode)
            deadline = time.monotonic() + 5
            while mode == "merged" and eng.stats().swaps == before and time.monotonic() < deadline:
                await asyncio.sleep(0.005)  # the batch drains to one adapter's turn, which merges
        return await asyncio.gather(*tasks)

    try:
        results = asyncio.run(run())
    finally:
        eng.set_mode("batched")
    assert eng.stats().swaps > before, "the merged phase never merged: the test would prove nothing"
    for k, (got, ref) in enumerate(zip(results, refs, strict=True)):
        assert_same_or_tie(got, ref, f"switching request {k}")


def test_seeded_sampling_is_batch_independent(engine):
    eng, records = engine
    rec = records["a1"]
    prompt = list(range(300, 320))
    params = dict(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)

    async def run():
        alone = await collect(eng, request(prompt, rec, **params))
        others = [request(prompt[:7], records[f"a{i}"], max_tokens=12, temperature=1.0, ignore_eos=True)
                  for i in range(6)]
        batch = await asyncio.gather(collect(eng, request(prompt, rec, **params), delay=0.02),
                                     *(collect(eng, r) for r in others))
        n3 = await collect(eng, request(prompt, rec, n=3, **params))
        return alone, batch[0], n3

    alone, in_batch, n3 = asyncio.run(run())
    assert alone.token_ids == in_batch.token_ids
    assert n3.token_ids[0] == alone.token_ids[0]
    assert len({tuple(t) for t in n3.token_ids}) > 1, "three samples with different seeds all agree"


def test_stop_strings_never_leak(engine):
    eng, records = engine
    prompt = list(range(500, 530))

    async def run(**kw):
        return await collect(eng, request(prompt, records["a2"], max_tokens=24, temperature=0, ignore_eos=True, **kw))

    full = asyncio.run(run())
    text = full.text[0]
    assert len(text) > 10
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = asyncio.run(run(stop=[stop, "never-there"]))
    assert cut.finish == ["stop"]
    assert cut.text[0] == text[: text.index(stop)]
    ids = asyncio.run(run(stop_token_ids=[full.token_ids[0][5]]))
    assert ids.finish == ["stop"] and ids.token_ids[0] == full.token_ids[0][: full.token_ids[0].index(
        full.token_ids[0][5]) + 1]


def test_logprobs_match_reference_softmax(engine, tiny_model_dir, tiny_adapter_dirs):
    eng, records = engine
    prompt = list(range(700, 725))
    res = asyncio.run(collect(eng, request(prompt, records["a5"], max_tokens=6, temperature=0, ignore_eos=True,
                                           logprobs=3)))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft = PeftModel.from_pretrained(base, tiny_adapter_dirs["a5"]).eval()
    ids = prompt + res.token_ids[0]
    with torch.no_grad():
        ref = peft(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    for i, lp in enumerate(res.logprobs[0]):
        row = ref[len(prompt) - 1 + i]
        assert math.isclose(lp.logprob, row[lp.token_id].item(), abs_tol=1e-4)
        top_ids = row.topk(3).indices.tolist()
        assert [t for t, _, _ in lp.top] == top_ids
        for t, _, v in lp.top:
            assert math.isclose(v, row[t].item(), abs_tol=1e-4)


def test_cancel_frees_row_and_adapter(engine):
    eng, records = engine
    rec = records["a3"]

    async def run():
        stream = await eng.generate(request(list(range(100, 110)), rec, max_tokens=200, ignore_eos=True))
        got = [await stream.__anext__() for _ in range(3)]
        await stream.aclose()
        for _ in range(100):
            if eng.stats().running == 0:
                break
            await asyncio.sleep(0.02)
        return got

    got = asyncio.run(run())
    assert len(got) == 3
    assert eng.stats().running == 0
    assert eng.runner.slots.info(rec.identity).in_flight == 0 and eng.host.stats.leased == 0


def test_full_cache_makes_requests_wait(tiny_model_dir, tiny_adapter_dirs, tmp_path):
    eng, records = build_engine(tiny_model_dir, tiny_adapter_dirs, tmp_path, mode="auto", max_batch_size=2,
                                max_model_len=64, max_waiting=4)
    try:
        reqs = [request(list(range(200, 220)), records[f"a{i}"], max_tokens=40, temperature=0, ignore_eos=True)
                for i in range(6)]
        seen_waiting = []

        async def run():
            tasks = [asyncio.create_task(collect(eng, r)) for r in reqs[:2]]
            while eng.stats().running < 2:
                await asyncio.sleep(0.001)
            tasks += [asyncio.create_task(collect(eng, r)) for r in reqs[2:]]
            for _ in range(500):
                if eng.stats().waiting + eng.stats().running >= 6:
                    break
                await asyncio.sleep(0.001)
            seen_waiting.append(eng.stats().waiting)
            with pytest.raises(EngineOverloaded):
                await eng.generate(request([1, 2, 3], None, max_tokens=4))
            return await asyncio.gather(*tasks)

        results = asyncio.run(run())
        assert all(r.finish == ["length"] and len(r.token_ids[0]) == 40 for r in results)
        assert seen_waiting[0] >= 3, seen_waiting
        with pytest.raises(ValueError, match="exceeds the context length of 64"):
            eng.validate(request(list(range(60)), None, max_tokens=8))
    finally:
        eng.shutdown(drain_timeout=5)


def test_auto_merges_a_dominant_adapter_and_unmerges_for_a_wide_mix(engine, alone):
    eng, records = engine
    eng.set_mode("auto")
    before = eng.stats()
    hot = [request(list(range(900, 930)), records["a1"], max_tokens=10, temperature=0, ignore_eos=True)
           for _ in range(8)]

    async def run(reqs):
        return await asyncio.gather(*(collect(eng, r) for r in reqs))

    try:
        asyncio.run(run(hot))
        mid = eng.stats()
        assert mid.swaps > before.swaps and mid.step_seconds["merged"] > before.step_seconds["merged"]
        wide = [request(list(range(900, 930)), records[f"a{i}"], max_tokens=10, temperature=0, ignore_eos=True)
                for i in range(8)]
        asyncio.run(run(wide))
        assert eng.stats().step_seconds["batched"] > mid.step_seconds["batched"]
    finally:
        eng.set_mode("batched")


def test_blocks_grow_and_preempted_sequences_resume_exactly(tiny_model_dir, tiny_adapter_dirs, tmp_path):
    """A KV arena of 512 tokens for six sequences that each grow to 150: blocks fill up and move to bigger ones,
    the youngest sequences give theirs back and are recomputed; every output equals the request served alone."""
    eng, records = build_engine(tiny_model_dir, tiny_adapter_dirs, tmp_path, mode="auto", max_batch_size=8,
                                max_model_len=256, kv_cache_tokens=512, max_tokens_per_step=64)
    rng = random.Random(3)
    reqs = [request([rng.randrange(200, 3000) for _ in range(30)], records[f"a{i % 3}"] if i % 2 else None,
                    max_tokens=120, temperature=0, ignore_eos=True, logprobs=2) for i in range(6)]
    try:
        async def together():
            return await asyncio.gather(*(collect(eng, r) for r in reqs))

        async def alone():
            return [await collect(eng, r) for r in reqs]

        batched = asyncio.run(together())
        preempted = eng.metrics.total("loramux_preemptions")
        solo = asyncio.run(alone())
    finally:
        eng.shutdown(drain_timeout=5)
    assert preempted > 0
    for got, ref in zip(batched, solo, strict=True):
        assert got.finish == ["length"] and len(got.token_ids[0]) == 120
        assert_same_or_tie(got, ref, "grown or preempted request")
    assert eng.stats().kv_tokens_used == 0
