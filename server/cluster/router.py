"""Adapter-affinity routing of requests to engine replicas (a Ray Serve request router).

For a request whose multiplexed model id names an adapter version:

1. replicas that hold it (Ray's model ids on each replica, plus the replicas this router sent it to in the
   last ``memory_s`` seconds, which Ray learns of only after the replica's load) come first; Ray's router
   then takes the one with the shortest queue among them;
2. when every holder already runs ``spread_queue`` or more of that adapter's requests, the other replicas
   join the first rank, so the shortest queue overall takes it and the adapter spreads to a second replica
   (Ray's own multiplex routing keeps a hot adapter on one replica while it accepts requests);
3. an adapter no replica holds goes to the replicas holding the fewest adapters, then to the rest;
4. but when the least loaded holder runs more than ``balance_abs`` requests beyond the least loaded replica,
   and more than ``balance_rel`` times as many, every replica competes on queue length (the load guard of
   SGLang's cache-aware router): affinity saves adapter loads, and is not worth a replica left idle while
   the hot adapters' holder queues.

A replica's load here is the adapter requests this router has in flight on it.

Requests without a model id (the base model, compositions) go to the shortest queue.

Ray chooses for several pending requests at once, before any of them is routed: a request whose first rank
is one replica counts on that replica from the choice on (provisionally, until Ray reports where it went),
so that a burst for a new adapter does not all follow the first choice.
"""

from __future__ import annotations

import time
from collections import defaultdict

from ray.serve.request_router import FIFOMixin, MultiplexMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

CHOSEN_S = 30.0  # a choice Ray never routed (the request went away) stops counting after this


class AdapterAffinityRouter(FIFOMixin, MultiplexMixin, RequestRouter):
    def initialize_state(self, spread_queue: int = 8, memory_s: float = 2.0, balance_abs: int = 4,
                         balance_rel: float = 1.5) -> None:
        self.spread_queue = spread_queue
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self.memory_s = memory_s
        self._inflight: dict[ReplicaID, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._owner: dict[str, tuple[ReplicaID, str]] = {}  # internal request id -> (replica, model id)
        self._sent: dict[str, dict[ReplicaID, float]] = defaultdict(dict)  # model id -> replica -> last send
        self._chosen: dict[str, tuple[ReplicaID, str, float]] = {}  # request id -> (replica, model id, when)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        model_id = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if not model_id or len(candidate_replicas) < 2:
            return [candidate_replicas]
        ranks = self.rank(candidate_replicas, model_id)
        if len(ranks[0]) == 1:
            self.chosen(pending_request.metadata.internal_request_id, ranks[0][0].replica_id, model_id)
        return ranks

    def chosen(self, request_id: str, replica_id: ReplicaID, model_id: str) -> None:
        """Count a request on the replica it will go to, before Ray routes it (replacing an earlier choice)."""
        now = time.monotonic()
        for stale in [k for k, (_, _, t) in self._chosen.items() if now - t > CHOSEN_S]:  # never routed
            self._unchoose(stale)
        self._unchoose(request_id)
        self._chosen[request_id] = (replica_id, model_id, now)
        self._inflight[replica_id][model_id] += 1
        self._sent[model_id][replica_id] = now

    def _unchoose(self, request_id: str) -> None:
        choice = self._chosen.pop(request_id, None)
        if choice is not None:
            self._done(choice[0], choice[1])

    def rank(self, replicas: list[RunningReplica], model_id: str) -> list[list[RunningReplica]]:
        holders = [r for r in replicas if self._holds(r, model_id)]
        others = [r for r in replicas if r not in holders]
        if not holders:
            fewest = min(len(r.multiplexed_model_ids) for r in others)
            least = [r for r in others if len(r.multiplexed_model_ids) == fewest]
            return [least, [r for r in others if r not in least]] if len(least) < len(others) else [least]
        if not others:
            return [holders]
        if min(self._inflight[r.replica_id][model_id] for r in holders) >= self.spread_queue or self._unbalanced(
                holders, replicas):
            return [holders + others]
        return [holders, others]

    def _load(self, replica: RunningReplica) -> int:
        return sum(self._inflight[replica.replica_id].values())

    def _unbalanced(self, holders: list[RunningReplica], replicas: list[RunningReplica]) -> bool:
        busy, idle = min(map(self._load, holders)), min(map(self._load, replicas))
        return busy - idle > self.balance_abs and busy > self.balance_rel * idle

    def _holds(self, replica: RunningReplica, model_id: str) -> bool:
        if model_id in replica.multiplexed_model_ids:
            return True
        sent = self._sent[model_id].get(replica.replica_id)
        return sent is not None and time.monotonic() - sent < self.memory_s

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        model_id = pending_request.metadata.multiplexed_model_id
        if not model_id:
            return
        self._unchoose(pending_request.metadata.internal_request_id)
        self._inflight[replica_id][model_id] += 1
        self._owner[pending_request.metadata.internal_request_id] = (replica_id, model_id)
        self._sent[model_id][replica_id] = time.monotonic()

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        owner = self._owner.pop(internal_request_id, None)
        if owner is not None:
            self._done(*owner)

    def _done(self, replica_id: ReplicaID, model_id: str) -> None:
        counts = self._inflight[replica_id]
        counts[model_id] -= 1
        if counts[model_id] <= 0:
            del counts[model_id]

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._inflight.pop(replica_id, None)
        for sent in self._sent.values():
            sent.pop(replica_id, None)
        for request_id in [k for k, (rid, _, _) in self._chosen.items() if rid == replica_id]:
            del self._chosen[request_id]
