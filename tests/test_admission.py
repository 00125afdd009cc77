"""Admission never touches the disk: every store read happens off the engine thread, whatever the host tier."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest
from engine_harness import build_stack, collect, request


@pytest.mark.parametrize("max_host", [0, 2], ids=["no_host_tier", "host_lru_churn"])
def test_store_reads_never_run_on_the_engine_thread(tiny_model_dir, tiny_adapter_dirs, tmp_path, max_host):
    """8 adapters, 4 device slots (sequences wait for a slot), host copies that do not outlive their requests
    (max_host 0) or churn through an LRU of 2: the engine thread reads nothing, outputs equal solo runs."""
    core, records = build_stack(tiny_model_dir, tiny_adapter_dirs, tmp_path, max_loras=4, max_host=max_host,
                                mode="auto", max_batch_size=8, max_model_len=128)
    reads: list[str] = []
    load = core.store.load

    def counting_load(record):
        reads.append(threading.current_thread().name)
        return load(record)

    core.store.load = counting_load
    rng = random.Random(0)
    reqs = [request([rng.randrange(200, 3000) for _ in range(rng.randint(4, 20))], records[f"a{i % 8}"],
                    max_tokens=8, temperature=0, ignore_eos=True) for i in range(32)]
    try:
        async def together():
            return await asyncio.gather(*(collect(core.engine, r, delay=rng.random() * 0.2) for r in reqs))

        async def alone():
            return [await collect(core.engine, r) for r in reqs]

        batched = asyncio.run(together())
        solo = asyncio.run(alone())
    finally:
        core.engine.shutdown(drain_timeout=5)
    assert [r.token_ids for r in batched] == [r.token_ids for r in solo]
    assert reads and "loramux-engine" not in reads, reads
    assert all(name.startswith("loramux-adapter-io") for name in reads), set(reads)
    if max_host == 0:  # nothing outlives its requests: a read per request that found no leased copy
        assert len(reads) > len(records)
    assert core.host.stats.leased == 0 and core.runner.slots.stats.used <= 4
