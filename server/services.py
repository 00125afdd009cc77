"""Building the serving stack: model runner, adapter store, host cache, engine and residency, wired once.

``build_core`` is the stack without HTTP (the server, the tests' engine harness and the benchmarks all
build it this way); ``build_services`` adds what the HTTP routes need, from the settings.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from transformers import PreTrainedModel

from adapters_store.format import LoraAdapter, ModuleShape, ValidationLimits, parse_adapter
from adapters_store.host_cache import HostCache
from adapters_store.prompt import ModelGeometry
from adapters_store.reader import StoreReader
from adapters_store.store import AdapterRecord, AdapterStore, ParseFn
from server.api.keys import KeyTable
from server.api.logging import HttpMetrics
from server.engine import Engine, EngineConfig
from server.engine_types import EngineStats, GenerationRequest, SeqOutput
from server.metrics import Metrics
from server.model_loader import LoadedModel, load_base_model
from server.model_runner import ModelRunner
from server.residency import Residency, ResidencyInfo
from server.settings import Settings
from server.tenancy import TenantPolicy, TenantQuota
from server.threads import on_fresh_thread


@dataclass
class Core:
    runner: ModelRunner
    limits: ValidationLimits
    store: AdapterStore | StoreReader
    host: HostCache
    engine: Engine  # not started
    residency: Residency
    metrics: Metrics


def build_core(model: PreTrainedModel, tokenizer, adapters_dir: Path, config: EngineConfig, *, max_loras: int,
               max_rank: int, max_cpu_loras: int, limits: ValidationLimits | None = None,
               metrics: Metrics | None = None, tenants: TenantPolicy | None = None, prepack: bool = True,
               compile: bool = False, lora_kernels: bool = True, attention_kernel: bool = True,
               reader: bool = False) -> Core:
    """The engine over `model`, its LoRA slots and the adapter store at `adapters_dir` (indexed now; with
    `reader`, a read-only view of a store another process writes, as a cluster replica has). `compile`: the
    step's graphs are built here, before the engine starts (server/compiled.py)."""
    metrics = metrics or Metrics()
    tenants = tenants or TenantPolicy(TenantQuota(), open_mode=True)
    limits = limits or ValidationLimits(max_rank=max_rank)
    runner = ModelRunner(model, max_loras=max_loras, max_rank=max_rank, max_model_len=config.max_model_len,
                         kv_tokens=config.kv_cache_tokens, on_slot_load=metrics.load_observer("device"),
                         prepack=prepack, compile=compile, lora_kernels=lora_kernels,
                         attention_kernel=attention_kernel)
    if compile:  # the graphs are built at the engine's thread count (dynamo guards it)
        metrics.compile_seconds.set(on_fresh_thread(runner.warm_up, config.threads))
    parse = adapter_parser(runner.lora.shapes, limits, runner.geometry)
    store = StoreReader(adapters_dir, parse) if reader else AdapterStore(adapters_dir, parse)
    host = HostCache(store, max_idle=max_cpu_loras, on_load=metrics.load_observer("host"))
    engine = Engine(runner, tokenizer, host, config, metrics, waiting_cap=tenants.waiting_cap)
    stored = dict if reader else (lambda: Counter(r.kind for r in store.list()))
    metrics.watch_residency(lambda: host.stats, lambda: runner.slots.stats, stored)
    return Core(runner, limits, store, host, engine, Residency(host, runner.slots, engine), metrics)


def adapter_parser(shapes: dict[str, ModuleShape], limits: ValidationLimits, geometry: ModelGeometry) -> ParseFn:
    """Upload and store validation bound to the base model's projection shapes and geometry."""

    def parse(adapter_id: str, config_bytes: bytes, weights: bytes) -> LoraAdapter:
        return parse_adapter(adapter_id, config_bytes, weights, shapes, limits, geometry)

    return parse


def validation_limits(settings: Settings) -> ValidationLimits:
    return ValidationLimits(max_rank=settings.max_rank, max_file_bytes=settings.max_upload_bytes)


