"""`loramux-cluster` flags: every `loramux-server` flag, plus the replicas and how requests reach them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from server.settings import Settings


class ClusterSettings(Settings):
    replicas: int = Field(2, ge=1, description="engine replicas, each with its own copy of the base model")
    replica_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves for each replica (its engine threads "
                                                       "default to this many)")
    replica_gpus: float = Field(0.0, ge=0, description="GPUs Ray reserves for each replica")
    ray_address: str | None = Field(None, description="join this Ray cluster (default: start a local instance)")
    ray_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray instance (default: every core)")
    routing: Literal["affinity", "random"] = Field(
        "affinity", description="affinity: to replicas that hold the adapter (server/cluster/router.py); random: "
                                "Ray's default router, blind to adapters (two random replicas, the shorter queue)")
    spread_queue: int = Field(8, ge=1, description="requests of one adapter in flight on each replica that holds "
                                                   "it before a replica that does not may take the next")
    balance_abs: int = Field(4, ge=0, description="an adapter's holders lose their priority when the least "
                             "loaded of them runs more than this many requests beyond the least loaded replica ...")
    balance_rel: float = Field(1.5, ge=1, description="... and more than this many times as many")
    max_ongoing_requests: int = Field(256, ge=1, description="requests in flight on one replica before Ray "
                                                             "queues the next in the ingress")
    health_period_s: float = Field(10.0, gt=0, description="seconds between Ray's health checks of a replica")

    def for_replica(self) -> ClusterSettings:
        """A replica's settings: its engine threads are --threads, else the CPUs reserved for it (not every
        core of the machine, which the other replicas share)."""
        return self.model_copy(update={"threads": self.threads or max(1, int(self.replica_cpus))})
