"""Soak: several tenants on one server for a bounded time, well-behaved traffic with churn, then the same
with a hostile tenant mixed in. Default model, fp32, `--mode auto`, a real server process with API keys.

Each well-behaved tenant (acme, globex, initech) owns two adapters and loops over completions on them and on
the base model (greedy, 16 tokens, some streamed and cut off after the first chunk), and now and then evicts,
loads, pins and unpins its adapters and overwrites a third one between two versions. Every completed output
is compared with that (model, prompt)'s solo output, taken before the soak. The hostile tenant (phase 2)
uploads poisoned configs (lora_alpha 1e30, a lookaround regex, deep JSON), streams on its own hot adapter and
purges it mid-stream, bursts past its quotas, pins past its share, asks for n x prompts past its queue share,
sends oversize and anonymous bodies and half bodies that stall.

Figures per phase: requests served, wrong outputs (expect 0), 5xx answers (expect 0), /health failures and
server restarts (expect 0), p50/p99 latency of the well-behaved requests; and the p99 ratio hostile / calm.

    python bench/soak.py --seconds 120 --json bench/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from common import ALL_LINEAR, adapter_files, emit, load_default, make_peft
from hostile_traffic import hostile_loop
from server_process import launch_server

TENANTS = ("acme", "globex", "initech")
KEY = {t: f"sk-{t}-soak-0123456789" for t in (*TENANTS, "mallory", "ops")}
PROMPTS = [f"Question {i}: explain why the sky looks blue at noon and red at dusk." for i in range(4)]
MAX_TOKENS = 16
FLAGS = {"model": "default", "device": "cpu", "dtype": "float32", "mode": "auto", "max-loras": 8,
         "max-cpu-loras": 4, "max-batch-size": 32, "max-waiting": 128, "max-concurrent-per-tenant": 8,
         "queue-timeout": 60, "max-body-kb": 64, "read-timeout": 2, "max-adapters-per-tenant": 8}


@dataclass
class Tally:
    served: int = 0
    wrong: int = 0
    server_errors: int = 0
    rejected: int = 0  # 4xx (quotas for the hostile tenant; none expected for the others)
    latencies: list[float] = field(default_factory=list)
    wrong_cases: list[str] = field(default_factory=list)


def keys_yaml() -> str:
    lines = ["keys:"] + [f"  {KEY[t]}: {{tenant: {t}, role: user}}" for t in (*TENANTS, "mallory")]
    return "\n".join(lines + [f"  {KEY['ops']}: {{tenant: ops, role: admin}}"]) + "\n"


def client(url: str, tenant: str | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {KEY[tenant]}"} if tenant else {}
    return httpx.AsyncClient(base_url=url, headers=headers, timeout=300, trust_env=False)


async def upload(c: httpx.AsyncClient, name: str, files: tuple[bytes, bytes], **params) -> httpx.Response:
    return await c.post("/v1/adapters", data={"id": name}, params=params,
                        files={"config": ("adapter_config.json", files[0]), "weights": ("w.safetensors", files[1])})


def body(model: str, prompt: str, **extra) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True} | extra


async def references(url: str, models: dict[str, list[str]]) -> dict[tuple[str, str, str], str]:
    """Every (tenant, model, prompt)'s solo output, one request at a time."""
    refs = {}
    for tenant, names in models.items():
        async with client(url, tenant) as c:
            for name in names:
                for p in PROMPTS:
                    r = await c.post("/v1/completions", json=body(name, p))
                    r.raise_for_status()
                    refs[(tenant, name, p)] = r.json()["choices"][0]["text"]
    return refs


async def tenant_loop(url: str, tenant: str, models: list[str], refs: dict, versions: dict, until: float,
                      tally: Tally, rng: random.Random) -> None:
    async with client(url, tenant) as c:
        while time.monotonic() < until:
            action = rng.random()
            if action < 0.06:
                await c.delete(f"/v1/adapters/{rng.choice(models[:2])}")
            elif action < 0.10:
                await c.post(f"/v1/adapters/{models[0]}/load", params={"pin": str(rng.random() < 0.5).lower()})
            elif action < 0.13:
                await upload(c, "churn", versions[rng.randrange(2)], overwrite="true")
            elif action < 0.20:
                await cancel_midway(c, rng.choice(models), rng.choice(PROMPTS))
            else:
                await one_request(c, tenant, rng.choice([*models, "churn"]), rng.choice(PROMPTS), refs, tally)


