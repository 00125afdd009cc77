"""The hostile tenant of bench/soak.py: every attack of tests/test_hostile*.py, in a loop, counting answers."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter

import httpx

BASE = "SmolLM2-135M-Instruct"


async def hostile_loop(url: str, key: str, until: float, stats: dict, rng: random.Random,
                       valid: tuple[bytes, bytes]) -> None:
    """Attacks in random order until `until`; `stats` gets attempts per attack and answers per status."""
    statuses: Counter[int] = Counter()
    attempts: Counter[str] = Counter()
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300,
                                 trust_env=False) as c:
        attacks = {
            "poisoned_upload": lambda: _poisoned_upload(c, valid, rng),
            "purge_mid_stream": lambda: _purge_mid_stream(c, valid),
            "burst": lambda: _burst(c),
            "pins": lambda: _pins(c, valid),
            "queue_share": lambda: c.post("/v1/completions", json={"model": BASE, "prompt": ["x"] * 16, "n": 8,
                                                                    "max_tokens": 2}),
            "oversize_body": lambda: c.post("/v1/completions", content=b"{" + b" " * 200_000 + b"}",
                                            headers={"Content-Type": "application/json"}),
            "anonymous_body": lambda: _raw(url, "Content-Length: 300000000\r\n", b"{" * 1000),
            "stalled_body": lambda: _raw(url, f"Authorization: Bearer {key}\r\nContent-Length: 500\r\n", b'{"m'),
        }
        while time.monotonic() < until:
            name = rng.choice(list(attacks))
            attempts[name] += 1
            answers = await attacks[name]()
            for r in answers if isinstance(answers, list) else [answers]:
                statuses[r if isinstance(r, int) else r.status_code] += 1
    stats.update({"attempts": sum(attempts.values()), "server_errors": sum(v for k, v in statuses.items() if k >= 500
                                                                              and k != 503)})
    stats.update({f"status_{k}": v for k, v in sorted(statuses.items())})


async def _upload(c: httpx.AsyncClient, name: str, config: bytes, weights: bytes, **params) -> httpx.Response:
    return await c.post("/v1/adapters", data={"id": name}, params=params,
                        files={"config": ("adapter_config.json", config), "weights": ("w.safetensors", weights)})


async def _poisoned_upload(c: httpx.AsyncClient, valid: tuple[bytes, bytes], rng: random.Random) -> httpx.Response:
    config = json.loads(valid[0])
    kind = rng.randrange(3)
    if kind == 0:
        config["lora_alpha"] = 1e30
    elif kind == 1:
        config["target_modules"] = "(?=q)q_proj"
    raw = b"[" * 20_000 + b"]" * 20_000 if kind == 2 else json.dumps(config).encode()
    return await _upload(c, "poison", raw, valid[1])


async def _purge_mid_stream(c: httpx.AsyncClient, valid: tuple[bytes, bytes]) -> list[httpx.Response | int]:
    """Six streams on its own adapter (the router merges it), purged once they run."""
    up = await _upload(c, "hot", *valid, overwrite="true")
    body = {"model": "hot", "prompt": "Merge me", "max_tokens": 48, "temperature": 0, "ignore_eos": True,
            "stream": True}
    started = asyncio.Event()

    async def stream() -> int:
        async with c.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    started.set()
            return r.status_code

    streams = [asyncio.create_task(stream()) for _ in range(6)]
    await asyncio.wait_for(started.wait(), 120)
    purge = await c.delete("/v1/adapters/hot", params={"purge": "true"})
    return [up, purge, *await asyncio.gather(*streams)]


async def _burst(c: httpx.AsyncClient) -> list[httpx.Response]:
    body = {"model": BASE, "prompt": "Burst", "max_tokens": 8, "temperature": 0}
    return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(24)))


async def _pins(c: httpx.AsyncClient, valid: tuple[bytes, bytes]) -> list[httpx.Response]:
    answers = []
    for i in range(3):  # its share of the 8 slots is 2
        answers.append(await _upload(c, f"pin{i}", *valid))
        answers.append(await c.post(f"/v1/adapters/pin{i}/load", params={"pin": "true"}))
    for i in range(3):
        answers.append(await c.delete(f"/v1/adapters/pin{i}", params={"purge": "true"}))
    return answers


async def _raw(url: str, headers: str, body: bytes) -> int:
    """A request head with these headers and this (partial) body; the status the server answers."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{headers}\r\n"
                     .encode() + body)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 30)
        return int(line.split()[1])
    finally:
        writer.close()
