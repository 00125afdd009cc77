"""An engine replica: the single server's engine on its own copy of the base model, as a Ray Serve deployment.

Requests arrive through a deployment handle with the adapter's identity as Ray's multiplexed model id. The
multiplexed loader makes the version resident in a device slot (through the same host cache and slot table
as the single server), so Ray's "models on this replica" are the adapters in its slots; when Ray's LRU drops
one, its slot is freed. The replica reads the shared store (the ingress writes it) and reports to the
cluster state what it holds, applying the evictions the ingress issues.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextvars import ContextVar
from dataclasses import dataclass

from ray import serve

from adapters_store.errors import NoFreeSlot, ServingError
from adapters_store.store import AdapterRecord
from server.api.keys import KeyTable
from server.cluster.settings import ClusterSettings
from server.cluster.state import SYNC_S, ModelFacts, ReplicaReport
from server.engine_types import GenerationRequest, SeqOutput
from server.services import build_engine_core
from server.threads import in_fresh_thread, single_threaded, single_threaded_executor

log = logging.getLogger("loramux.cluster")
_REQUESTED: ContextVar[AdapterRecord] = ContextVar("loramux_requested_adapter")
COUNTERS = ("loramux_requests", "loramux_generated_tokens", "loramux_prompt_tokens", "loramux_steps")


@dataclass(frozen=True)
class Accepted:
    """First item of a replica's stream: the request is queued on `replica`."""

    replica: str


@dataclass(frozen=True)
class Refused:
    """The request (or load) failed before any output, with the engine's or the store's typed error."""

    error: ServingError


class _Resident:
    """What Ray's multiplexed cache holds for one adapter version: dropping it frees the version's slot."""

    def __init__(self, replica: EngineReplica, record: AdapterRecord):
        self._replica, self._record = replica, record

    def __del__(self) -> None:
        replica, self._replica = self._replica, None
        if replica is not None:
            replica.release_slot(self._record)


class EngineReplica:
    """The deployment's class; `replica_deployment` applies Ray's decorators with the settings' numbers."""

    async def __init__(self, settings: ClusterSettings, state) -> None:
        single_threaded()
        loop = asyncio.get_running_loop()
        loop.set_default_executor(single_threaded_executor("loramux-io"))
        self.name = serve.get_replica_context().replica_id.unique_id
        self.state = state
        keys = KeyTable.from_file(settings.api_keys_file) if settings.api_keys_file else None
        _, _, self.core = await in_fresh_thread(lambda: build_engine_core(settings, keys, reader=True),
                                                threads=settings.threads)
        self.core.engine.start()
        self._loop = loop
        runner = self.core.runner
        facts = ModelFacts(limits=self.engine.limits, shapes=runner.lora.shapes, geometry=runner.geometry)
        self._applied = await state.register.remote(facts)
        self._sync = asyncio.ensure_future(self._sync_loop())
        self._drain_timeout = settings.drain_timeout
        log.info("replica %s (pid %d) ready: %d LoRA slots", self.name, os.getpid(), self.core.runner.lora.n_slots)

    @property
    def engine(self):
        return self.core.engine

    async def generate(self, req: GenerationRequest) -> AsyncIterator[Accepted | Refused | SeqOutput]:
        """Accepted (or Refused) first, then the request's outputs; a cancelled stream cancels the request."""
        try:
            if req.adapter is not None:
                await self._hold(req.adapter)
            outputs = await self.engine.generate(req)
        except ServingError as e:
            yield Refused(e)
            return
        yield Accepted(self.name)
        async for out in outputs:
            yield out

    async def load(self, record: AdapterRecord, pin: bool | None, pin_cap: int | None) -> tuple[str, int] | Refused:
        """Make `record` resident here (and pin or unpin it); (replica, slot), or Refused."""
        try:
            await self._hold(record)
            return self.name, await self.core.residency.load(record, pin, pin_cap)
        except ServingError as e:
            return Refused(e)

    async def _hold(self, record: AdapterRecord) -> None:
        _REQUESTED.set(record)  # Ray's cache calls the loader in this task, with the model id alone
        await self._load_adapter(str(record.identity))

    async def _load_adapter(self, model_id: str) -> _Resident:
        """The version into a device slot; `replica_deployment` wraps it in Ray's multiplexed cache."""
        record = _REQUESTED.get()
        assert str(record.identity) == model_id
        try:
            await self.core.residency.load(record, None)
        except NoFreeSlot:  # every slot busy: the host copy is read, the scheduler takes a slot when one frees
            pass
        return _Resident(self, record)

    def release_slot(self, record: AdapterRecord) -> None:
        """Ray dropped the version from its cache: free its slot (requests on it finish first). Any thread."""
        slots = self.core.runner.slots
        if not self._loop.is_closed():
            asyncio.run_coroutine_threadsafe(self.engine.call(lambda: slots.evict(record.identity)), self._loop)

    async def _sync_loop(self) -> None:
        while True:
            try:
                events = await self.state.report.remote(self._report())
                for seq, ident in events:
                    await self.core.residency.evict_identity(ident)
                    self._applied = seq
            except Exception:  # the state actor restarting: keep serving, report again later
                log.exception("replica %s could not report to the cluster state", self.name)
            await asyncio.sleep(SYNC_S)

    def _report(self) -> ReplicaReport:
        core = self.core
        counters = {name: core.metrics.total(name) for name in COUNTERS}
        host, device = core.host.stats, core.runner.slots.stats
        counters.update(loads_host=host.loads, loads_device=device.loads)
        return ReplicaReport(replica=self.name, pid=os.getpid(), applied=self._applied,
                             held=core.residency.held(), stats=self.engine.stats(), counters=counters)

    def check_health(self) -> None:
        """Ray's health check: a replica whose engine thread died is restarted."""
        if not self.engine.alive:
            raise RuntimeError(f"replica {self.name}: the engine has stopped")

    def __del__(self) -> None:
        self._sync.cancel()
        self.engine.shutdown(self._drain_timeout)


def replica_deployment(settings: ClusterSettings):
    """The Ray Serve deployment of `EngineReplica` for these settings (replicas, resources, cache size); bind
    it with `settings.for_replica()` and the cluster state actor."""
    from ray.serve.config import RequestRouterConfig

    class LoramuxEngine(EngineReplica):
        # Ray finds the method by the wrapped function's own name
        _load_adapter = serve.multiplexed(max_num_models_per_replica=settings.max_loras)(EngineReplica._load_adapter)

    resources = {"num_cpus": settings.replica_cpus, "num_gpus": settings.replica_gpus}
    options = {}
    if settings.routing == "affinity":
        options["request_router_config"] = RequestRouterConfig(
            request_router_class="server.cluster.router:AdapterAffinityRouter",
            request_router_kwargs={"spread_queue": settings.spread_queue, "balance_abs": settings.balance_abs,
                                   "balance_rel": settings.balance_rel})
    return serve.deployment(LoramuxEngine, name="LoramuxEngine", num_replicas=settings.replicas,
                            ray_actor_options=resources, max_ongoing_requests=settings.max_ongoing_requests,
                            health_check_period_s=settings.health_period_s, **options)