class EngineAPI(Protocol):
    """What the HTTP routes ask of an engine: ``server.engine.Engine``, or ``server.cluster.remote``'s."""

    max_model_len: int

    @property
    def alive(self) -> bool: ...

    def validate(self, req: GenerationRequest) -> None: ...

    async def generate(self, req: GenerationRequest) -> AsyncIterator[SeqOutput]: ...

    def cancel(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...


class ResidencyAPI(Protocol):
    """Where adapters live and the moves the routes make: ``server.residency.Residency``, or the cluster's."""

    async def infos(self, records: list[AdapterRecord]) -> list[ResidencyInfo]: ...

    async def load(self, record: AdapterRecord, pin: bool | None, pin_cap: int | None = None) -> int: ...

    async def evict(self, record: AdapterRecord) -> None: ...


@dataclass
class Services:
    """Everything the HTTP routes use, built once in lifespan (``server.api.deps`` hands them out)."""

    settings: Settings
    model: LoadedModel
    served_model_name: str
    limits: ValidationLimits
    store: AdapterStore
    engine: EngineAPI  # the engine (single server), or the cluster's replicas behind it
    residency: ResidencyAPI
    metrics: Metrics
    keys: KeyTable | None
    tenants: TenantPolicy
    http_metrics: HttpMetrics
    started_at: float


def engine_config(settings: Settings) -> EngineConfig:
    return EngineConfig(mode=settings.mode, max_batch_size=settings.max_batch_size,
                        max_model_len=settings.max_model_len, kv_cache_tokens=settings.kv_cache_tokens,
                        max_tokens_per_step=settings.max_tokens_per_step,
                        max_waiting=settings.max_waiting, merge_share=settings.merge_share,
                        unmerge_share=settings.unmerge_share, max_turn_s=settings.max_turn_s,
                        queue_timeout=settings.queue_timeout, threads=settings.threads,
                        max_adapters_per_request=settings.max_adapters_per_request,
                        stream_interval=settings.stream_interval)


def tenant_policy(settings: Settings, keys: KeyTable | None) -> TenantPolicy:
    """The flags' quotas for every tenant, the keys file's per-tenant changes; no quotas in open mode."""
    default = TenantQuota(
        max_concurrent=settings.max_concurrent_per_tenant,
        max_waiting=settings.max_waiting_per_tenant or max(1, settings.max_waiting // 4),
        max_pins=settings.max_pins_per_tenant if settings.max_pins_per_tenant is not None
        else max(1, settings.max_loras // 4),
        max_adapters=settings.max_adapters_per_tenant, max_adapter_mb=settings.max_adapter_mb_per_tenant)
    return TenantPolicy(default, keys.quotas if keys else None, open_mode=keys is None)


def build_engine_core(settings: Settings, keys: KeyTable | None,
                      reader: bool = False) -> tuple[LoadedModel, TenantPolicy, Core]:
    """Blocking start-up work (model, store index): run in a worker thread. The engine is not started.
    `reader`: the store is written by another process (a cluster replica's view of the shared store)."""
    loaded = load_base_model(settings.model, device=settings.device, dtype=settings.dtype,
                             cache_dir=settings.cache_dir)
    limits = validation_limits(settings)
    tenants = tenant_policy(settings, keys)
    core = build_core(loaded.model, loaded.tokenizer, settings.adapters_dir, engine_config(settings),
                      max_loras=settings.max_loras, max_rank=settings.max_rank,
                      max_cpu_loras=settings.max_cpu_loras, limits=limits, tenants=tenants, prepack=settings.prepack,
                      compile=settings.compile, lora_kernels=settings.lora_kernels,
                      attention_kernel=settings.attention_kernel, reader=reader)
    return loaded, tenants, core


def build_services(settings: Settings, keys: KeyTable | None) -> Services:
    """The single server's services (blocking: run in a worker thread); the engine is not started."""
    loaded, tenants, core = build_engine_core(settings, keys)
    return Services(settings=settings, model=loaded, served_model_name=settings.served_model_name or loaded.name,
                    limits=core.limits, store=core.store, engine=core.engine, residency=core.residency,
                    metrics=core.metrics, keys=keys, tenants=tenants, http_metrics=HttpMetrics(core.metrics.registry),
                    started_at=time.time())
