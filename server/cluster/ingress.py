"""The cluster's ingress: the single server's FastAPI app (same routers, keys, tenants and limits) whose
services forward generation to the engine replicas and write the shared adapter store.

It runs as a Ray Serve deployment (``serve.ingress``, built late so that its lifespan gets the replicas'
handle); Ray's HTTP proxy in front of it streams its SSE responses.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from ray import serve

from adapters_store.store import AdapterStore
from server.api.keys import KeyTable
from server.api.logging import HttpMetrics
from server.app import create_app, preload, seed_adapters
from server.cluster.remote import ClusterResidency, RemoteEngine, ReplicaView
from server.cluster.settings import ClusterSettings
from server.metrics import Metrics
from server.model_loader import load_tokenizer
from server.services import Services, adapter_parser, tenant_policy, validation_limits

log = logging.getLogger("loramux.cluster")
FIRST_REPORT_S = 900.0  # how long the ingress waits for a replica to load its model


@asynccontextmanager
async def cluster_lifespan(app: FastAPI, settings: ClusterSettings, keys: KeyTable | None, engines,
                           state) -> AsyncIterator[None]:
    view = ReplicaView(state)
    facts = await view.facts(FIRST_REPORT_S)
    loaded = await asyncio.to_thread(load_tokenizer, settings.model, settings.cache_dir)
    limits = validation_limits(settings)
    parse = adapter_parser(facts.shapes, limits, facts.geometry)
    store = await asyncio.to_thread(AdapterStore, settings.adapters_dir, parse)
    affinity = settings.routing == "affinity"
    engine = RemoteEngine(engines, view, facts.limits, affinity)
    metrics = Metrics()  # the batch gauges: the replicas' sums
    metrics.watch(lambda: engine.stats().running, lambda: engine.stats().waiting,
                  lambda: engine.stats().kv_tokens_used)
    metrics.registry.register(ReplicaCollector(view))
    services = Services(settings=settings, model=loaded, served_model_name=settings.served_model_name or loaded.name,
                        limits=limits, store=store, engine=engine,
                        residency=ClusterResidency(engines, view, affinity), metrics=metrics, keys=keys,
                        tenants=tenant_policy(settings, keys), http_metrics=HttpMetrics(metrics.registry),
                        started_at=time.time())
    app.state.services = services
    view.start()
    if settings.seed_adapters is not None:
        await asyncio.to_thread(seed_adapters, store, settings.seed_adapters, limits)
    await preload(services, settings.preload)
    log.info("cluster ingress ready: %s over %d replicas, %d adapters in %s", services.served_model_name,
             len(view.reports), len(store.list()), settings.adapters_dir)
    try:
        yield
    finally:
        view.stop()


class ReplicaCollector:
    """Per-replica series (label `replica`) and their sums, from the replicas' latest reports."""

    def __init__(self, view: ReplicaView):
        self.view = view

    def collect(self) -> Iterator[Metric]:
        reports = self.view.reports
        gauges = {"running": ("loramux_replica_requests_running", "Sequences running on a replica"),
                  "waiting": ("loramux_replica_requests_waiting", "Sequences waiting on a replica")}
        for field, (name, doc) in gauges.items():
            family = GaugeMetricFamily(name, doc, labels=["replica"])
            for r in reports:
                family.add_metric([r.replica], getattr(r.stats, field))
            yield family
        resident = GaugeMetricFamily("loramux_replica_adapters_resident", "Adapter versions in a replica's "
                                     "device slots", labels=["replica"])
        for r in reports:
            resident.add_metric([r.replica], sum(i.tier == "device" for i in r.held.values()))
        yield resident
        counters = {"loramux_generated_tokens": "Generated tokens", "loramux_requests": "Finished requests",
                    "loramux_prompt_tokens": "Prompt tokens prefilled", "loads_device": "Adapter loads into slots",
                    "loads_host": "Adapter reads from the store into host memory"}
        for key, doc in counters.items():
            stem = key.removeprefix("loramux_")
            family = CounterMetricFamily(f"loramux_replica_{stem}", f"{doc}, per replica", labels=["replica"])
            total = CounterMetricFamily(f"loramux_cluster_{stem}", f"{doc}, all replicas")
            for r in reports:
                family.add_metric([r.replica], r.counters.get(key, 0.0))
            total.add_metric([], sum(r.counters.get(key, 0.0) for r in reports))
            yield family
            yield total


def ingress_deployment(settings: ClusterSettings):
    """The ingress deployment; bind it with the replicas' deployment and the cluster state actor."""

    @serve.ingress()
    class LoramuxIngress:
        async def __init__(self, engines, state) -> None:
            self._engines, self._state = engines, state

        def __serve_build_asgi_app__(self):
            return create_app(settings, partial(cluster_lifespan, engines=self._engines, state=self._state))

    return serve.deployment(LoramuxIngress, name="LoramuxIngress", num_replicas=1,
                            ray_actor_options={"num_cpus": 0}, max_ongoing_requests=settings.max_connections)
