"""The FastAPI application: `create_app(settings)`; the services (model, store, engine) are built in `lifespan`."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from pathlib import Path

from fastapi import FastAPI

from adapters_store.errors import AdapterError
from adapters_store.format import CONFIG_FILE, ValidationLimits, read_adapter_dir
from adapters_store.store import SHARED, AdapterStore
from server.api import adapters, completions, health, models
from server.api.errors import install_error_handlers
from server.api.keys import KeyTable, create_keys_file
from server.api.limits import BodyLimitMiddleware, GateMiddleware
from server.api.logging import AccessLogMiddleware
from server.services import Services, build_services
from server.settings import Settings
from server.threads import in_fresh_thread, single_threaded, single_threaded_executor

log = logging.getLogger("loramux.server")


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


async def preload(services: Services, ids: list[str]) -> None:
    """Pin each `--preload` adapter ('id' = shared, 'namespace/id' = a tenant's) in a device slot."""
    for name in ids:
        namespace, _, adapter_id = name.rpartition("/")
        record = services.store.get(namespace or SHARED, adapter_id)
        if record is None:
            log.error("--preload %s: no such adapter in the store", name)
            continue
        try:
            slot = await services.residency.load(record, pin=True)
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


def load_keys(settings: Settings) -> KeyTable | None:
    """The API keys (None: open mode), creating the file first when --create-keys-file asks for it."""
    if settings.api_keys_file is None:
        return None
    if settings.create_keys_file and create_keys_file(settings.api_keys_file):
        log.warning("created the API keys file %s with one admin key (mode 0600): read the key there",
                    settings.api_keys_file)
    return KeyTable.from_file(settings.api_keys_file)


@asynccontextmanager
async def lifespan(app: FastAPI, settings: Settings, keys: KeyTable | None) -> AsyncIterator[None]:
    single_threaded()  # the event loop's thread; only the engine thread runs torch on every core
    asyncio.get_running_loop().set_default_executor(single_threaded_executor("loramux-io"))
    services = await in_fresh_thread(lambda: build_services(settings, keys), threads=settings.threads)
    app.state.services = services
    engine = services.engine
    engine.start()
    if settings.seed_adapters is not None:
        await asyncio.to_thread(seed_adapters, services.store, settings.seed_adapters, services.limits)
    await preload(services, settings.preload)
    for entry in services.store.quarantined:
        log.warning("adapter %s was quarantined: %s", entry.key, entry.reason)
    _log_start(services)
    try:
        yield
    finally:
        log.info("shutting down: draining the engine (up to %.0f s)", settings.drain_timeout)
        await asyncio.to_thread(engine.shutdown, settings.drain_timeout)


def _log_start(services: Services) -> None:
    settings, runner = services.settings, services.engine.runner
    cache = runner.cache
    log.info("serving %s as %r from %s on %s, %s; KV cache %d tokens (%.1f MiB), context %d; LoRA slots %d "
             "(%.1f MiB); mode %s; %d adapters", services.model.name, services.served_model_name,
             services.model.source, runner.device, str(runner.dtype).removeprefix("torch."), cache.tokens,
             cache.nbytes / 2**20, cache.max_len, runner.lora.n_slots, runner.lora.buffer_bytes / 2**20,
             settings.mode, len(services.store.list()))
    if services.keys is None:
        log.warning("running open, without API keys: every caller is the local admin (set --api-keys-file)")
    else:
        log.info("API keys loaded for %d tenants", services.keys.tenants)
    log.info("%s", ready_banner(settings, services.served_model_name, services.store))


Lifespan = Callable[..., AbstractAsyncContextManager[None]]  # (app, settings=, keys=) -> the services' lifetime


def create_app(settings: Settings, serve: Lifespan = lifespan) -> FastAPI:
    """The app for these settings (the keys file is read now); `serve` builds the services when the app starts
    (the model and engine here; the cluster's ingress passes its own, which forwards to engine replicas)."""
    keys = load_keys(settings)
    app = FastAPI(title="loramux", version="0.1.0", lifespan=partial(serve, settings=settings, keys=keys),
                  description="Multi-tenant LoRA adapter inference server with an OpenAI-compatible API.")
    install_error_handlers(app)
    for module in (completions, adapters, models, health):
        app.include_router(module.router)
    caps = dict(upload_bytes=settings.max_upload_bytes, body_bytes=settings.max_body_bytes)
    app.add_middleware(BodyLimitMiddleware, read_timeout=settings.read_timeout, **caps)
    app.add_middleware(GateMiddleware, keys=keys, **caps)  # runs before BodyLimitMiddleware: no body read yet
    app.add_middleware(AccessLogMiddleware)
    return app