async def one_request(c: httpx.AsyncClient, tenant: str, model: str, prompt: str, refs: dict, tally: Tally) -> None:
    start = time.perf_counter()
    r = await c.post("/v1/completions", json=body(model, prompt))
    took = time.perf_counter() - start
    if r.status_code >= 500:
        tally.server_errors += 1
        return
    if r.status_code != 200:
        tally.rejected += 1
        return
    tally.served += 1
    tally.latencies.append(took)
    text = r.json()["choices"][0]["text"]
    allowed = {refs[(tenant, m, prompt)] for m in ([model] if model != "churn" else ["churn-v0", "churn-v1"])}
    if text not in allowed:
        tally.wrong += 1
        tally.wrong_cases.append(f"{tenant} {model} {prompt!r}: {text!r}")


async def cancel_midway(c: httpx.AsyncClient, model: str, prompt: str) -> None:
    async with c.stream("POST", "/v1/completions", json=body(model, prompt, stream=True)) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                return  # the client goes away after the first chunk


async def health_loop(url: str, until: float, failures: list[str]) -> None:
    async with client(url, None) as c:
        while time.monotonic() < until:
            try:
                r = await c.get("/health", timeout=5)
                if r.status_code != 200:
                    failures.append(f"/health {r.status_code}")
            except httpx.HTTPError as e:
                failures.append(f"/health {type(e).__name__}")
            await asyncio.sleep(0.5)


async def phase(url: str, seconds: float, refs: dict, versions: dict, hostile: tuple[bytes, bytes] | None,
                seed: int) -> dict:
    until = time.monotonic() + seconds
    tally, health, hostile_stats = Tally(), [], {}
    loops = [tenant_loop(url, t, [f"{t}-a", f"{t}-b", "SmolLM2-135M-Instruct"], refs, versions[t], until, tally,
                         random.Random(seed + i)) for i, t in enumerate(TENANTS)]
    loops.append(health_loop(url, until, health))
    if hostile is not None:
        loops.append(hostile_loop(url, KEY["mallory"], until, hostile_stats, random.Random(seed + 99), hostile))
    await asyncio.gather(*loops)
    lat = sorted(tally.latencies)
    return {"served": tally.served, "wrong": tally.wrong, "server_errors": tally.server_errors,
            "rejected_well_behaved": tally.rejected, "health_failures": len(health),
            "p50_s": statistics.median(lat) if lat else float("nan"),
            "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan"),
            "wrong_cases": tally.wrong_cases[:5]} | {f"hostile_{k}": v for k, v in hostile_stats.items()}


async def setup_tenants(url: str, peft) -> tuple[dict, dict]:
    versions = {}
    for t in TENANTS:
        async with client(url, t) as c:
            for name in ("a", "b"):
                (await upload(c, f"{t}-{name}", adapter_files(peft, f"{t}-{name}"))).raise_for_status()
            versions[t] = [adapter_files(peft, f"{t}-churn-{v}") for v in range(2)]
            for v in range(2):  # both versions' references, stored under their own names
                (await upload(c, f"churn-v{v}", versions[t][v])).raise_for_status()
            (await upload(c, "churn", versions[t][0])).raise_for_status()
    models = {t: [f"{t}-a", f"{t}-b", "churn-v0", "churn-v1", "SmolLM2-135M-Instruct"] for t in TENANTS}
    return await references(url, models), versions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=120, help="length of each phase")
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()
    loaded = load_default("fp32")
    names = [f"{t}-{n}" for t in TENANTS for n in ("a", "b", "churn-0", "churn-1")] + ["mallory-hot"]
    specs = {n: dict(r=(4, 8, 16, 32)[i % 4], lora_alpha=16, target_modules=ALL_LINEAR) for i, n in enumerate(names)}
    peft = make_peft(loaded.model, specs, seed=7)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "keys.yaml").write_text(keys_yaml())
        flags = FLAGS | {"adapters-dir": work / "store", "api-keys-file": work / "keys.yaml"}
        with launch_server(flags, work / "server.log", admin_key=KEY["ops"]) as srv:
            srv.wait_ready()
            pid = srv.proc.pid
            refs, versions = asyncio.run(setup_tenants(srv.url, peft))
            calm = asyncio.run(phase(srv.url, args.seconds, refs, versions, hostile=None, seed=1))
            rough = asyncio.run(phase(srv.url, args.seconds, refs, versions, adapter_files(peft, "mallory-hot"), 2))
            alive = srv.proc.poll() is None and srv.proc.pid == pid
    out = {f"calm_{k}": v for k, v in calm.items()} | {f"hostile_phase_{k}": v for k, v in rough.items()}
    out |= {"server_restarts": 0 if alive else 1, "p99_hostile_vs_calm": rough["p99_s"] / calm["p99_s"],
            "seconds_per_phase": args.seconds}
    emit(out, args.json_path)


if __name__ == "__main__":
    main()
