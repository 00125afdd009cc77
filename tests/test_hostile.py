"""A hostile tenant against a real server (uvicorn, fp32): each attack gets its documented error, and another
tenant's greedy outputs stay equal to its solo outputs, /health keeps answering, the store stays as it was."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from hostile_fixtures import Hostile, start_hostile
from http_fixtures import ACME, GLOBEX, OPS, upload


@pytest.fixture(scope="module")
def hostile(tiny_model_dir, tiny_adapter_dirs, tmp_path_factory):
    h = start_hostile(tiny_model_dir, tiny_adapter_dirs, tmp_path_factory.mktemp("hostile"))
    yield h
    h.server.stop()


async def _stream(c: httpx.AsyncClient, body: dict, started: asyncio.Event) -> tuple[str, list[dict]]:
    """Text of a streamed completion and the error events it carried."""
    text, errors = [], []
    async with c.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line.removeprefix("data: "))
                if "error" in chunk:
                    errors.append(chunk["error"])
                    continue
                text.append(chunk["choices"][0]["text"])
                started.set()
    return "".join(text), errors


def test_purge_of_a_merged_adapter_mid_stream_stops_nothing(hostile: Hostile):
    """The engine merged acme's hot adapter (auto); acme purges it while six streams run on it."""
    with hostile.client(ACME) as a:
        assert upload(a, hostile.adapters["a1"], "hot").status_code == 201
    body = {"model": "hot", "prompt": "Merged and purged", "max_tokens": 120, "temperature": 0, "ignore_eos": True}
    swaps = hostile.server.services.engine.stats().swaps

    async def scenario():
        async with hostile.async_client(ACME) as a:
            started = asyncio.Event()
            streams = [asyncio.create_task(_stream(a, body, started)) for _ in range(6)]
            await started.wait()
            while hostile.server.services.engine.stats().merged_adapter is None:
                await asyncio.sleep(0.01)
            assert (await a.delete("/v1/adapters/hot", params={"purge": "true"})).json()["purged"]
            outputs = await hostile.globex_outputs()
            return await asyncio.gather(*streams), outputs, (await a.post("/v1/completions", json=body)).status_code

    streams, outputs, after = asyncio.run(scenario())
    assert hostile.server.services.engine.stats().swaps > swaps
    assert all(not errors and text for text, errors in streams)  # in-flight requests finish with their adapter
    assert len({text for text, _ in streams}) == 1 and after == 404
    hostile.assert_unharmed(outputs)


@pytest.mark.parametrize(("config", "fragments"), [
    ({"lora_alpha": 1e30}, ["its scale", "limit of 1024"]),
    ({"target_modules": "(?=x)q_proj"}, ["RE2 syntax"]),
])
def test_poisoned_configs_are_refused(hostile: Hostile, config: dict, fragments: list[str]):
    raw = json.loads((hostile.adapters["a1"] / "adapter_config.json").read_text()) | config
    before = hostile.listing()
    with hostile.client(ACME) as a:
        r = upload(a, hostile.adapters["a1"], "poison", config=json.dumps(raw).encode())
    assert r.status_code == 400 and all(f in r.json()["error"]["message"] for f in fragments), r.text
    assert hostile.listing() == before
    hostile.assert_unharmed()


def test_deeply_nested_config_is_a_400(hostile: Hostile):
    before = hostile.listing()
    with hostile.client(ACME) as a:
        r = upload(a, hostile.adapters["a1"], "nested", config=b"[" * 20_000 + b"]" * 20_000)
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]
    assert hostile.listing() == before


def test_a_pathological_pattern_freezes_nothing(hostile: Hostile):
    """`(.|.)*` makes Python's re backtrack exponentially on every module name; on RE2 it is linear."""
    raw = json.loads((hostile.adapters["a1"] / "adapter_config.json").read_text())
    raw["target_modules"] = r"(.|.)*(q|k|v|o|gate|up|down)_proj"
    with hostile.client(ACME) as a, hostile.client(None) as anyone:
        start = time.perf_counter()
        r = upload(a, hostile.adapters["a1"], "regex", config=json.dumps(raw).encode())
        assert r.status_code == 201, r.text
        assert time.perf_counter() - start < 10 and anyone.get("/health").status_code == 200
        assert a.post("/v1/completions", json={"model": "regex", "prompt": "x", "max_tokens": 2}).status_code == 200
        assert a.delete("/v1/adapters/regex", params={"purge": "true"}).status_code == 200
    hostile.assert_unharmed()


