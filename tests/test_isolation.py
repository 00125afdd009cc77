"""Numerical isolation in the engine: a slot fed non-finite weights directly reaches no other request, in any mode.

Uploads refuse such adapters (tests/test_adapter_rejections.py); this is the second wall, for whatever gets
into a slot: side paths never mix rows, a non-finite fold is never merged into the shared weights, and a KV row
is cleared before another sequence gets it.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from engine_harness import build_stack, collect, request


@pytest.fixture(scope="module")
def stack(tiny_model_dir, tiny_adapter_dirs, tmp_path_factory):
    core, records = build_stack(tiny_model_dir, tiny_adapter_dirs, tmp_path_factory.mktemp("isolation"),
                                mode="batched", max_batch_size=16, max_model_len=128, max_tokens_per_step=64)
    yield core, records
    core.engine.shutdown(drain_timeout=5)


def _clean_requests(records, seed: int = 0):
    rng = random.Random(seed)
    return [request([rng.randrange(200, 3000) for _ in range(rng.randint(4, 24))], rec, max_tokens=8, temperature=0,
                    ignore_eos=True) for rec in [records["a0"], records["a2"], records["a5"], None] * 3]


def _poison(core, record) -> None:
    """Make the adapter resident, then overwrite its slot's buffers with NaN and Inf."""
    async def load():
        await collect(core.engine, request([5, 6, 7], record, max_tokens=1))

    asyncio.run(load())
    slot = core.runner.slots.slot_of(record.identity)
    for group in core.runner.lora.groups:
        group.A[slot].fill_(float("nan"))
        for b in group.B:
            b[slot].fill_(float("inf"))


@pytest.mark.parametrize("mode", ["batched", "auto", "merged"])
def test_a_poisoned_slot_reaches_no_other_request(stack, mode):
    core, records = stack
    engine = core.engine
    clean = _clean_requests(records)

    async def solo():
        return [await collect(engine, r) for r in clean]

    async def batch():
        return await asyncio.gather(*(collect(engine, r) for r in clean))

    reference = asyncio.run(solo())
    victim = records["a1"]
    _poison(core, victim)
    # long prompts: what they leave in their KV rows lies past the shorter clean prompts that reuse the rows
    hot = [request([300 + i] + list(range(400, 460)), victim, max_tokens=8, temperature=0, ignore_eos=True)
           for i in range(12)]
    engine.set_mode(mode)

    async def together():  # the engine thread is held while everything is queued: the first step sees it all
        held = asyncio.ensure_future(engine.call(lambda: time.sleep(0.3)))
        results = await asyncio.gather(*(collect(engine, r) for r in hot + clean))
        await held
        return results

    slots = core.runner.slots
    try:
        results = asyncio.run(together())
        after = asyncio.run(batch())  # in the poisoned sequences' KV rows, beside longer rows
        victim_slot = slots.slot_of(victim.identity)
        mergeable, merged = slots.mergeable(victim_slot), slots.merged_slot
    finally:
        engine.set_mode("batched")
        slots.evict(victim.identity)
    poisoned, others = results[: len(hot)], results[len(hot):]
    assert all(r.finish == ["error"] for r in poisoned)
    assert [r.token_ids for r in others] == [r.token_ids for r in reference]
    assert [r.token_ids for r in after] == [r.token_ids for r in reference]
    assert merged != victim_slot and engine.alive
    # auto (12 of the first 16 rows) and merged (its turn) asked to merge the hot adapter: the fold was refused
    assert mergeable == (mode == "batched")
