"""Build a real engine (tiny model, real store and residency) and drive it from asyncio."""

from __future__ import annotations

import asyncio
import math
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from adapters_store.format import read_adapter_dir
from adapters_store.store import SHARED, AdapterRecord
from server.engine import Engine, EngineConfig
from server.engine_types import GenerationRequest
from server.model_loader import load_base_model
from server.sampling import SamplingParams
from server.services import Core, build_core

MODES = ["batched", "auto", "merged", "auto-compiled"]  # engine modes of the PEFT-oracle tests, and auto compiled


def mode_options(mode: str) -> dict:
    """build_engine's keywords for one of MODES."""
    name, _, compiled = mode.partition("-")
    return {"mode": name, "compile": bool(compiled)}


def build_stack(model_dir: Path, adapter_dirs: dict[str, Path], root: Path, *, max_loras: int = 8,
                max_host: int = 32, compile: bool = False, **config) -> tuple[Core, dict[str, AdapterRecord]]:
    """The serving stack over the tiny model (started), with each adapter stored in the shared namespace;
    `compile`: the compiled step (asserted to be compiled, not fallen back to eager)."""
    loaded = load_base_model(str(model_dir), cache_dir=root / "cache", device="cpu", dtype="float32")
    cfg = EngineConfig(**({"threads": 1} | config))  # tiny models: one thread (see server/threads.py)
    core = build_core(loaded.model, loaded.tokenizer, root / "store", cfg, max_loras=max_loras, max_rank=16,
                      max_cpu_loras=max_host, compile=compile)
    assert (core.runner.compiled is not None) == compile
    records = {name: core.store.put(SHARED, name, *read_adapter_dir(d))[0] for name, d in adapter_dirs.items()}
    core.engine.start()
    return core, records


def build_engine(model_dir: Path, adapter_dirs: dict[str, Path], root: Path, **kwargs) -> tuple[Engine, dict]:
    core, records = build_stack(model_dir, adapter_dirs, root, **kwargs)
    return core.engine, records


@dataclass
class Result:
    token_ids: list[list[int]] = field(default_factory=list)  # per sample
    text: list[str] = field(default_factory=list)
    finish: list[str | None] = field(default_factory=list)
    logprobs: list[list] = field(default_factory=list)


def request(prompt: list[int], adapter: AdapterRecord | None = None, **params) -> GenerationRequest:
    return GenerationRequest(uuid.uuid4().hex, tuple(prompt), SamplingParams(**params), adapter)


async def collect(engine: Engine, req: GenerationRequest, delay: float = 0.0) -> Result:
    if delay:
        await asyncio.sleep(delay)
    n = req.params.n
    res = Result([[] for _ in range(n)], [""] * n, [None] * n, [[] for _ in range(n)])
    async for out in await engine.generate(req):
        res.token_ids[out.index] += out.token_ids
        res.text[out.index] += out.text
        res.logprobs[out.index] += list(out.logprobs or ())
        if out.finish_reason:
            res.finish[out.index] = out.finish_reason
    return res


async def collect_together(engine: Engine, reqs: list[GenerationRequest]) -> list[Result]:
    """Serve requests in one batch: the engine is held at a step boundary until every one is queued."""
    gate = threading.Event()
    held = asyncio.ensure_future(engine.call(lambda: gate.wait(30)))
    tasks = [asyncio.ensure_future(collect(engine, r)) for r in reqs]
    for _ in range(1000):
        if engine.stats().waiting == len(reqs):
            break
        await asyncio.sleep(0.01)
    gate.set()
    await held
    return await asyncio.gather(*tasks)


def assert_equals_reference(work: list[tuple[object, list[int]]], results: list[Result],
                            reference: Callable[[object, list[int]], tuple[list[int], list[float]]]) -> None:
    """Each (label, prompt) request's greedy tokens equal reference(label, prompt)'s, and its logprobs are within
    1e-4 of the reference's."""
    for (what, prompt), res in zip(work, results, strict=True):
        tokens, logprobs = reference(what, prompt)
        assert res.token_ids[0] == tokens, f"{what}: {res.token_ids[0]} != PEFT's {tokens}"
        for got, want in zip(res.logprobs[0], logprobs, strict=True):
            assert math.isclose(got.logprob, want, abs_tol=1e-4), what
