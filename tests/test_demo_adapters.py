"""The demo adapters change the default model visibly, through HTTP, on prompts they were not trained on."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from http_fixtures import make_settings, thread_server

from adapters_store.demo.behaviours import BEHAVIOURS, HELD_OUT_PROMPTS

DEMO = Path(__file__).resolve().parents[1] / "adapters_store" / "demo"
MIN_SHOWN = 7  # of the 10 held-out prompts


async def answers(url: str, model: str) -> list[str]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        replies = await asyncio.gather(*(client.post("/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": p}], "max_tokens": 48, "temperature": 0,
        }) for p in HELD_OUT_PROMPTS))
    for r in replies:
        r.raise_for_status()
    return [r.json()["choices"][0]["message"]["content"] for r in replies]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "auto"])
def test_each_demo_adapter_shows_its_behaviour_and_the_base_model_none(tmp_path, dtype):
    settings = make_settings("default", tmp_path / "store", seed_adapters=DEMO, dtype=dtype, max_model_len=512)
    with thread_server(settings) as server:
        base_name = server.services.served_model_name
        outputs = {name: asyncio.run(answers(server.url, name)) for name in [base_name, *BEHAVIOURS]}
    for behaviour, check in BEHAVIOURS.items():
        base_hits = [t for t in outputs[base_name] if check(t)]
        assert not base_hits, f"the base model already shows {behaviour!r}: {base_hits}"
        shown = sum(check(t) for t in outputs[behaviour])
        assert shown >= MIN_SHOWN, f"{behaviour}: {shown}/10 answers show it:\n" + "\n".join(outputs[behaviour])
