"""Concurrency over HTTP: mixed-adapter batches equal solo runs, evict/purge in flight, disconnects, overload."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from http_fixtures import make_settings, metric_value, thread_server, upload

LONG = 200  # tokens: long enough to still be running when the test acts on the request


@pytest.fixture(scope="module")
def server(tiny_model_dir, tiny_adapter_dirs, tmp_path_factory):
    settings = make_settings(tiny_model_dir, tmp_path_factory.mktemp("store-conc"))
    with thread_server(settings) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        for name, path in tiny_adapter_dirs.items():
            assert upload(c, path, name).status_code == 201
        yield srv


def _body(model: str, prompt: str, max_tokens: int = 16, **extra) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True} | extra


async def _post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        return await asyncio.gather(*(c.post("/v1/completions", json=b) for b in bodies))


def _assert_same_or_near_tie(batched: dict, alone: dict) -> None:
    """Equal greedy outputs; where they differ, the solo run's top-2 logprob gap there must be < 1e-4."""
    got, want = batched["logprobs"], alone["logprobs"]
    if got["tokens"] == want["tokens"]:
        return
    i = next(i for i, (a, b) in enumerate(zip(got["tokens"], want["tokens"], strict=False)) if a != b)
    top = sorted(want["top_logprobs"][i].values(), reverse=True)
    assert len(top) >= 2 and top[0] - top[1] < 1e-4, (
        f"token {i} differs ({got['tokens'][i]!r} batched vs {want['tokens'][i]!r} alone) and is no near-tie: "
        f"top-2 logprob gap {top[0] - top[1]:.3g}"
    )


def test_32_concurrent_requests_over_8_adapters_equal_solo_runs(server):
    bodies = [_body(f"a{i % 8}", f"Request {i}: the story of number {i * 7} begins", logprobs=2)
              for i in range(32)]
    batched = asyncio.run(_post_all(server.url, bodies))
    assert all(r.status_code == 200 for r in batched), [r.text for r in batched if r.status_code != 200]
    with httpx.Client(base_url=server.url, timeout=60) as c:
        alone = [c.post("/v1/completions", json=b) for b in bodies]
    for r_batched, r_alone in zip(batched, alone, strict=True):
        _assert_same_or_near_tie(r_batched.json()["choices"][0], r_alone.json()["choices"][0])
    assert len({r.json()["choices"][0]["text"] for r in batched}) > 8  # adapters and prompts matter


async def _stream_text(c: httpx.AsyncClient, body: dict, first_chunk: asyncio.Event | None = None) -> str:
    parts = []
    async with c.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line.removeprefix("data: "))
            assert "error" not in chunk, chunk
            parts.append(chunk["choices"][0]["text"])
            if first_chunk is not None:
                first_chunk.set()
    return "".join(parts)


def test_evict_and_purge_during_in_flight_requests(server, tiny_adapter_dirs):
    """Evict (then reuse at once) and purge while requests run: each request keeps the adapter it started with."""
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert upload(c, tiny_adapter_dirs["a1"], "victim").status_code == 201
        assert upload(c, tiny_adapter_dirs["a2"], "victim2").status_code == 201
        ref = {m: c.post("/v1/completions", json=_body(m, "In flight", LONG)).json()["choices"][0]["text"]
               for m in ("victim", "victim2")}

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            started = asyncio.Event()
            first = asyncio.create_task(_stream_text(c, _body("victim", "In flight", LONG), started))
            await started.wait()
            assert (await c.get("/v1/adapters/victim")).json()["in_flight"] >= 1
            assert (await c.delete("/v1/adapters/victim")).status_code == 200
            again = await c.post("/v1/completions", json=_body("victim", "In flight", LONG))
            assert again.status_code == 200 and again.json()["choices"][0]["text"] == ref["victim"]
            assert await first == ref["victim"]

            started = asyncio.Event()
            doomed = asyncio.create_task(_stream_text(c, _body("victim2", "In flight", LONG), started))
            await started.wait()
            assert (await c.delete("/v1/adapters/victim2", params={"purge": "true"})).json()["purged"]
            assert await doomed == ref["victim2"]
            gone = await c.post("/v1/completions", json=_body("victim2", "In flight", 4))
            assert gone.status_code == 404

    asyncio.run(scenario())
    assert server.services.engine.alive


def _running(server) -> int:
    return server.services.engine.stats().running


def _wait_idle(server, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while _running(server) or server.services.engine.stats().waiting:
        assert time.monotonic() < deadline, f"still running: {server.services.engine.stats()}"
        time.sleep(0.01)


def test_client_disconnect_frees_the_slot(server):
    """A client that goes away (streaming or not) cancels its request; running goes back to 0."""
    with httpx.Client(base_url=server.url, timeout=60) as c:
        cancelled_before = metric_value(c.get("/metrics").text, "loramux_cancelled_total")
        body = _body("a3", "Disconnect", LONG, stream=True)
        with c.stream("POST", "/v1/completions", json=body) as r:
            next(r.iter_lines())
            assert _running(server) == 1
        _wait_idle(server)
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/completions", json=_body("a3", "Disconnect", LONG), timeout=0.3)
        _wait_idle(server)
        text = c.get("/metrics").text
        assert metric_value(text, "loramux_requests_running") == 0
        assert metric_value(text, "loramux_cancelled_total") >= cancelled_before + 2
        assert server.services.tenants.in_progress(None) == 0


@pytest.fixture(scope="module")
def small_server(tiny_model_dir, tmp_path_factory):
    settings = make_settings(tiny_model_dir, tmp_path_factory.mktemp("store-small"), max_batch_size=2,
                             max_waiting=3)
    with thread_server(settings) as srv:
        yield srv


def test_overload_gets_503_quickly_while_health_answers(small_server):
    base = small_server.services.served_model_name

    async def scenario() -> tuple[list[tuple[int, float, str | None]], float]:
        async with httpx.AsyncClient(base_url=small_server.url, timeout=120) as c:
            async def one() -> tuple[int, float, str | None]:
                start = time.monotonic()
                r = await c.post("/v1/completions", json=_body(base, "Overload", 120))
                return r.status_code, time.monotonic() - start, r.headers.get("retry-after")

            tasks = [asyncio.create_task(one()) for _ in range(24)]
            await asyncio.sleep(0.2)
            start = time.monotonic()
            assert (await c.get("/health")).status_code == 200
            health_s = time.monotonic() - start
            return await asyncio.gather(*tasks), health_s

    results, health_s = asyncio.run(scenario())
    rejected = [(t, ra) for status, t, ra in results if status == 503]
    assert {status for status, _, _ in results} == {200, 503}
    assert len(rejected) >= 10 and all(ra is not None and int(ra) >= 1 for _, ra in rejected)
    assert max(t for t, _ in rejected) < 2.0
    assert health_s < 2.0
    with httpx.Client(base_url=small_server.url) as c:
        assert metric_value(c.get("/metrics").text, "loramux_rejections_total", reason="queue_full") >= 10
