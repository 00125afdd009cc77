"""Prometheus metrics, one registry per server instance (tests build several apps in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests_running = Gauge("loramux_requests_running", "Sequences in the running batch", registry=r)
        self.requests_waiting = Gauge("loramux_requests_waiting", "Sequences waiting to be scheduled", registry=r)
        self.kv_rows_used = Gauge("loramux_kv_rows_used", "KV-cache rows held by sequences", registry=r)
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
        self.adapter_loads = Counter("loramux_adapter_loads", "Adapter loads into a tier", ["tier"], registry=r)
        self.adapter_evictions = Counter("loramux_adapter_evictions", "Adapter evictions from a tier", ["tier"],
                                         registry=r)
        self.adapter_load_seconds = Histogram("loramux_adapter_load_seconds", "Adapter load latency", ["tier"],
                                              buckets=LATENCY_BUCKETS, registry=r)
        self.residency_hits = Counter("loramux_adapter_residency_hits", "Adapter acquisitions by where found",
                                      ["tier"], registry=r)
        self.adapters_resident = Gauge("loramux_adapters_resident", "Adapters resident per tier", ["tier"],
                                       registry=r)
        self.mode_switches = Counter("loramux_mode_switches", "Merged-weight swaps (merge, unmerge or switch)",
                                     registry=r)
        self.swap_seconds = Histogram("loramux_swap_seconds", "Time of one merged-weight swap",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.step_seconds = Counter("loramux_step_seconds", "Engine step time by execution kind", ["kind"],
                                    registry=r)
        self.steps = Counter("loramux_steps", "Engine steps by execution kind", ["kind"], registry=r)
        self.cancelled = Counter("loramux_cancelled", "Sequences cancelled (client gone or asked)", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
