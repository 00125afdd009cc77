"""A multi-tenant server (real uvicorn, fp32, tight quotas) and a well-behaved tenant whose solo outputs are
the reference every hostile test compares against."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from http_fixtures import GLOBEX, KEYS_YAML, ThreadServer, make_settings, store_listing, upload

TENANTS_YAML = "tenants:\n  globex: {max_concurrent: 16}\n"  # globex's 6 concurrent requests fit
QUOTAS = dict(mode="auto", max_loras=4, max_batch_size=16, max_waiting=32, max_concurrent_per_tenant=6,
              max_adapters_per_tenant=6, queue_timeout=4.0, read_timeout=1.0, max_body_kb=64, max_upload_mb=2)
PROMPTS = [f"Tenant globex asks question number {i}:" for i in range(6)]


@dataclass
class Hostile:
    server: ThreadServer
    root: Path  # the adapter store
    adapters: dict[str, Path]  # name -> PEFT directory
    reference: list[str] = field(default_factory=list)  # globex's solo outputs, one per (model, prompt)

    def client(self, key: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.server.url, headers=headers, timeout=60)

    def async_client(self, key: str | None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.AsyncClient(base_url=self.server.url, headers=headers, timeout=120)

    def globex_bodies(self) -> list[dict]:
        base = self.server.services.served_model_name
        return [{"model": model, "prompt": p, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
                for model in ("g1", base) for p in PROMPTS[:3]]

    async def globex_outputs(self) -> list[str]:
        """globex's requests, all at once (batched with whatever else runs)."""
        async with self.async_client(GLOBEX) as c:
            responses = await asyncio.gather(*(c.post("/v1/completions", json=b) for b in self.globex_bodies()))
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        return [r.json()["choices"][0]["text"] for r in responses]

    def assert_unharmed(self, outputs: list[str] | None = None) -> None:
        """globex's outputs equal its solo ones; the server is healthy."""
        outputs = outputs if outputs is not None else asyncio.run(self.globex_outputs())
        assert outputs == self.reference
        with self.client(None) as c:
            assert c.get("/health").status_code == 200
        assert self.server.services.engine.alive

    def listing(self) -> list[str]:
        return store_listing(self.root)


def start_hostile(tiny_model_dir: Path, tiny_adapter_dirs: dict[str, Path], tmp: Path) -> Hostile:
    keys = tmp / "keys.yaml"
    keys.write_text(KEYS_YAML + TENANTS_YAML)
    root = tmp / "store"
    settings = make_settings(tiny_model_dir, root, api_keys_file=keys, **QUOTAS)
    server = ThreadServer(settings).start()
    hostile = Hostile(server, root, tiny_adapter_dirs)
    with hostile.client(GLOBEX) as g:
        assert upload(g, tiny_adapter_dirs["a5"], "g1").status_code == 201
        hostile.reference = [g.post("/v1/completions", json=b).json()["choices"][0]["text"]
                             for b in hostile.globex_bodies()]
    return hostile
