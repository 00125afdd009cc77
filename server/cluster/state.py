"""The cluster's shared state, one Ray actor: replicas' reports in, evictions out.

Each replica reports every ``SYNC_S`` seconds what it holds (per adapter version), its engine's stats and
counters, and the last eviction it applied; the answer is the evictions issued since. The ingress issues an
eviction (an overwrite, an evict or a purge) and waits until every live replica has applied it. A replica
that has not reported for ``STALE_S`` seconds is dead to the cluster (Ray restarts it; the new process
starts empty, with nothing to evict).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from adapters_store.format import ModuleShape
from adapters_store.identity import AdapterIdentity
from adapters_store.prompt import ModelGeometry
from server.engine_types import EngineStats
from server.residency import ResidencyInfo
from server.validation import RequestLimits

SYNC_S = 0.25
STALE_S = 3.0
MAX_EVENTS = 10_000  # evictions kept for replicas that fall behind (a replica that far behind re-syncs empty)
STATE_ACTOR = "loramux-cluster-state"


@dataclass(frozen=True)
class ReplicaReport:
    replica: str  # Ray Serve's replica id
    pid: int
    applied: int  # the last eviction applied
    held: dict[AdapterIdentity, ResidencyInfo]  # versions in its host or device memory
    stats: EngineStats
    counters: dict[str, float]  # totals since the replica started: requests, tokens, adapter loads
    at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class ModelFacts:
    """What the ingress needs of the base model, which it does not load: from the first replica."""

    limits: RequestLimits
    shapes: dict[str, ModuleShape]  # the base model's projections (what uploads are validated against)
    geometry: ModelGeometry  # its embedding width and KV shape (what prompt and prefix tuning must fit)


class ClusterState:
    """Created once per cluster as a named Ray actor (``STATE_ACTOR``); its methods run one at a time."""

    def __init__(self) -> None:
        self._reports: dict[str, ReplicaReport] = {}
        self._events: list[tuple[int, AdapterIdentity]] = []
        # numbered from the clock: a restarted actor (Ray restarts it) numbers above what replicas applied before
        self._seq = time.time_ns()
        self._facts: ModelFacts | None = None

    def register(self, facts: ModelFacts) -> int:
        """A replica starts: returns the last eviction issued (it holds nothing older)."""
        self._facts = self._facts or facts
        return self._seq

    def facts(self) -> ModelFacts | None:
        return self._facts

    def report(self, report: ReplicaReport) -> list[tuple[int, AdapterIdentity]]:
        """Record a replica's report; returns the evictions it has not applied yet, oldest first."""
        self._reports[report.replica] = report
        if self._events and report.applied < self._events[0][0] - 1:
            return list(self._events)
        return [e for e in self._events if e[0] > report.applied]

    def evict(self, ident: AdapterIdentity) -> int:
        """Issue an eviction of `ident` on every replica; returns its sequence number."""
        self._seq += 1
        self._events.append((self._seq, ident))
        del self._events[:-MAX_EVENTS]
        return self._seq

    def behind(self, seq: int) -> list[str]:
        """Live replicas that have not applied eviction `seq` yet."""
        return [r.replica for r in self.reports() if r.applied < seq]

    def reports(self) -> list[ReplicaReport]:
        """The latest report of every live replica, by replica id (dead ones are dropped)."""
        now = time.time()
        for name in [n for n, r in self._reports.items() if now - r.at > STALE_S]:
            del self._reports[name]
        return sorted(self._reports.values(), key=lambda r: r.replica)