def test_pins_are_bounded_per_tenant_and_the_queue_times_out(hostile: Hostile):
    """acme may pin one of the four slots; an admin pinning every slot leaves globex's request a 503 within
    the queue timeout, not a hang."""
    with hostile.client(ACME) as a, hostile.client(OPS) as ops, hostile.client(GLOBEX) as g:
        for name in ("p1", "p2"):
            assert upload(a, hostile.adapters["a2"], name).status_code == 201
        assert a.post("/v1/adapters/p1/load", params={"pin": "true"}).json()["pinned"]
        over = a.post("/v1/adapters/p2/load", params={"pin": "true"})
        assert over.status_code == 429 and "already pins 1 device slots" in over.json()["error"]["message"]
        hostile.assert_unharmed()
        for i, key in enumerate(["a0", "a3", "a4"]):
            assert upload(ops, hostile.adapters[key], f"ops{i}").status_code == 201
            assert ops.post(f"/v1/adapters/ops{i}/load", params={"pin": "true"}).json()["pinned"]
        start = time.perf_counter()
        r = g.post("/v1/completions", json={"model": "g1", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and "--queue-timeout" in r.json()["error"]["message"], r.text
        assert 3.5 < time.perf_counter() - start < 15 and r.headers["retry-after"]
        for i in range(3):
            assert ops.delete(f"/v1/adapters/ops{i}", params={"purge": "true"}).status_code == 200
        assert a.post("/v1/adapters/p1/load", params={"pin": "false"}).status_code == 200
    hostile.assert_unharmed()


def test_a_burst_of_one_tenant_leaves_the_other_served(hostile: Hostile):
    """acme fires 40 long requests at once: beyond its 6 concurrent ones it gets 429; globex, arriving after,
    is served (tenants take turns at admission) with its solo outputs."""
    base = hostile.server.services.served_model_name
    body = {"model": base, "prompt": "Burst", "max_tokens": 60, "temperature": 0, "ignore_eos": True}

    async def scenario():
        async with hostile.async_client(ACME) as a:
            burst = [asyncio.create_task(a.post("/v1/completions", json=body)) for _ in range(40)]
            await asyncio.sleep(0.2)
            start = time.perf_counter()
            outputs = await hostile.globex_outputs()
            took = time.perf_counter() - start
            return [r.status_code for r in await asyncio.gather(*burst)], outputs, took

    statuses, outputs, _ = asyncio.run(scenario())
    assert statuses.count(200) >= 6 and statuses.count(429) >= 20, statuses
    hostile.assert_unharmed(outputs)


def test_one_request_may_not_fill_the_queue(hostile: Hostile):
    with hostile.client(ACME) as a:
        base = hostile.server.services.served_model_name
        r = a.post("/v1/completions", json={"model": base, "prompt": ["a", "b", "c"], "n": 4, "max_tokens": 2})
    assert r.status_code == 400 and "12 sequences" in r.json()["error"]["message"], r.text


def test_storage_quota(hostile: Hostile):
    with hostile.client(ACME) as a:
        stored = len([x for x in a.get("/v1/adapters").json()["data"] if x["namespace"] == "acme"])
        for i in range(6 - stored):
            assert upload(a, hostile.adapters["a3"], f"q{i}").status_code == 201
        before = hostile.listing()
        r = upload(a, hostile.adapters["a3"], "one-too-many")
        assert r.status_code == 429 and r.json()["error"]["code"] == "storage_quota_exceeded", r.text
        assert hostile.listing() == before
        assert upload(a, hostile.adapters["a4"], "q0", overwrite="true").status_code == 201  # replacing is fine
        for i in range(6 - stored):
            a.delete(f"/v1/adapters/q{i}", params={"purge": "true"})
