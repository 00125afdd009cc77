"""Prometheus metrics, one registry per server instance (tests build several apps in one process).

Every series has one source: counters and histograms are updated where the event happens; gauges and the
residency counters are read from their owners (the scheduler, the host cache, the slot table) at scrape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from adapters_store.host_cache import HostStats
from server.lora.slots import SlotStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
STEP_KINDS = ("batched", "merged", "hybrid", "base")


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests_running = Gauge("loramux_requests_running", "Sequences in the running batch", registry=r)
        self.requests_waiting = Gauge("loramux_requests_waiting", "Sequences waiting to be scheduled", registry=r)
        self.kv_tokens_used = Gauge("loramux_kv_tokens_used", "KV-cache tokens held by sequences' blocks",
                                    registry=r)
        self.ttft = Histogram("loramux_time_to_first_token_seconds", "Arrival to first token", ["adapter"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("loramux_inter_token_latency_seconds", "Time between tokens of a sequence",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("loramux_e2e_latency_seconds", "Arrival to last token", ["adapter"],
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("loramux_queue_time_seconds", "Arrival to admission into the batch",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("loramux_requests", "Finished requests", ["adapter", "finish_reason"], registry=r)
        self.tokens = Counter("loramux_generated_tokens", "Generated tokens", ["adapter"], registry=r)
        self.prompt_tokens = Counter("loramux_prompt_tokens", "Prompt tokens prefilled", ["adapter"], registry=r)
        self.rejections = Counter("loramux_rejections", "Requests rejected before scheduling", ["reason"], registry=r)
        self.adapter_load_seconds = Histogram("loramux_adapter_load_seconds",
                                              "Adapter load latency: store -> host copy, host copy -> device slot",
                                              ["tier"], buckets=LATENCY_BUCKETS, registry=r)
        self.mode_switches = Counter("loramux_mode_switches", "Merged-weight swaps (merge, unmerge or switch)",
                                     registry=r)
        self.swap_seconds = Histogram("loramux_swap_seconds", "Time of one merged-weight swap",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.step_seconds = Counter("loramux_step_seconds", "Engine step time by execution kind", ["kind"],
                                    registry=r)
        self.steps = Counter("loramux_steps", "Engine steps by execution kind", ["kind"], registry=r)
        self.cancelled = Counter("loramux_cancelled", "Sequences cancelled (client gone or asked)", registry=r)
        self.engine_threads = Gauge("loramux_engine_threads", "CPU threads that ran the engine's last forward "
                                    "(0: not on CPU, or no step yet)", registry=r)
        self.compile_seconds = Gauge("loramux_compile_seconds", "Start-up time spent compiling the step "
                                     "(0: the step runs eagerly)", registry=r)
        self.preemptions = Counter("loramux_preemptions", "Sequences that gave their KV block back (recomputed)",
                                   registry=r)

    def watch(self, running: Callable[[], int], waiting: Callable[[], int], kv_used: Callable[[], int]) -> None:
        """The batch gauges read the scheduler's and the KV cache's counts at scrape time."""
        self.requests_running.set_function(running)
        self.requests_waiting.set_function(waiting)
        self.kv_tokens_used.set_function(kv_used)

    def watch_residency(self, host: Callable[[], HostStats], slots: Callable[[], SlotStats],
                        stored: Callable[[], Mapping[str, int]]) -> None:
        """stored: adapters in the store by kind (lora, dora, ia3, prompt, prefix)."""
        self.registry.register(_ResidencyCollector(host, slots, stored))

    def load_observer(self, tier: str) -> Callable[[float], None]:
        return self.adapter_load_seconds.labels(tier).observe

    def total(self, name: str) -> float:
        """Sum of a counter's samples over its labels (`name` without `_total`)."""
        return sum(s.value for m in self.registry.collect() if m.name == name
                   for s in m.samples if s.name == f"{name}_total")

    def step_seconds_by_kind(self) -> dict[str, float]:
        return {kind: self.registry.get_sample_value("loramux_step_seconds_total", {"kind": kind}) or 0.0
                for kind in STEP_KINDS}

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ResidencyCollector:
    """Loads, hits, evictions and resident adapters per tier, from the host cache and the slot table."""

    def __init__(self, host: Callable[[], HostStats], slots: Callable[[], SlotStats],
                 stored: Callable[[], Mapping[str, int]]):
        self._host, self._slots, self._stored = host, slots, stored

    def collect(self) -> Iterator[Metric]:
        host, slots = self._host(), self._slots()
        families = (
            ("loramux_adapter_loads", "Adapter loads into a tier", host.loads, slots.loads),
            ("loramux_adapter_evictions", "Adapter evictions from a tier", host.evictions, slots.evictions),
            ("loramux_adapter_residency_hits", "Adapter acquisitions by where found", host.hits, slots.hits),
        )
        for name, doc, on_host, on_device in families:
            family = CounterMetricFamily(name, doc, labels=["tier"])
            family.add_metric(["host"], on_host)
            family.add_metric(["device"], on_device)
            yield family
        resident = GaugeMetricFamily("loramux_adapters_resident", "Adapters resident per tier", labels=["tier"])
        resident.add_metric(["device"], slots.used)
        resident.add_metric(["host"], host.idle + host.leased)
        stored = self._stored()
        resident.add_metric(["disk"], sum(stored.values()))
        yield resident
        kinds = GaugeMetricFamily("loramux_adapters_stored", "Adapters in the store by kind", labels=["kind"])
        for kind, n in sorted(stored.items()):
            kinds.add_metric([kind], n)
        yield kinds
