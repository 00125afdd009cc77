"""Build a real engine (tiny model, real store and residency) and drive it from asyncio."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from adapters_store.format import ValidationLimits, parse_adapter, read_adapter_dir
from adapters_store.residency import Residency
from adapters_store.store import SHARED, AdapterRecord, AdapterStore
from server.engine import Engine, EngineConfig
from server.engine_types import GenerationRequest
from server.model_loader import load_base_model
from server.model_runner import ModelRunner
from server.sampling import SamplingParams


def build_engine(model_dir: Path, adapter_dirs: dict[str, Path], root: Path, *, max_loras: int = 8,
                 max_host: int = 32, **config) -> tuple[Engine, dict[str, AdapterRecord]]:
    loaded = load_base_model(str(model_dir), device="cpu", dtype="float32")
    cfg = EngineConfig(**({"threads": 1} | config))  # tiny models: one thread (see server/threads.py)
    runner = ModelRunner(loaded.model, max_loras=max_loras, max_rank=16, max_seqs=cfg.max_batch_size,
                         max_model_len=cfg.max_model_len)
    limits = ValidationLimits(max_rank=16)
    store = AdapterStore(root, lambda i, c, w: parse_adapter(i, c, w, runner.lora.target_shapes, limits))
    records = {name: store.put(SHARED, name, *read_adapter_dir(d))[0] for name, d in adapter_dirs.items()}
    residency = Residency(store, runner.lora, max_device=max_loras, max_host=max_host)
    engine = Engine(runner, loaded.tokenizer, residency, cfg)
    engine.start()
    return engine, records


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
