"""The FastAPI application: `create_app(settings)`; the model, store, residency and engine are built in `lifespan`."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI

from adapters_store.errors import AdapterError
from adapters_store.format import CONFIG_FILE, ValidationLimits, parse_adapter, read_adapter_dir
from adapters_store.residency import Residency, ResidencyStats
from adapters_store.store import SHARED, AdapterStore
from server.api import adapters, completions, health, models
from server.api.auth import KeyTable
from server.api.errors import install_error_handlers
from server.api.limits import BodyLimitMiddleware, TenantLimiter
from server.api.logging import AccessLogMiddleware, HttpMetrics
from server.engine import Engine, EngineConfig
from server.metrics import Metrics
from server.model_loader import LoadedModel, load_base_model
from server.model_runner import ModelRunner
from server.settings import Settings
from server.threads import in_fresh_thread, single_threaded, single_threaded_executor

log = logging.getLogger("loramux.server")


@dataclass
class Services:
    """Everything lifespan builds before the engine starts."""

    loaded: LoadedModel
    runner: ModelRunner
    limits: ValidationLimits
    store: AdapterStore
    residency: Residency
    keys: KeyTable | None


def build_services(settings: Settings) -> Services:
    """Blocking start-up work (keys, model, store index): run in a worker thread."""
    keys = KeyTable.from_file(settings.api_keys_file) if settings.api_keys_file else None
    loaded = load_base_model(settings.model, device=settings.device, dtype=settings.dtype)
    runner = ModelRunner(loaded.model, max_loras=settings.max_loras, max_rank=settings.max_rank,
                         max_seqs=settings.max_batch_size, max_model_len=settings.max_model_len)
    limits = ValidationLimits(max_rank=settings.max_rank, max_file_bytes=settings.max_upload_bytes)
    shapes = runner.lora.target_shapes

    def parse(adapter_id: str, config: bytes, weights: bytes):
        return parse_adapter(adapter_id, config, weights, shapes, limits)

    store = AdapterStore(settings.adapters_dir, parse)
    residency = Residency(store, runner.lora, max_device=settings.max_loras, max_host=settings.max_cpu_loras)
    return Services(loaded, runner, limits, store, residency, keys)


def seed_adapters(store: AdapterStore, directory: Path, limits: ValidationLimits) -> None:
    """Import every PEFT sub-directory of `directory` into the shared namespace (when absent or different)."""
    if not directory.is_dir():
        log.warning("--seed-adapters %s is not a directory; nothing seeded", directory)
        return
    for sub in sorted(p for p in directory.iterdir() if (p / CONFIG_FILE).is_file()):
        try:
            config, weights = read_adapter_dir(sub, limits)
            record, changed = store.put(SHARED, sub.name, config, weights, overwrite=True)
        except AdapterError as e:
            log.warning("not seeding %s: %s", sub, e.message)
            continue
        log.info("seed adapter %s: %s", record.key, "imported" if changed else "already stored")


async def preload(app: FastAPI, ids: list[str]) -> None:
    """Pin each `--preload` adapter ('id' = shared, 'namespace/id' = a tenant's) in a device slot."""
    state = app.state
    for name in ids:
        namespace, _, adapter_id = name.rpartition("/")
        record = state.store.get(namespace or SHARED, adapter_id)
        if record is None:
            log.error("--preload %s: no such adapter in the store", name)
            continue
        try:
            await asyncio.to_thread(state.residency.ensure_host, record)
            slot = await state.engine.call(lambda r=record: state.residency.pin(r))
        except AdapterError as e:
            log.error("--preload %s: %s", name, e.message)
            continue
        log.info("preloaded adapter %s into slot %d (pinned)", record.key, slot)


def ready_banner(settings: Settings, model_name: str, store: AdapterStore) -> str:
    """The URL and one copy-paste request (with a demo adapter when one is stored)."""
    url = f"http://{settings.host}:{settings.port}"
    shared = [r.id for r in store.list(SHARED)]
    model = "shout" if "shout" in shared else (shared[0] if shared else model_name)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "What is the capital of France?"}],
                       "max_tokens": 32, "temperature": 0})
    auth = " -H 'Authorization: Bearer $KEY'" if settings.api_keys_file else ""
    return (f"ready: {url}  (API docs at {url}/docs)\n  try:  curl -s {url}/v1/chat/completions "
            f"-H 'Content-Type: application/json'{auth} -d '{body}'")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    single_threaded()  # the event loop's thread; only the engine thread runs torch on every core
    asyncio.get_running_loop().set_default_executor(single_threaded_executor("loramux-io"))
    services = await in_fresh_thread(lambda: build_services(settings), threads=settings.threads)
    loaded, runner = services.loaded, services.runner
    state = app.state
    state.keys = services.keys
    state.store, state.residency, state.validation_limits = services.store, services.residency, services.limits
    state.tokenizer = loaded.tokenizer
    state.served_model_name = settings.served_model_name or loaded.name
    state.model_source = loaded.source
    state.metrics = metrics = Metrics()
    state.http_metrics = HttpMetrics(metrics.registry)
    state.residency_seen = ResidencyStats()
    state.tenant_limiter = TenantLimiter(settings.max_concurrent_per_tenant)
    config = EngineConfig(mode=settings.mode, max_batch_size=settings.max_batch_size,
                          max_model_len=settings.max_model_len, max_tokens_per_step=settings.max_tokens_per_step,
                          max_waiting=settings.max_waiting, merge_share=settings.merge_share,
                          unmerge_share=settings.unmerge_share, max_turn_s=settings.max_turn_s,
                          threads=settings.threads)
    state.engine = engine = Engine(runner, loaded.tokenizer, services.residency, config, metrics)
    engine.start()
    state.started_at = time.time()
    if settings.seed_adapters is not None:
        await asyncio.to_thread(seed_adapters, services.store, settings.seed_adapters, services.limits)
    await preload(app, settings.preload)
    for entry in services.store.quarantined:
        log.warning("adapter %s was quarantined: %s", entry.key, entry.reason)
    log.info("serving %s as %r from %s on %s, %s; KV cache %d rows x %d tokens (%.1f MiB); mode %s; %d adapters",
             loaded.name, state.served_model_name, loaded.source, runner.device, str(runner.dtype).removeprefix(
                 "torch."), runner.cache.rows, runner.cache.max_len, runner.cache.nbytes / 2**20, settings.mode,
             len(services.store.list()))
    if services.keys is None:
        log.warning("running open, without API keys: every caller is the local admin (set --api-keys-file)")
    else:
        log.info("API keys loaded for %d tenants", services.keys.tenants)
    log.info("%s", ready_banner(settings, state.served_model_name, services.store))
    try:
        yield
    finally:
        log.info("shutting down: draining the engine (up to %.0f s)", settings.drain_timeout)
        await asyncio.to_thread(engine.shutdown, settings.drain_timeout)


def create_app(settings: Settings) -> FastAPI:
    """The app for these settings; nothing heavy happens until lifespan starts."""
    app = FastAPI(title="loramux", version="0.1.0", lifespan=lifespan,
                  description="Multi-tenant LoRA adapter inference server with an OpenAI-compatible API.")
    app.state.settings = settings
    install_error_handlers(app)
    for module in (completions, adapters, models, health):
        app.include_router(module.router)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_upload_bytes)
    app.add_middleware(AccessLogMiddleware)
    return app
