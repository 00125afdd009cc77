"""The adapter-affinity routing policy (server/cluster/router.py) on its own: which replicas it ranks first.

Replicas and requests are plain records with the two fields the policy reads; the policy through Ray itself
is tested in test_cluster.py."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace

from server.cluster.router import AdapterAffinityRouter


@dataclass(eq=False)
class Replica:
    replica_id: str
    multiplexed_model_ids: set[str] = field(default_factory=set)


def router(spread_queue: int = 2, **balance) -> AdapterAffinityRouter:
    r = object.__new__(AdapterAffinityRouter)  # the policy's state only: Ray builds the rest
    r.initialize_state(spread_queue=spread_queue, **balance)
    return r


def pending(model_id: str, request_id: str) -> SimpleNamespace:
    return SimpleNamespace(metadata=SimpleNamespace(multiplexed_model_id=model_id, internal_request_id=request_id))


def routed(r: AdapterAffinityRouter, replica: Replica, model_id: str, request_id: str) -> None:
    r.on_request_routed(pending(model_id, request_id), replica.replica_id, None)


def ids(ranks: list[list[Replica]]) -> list[list[str]]:
    return [[x.replica_id for x in rank] for rank in ranks]


def test_holders_first_then_the_rest():
    a, b, c = Replica("a", {"x"}), Replica("b"), Replica("c", {"x", "y"})
    assert ids(router().rank([a, b, c], "x")) == [["a", "c"], ["b"]]


def test_an_adapter_nobody_holds_goes_to_the_replicas_with_fewest():
    a, b, c = Replica("a", {"x", "y"}), Replica("b", {"z"}), Replica("c", {"w"})
    assert ids(router().rank([a, b, c], "new")) == [["b", "c"], ["a"]]


def test_a_replica_just_sent_an_adapter_holds_it_before_ray_knows():
    r, a, b = router(), Replica("a"), Replica("b")
    routed(r, b, "x", "q1")
    assert ids(r.rank([a, b], "x")) == [["b"], ["a"]]


def test_a_hot_adapter_spreads_once_every_holder_runs_spread_queue_of_it():
    r, a, b = router(spread_queue=2), Replica("a", {"x"}), Replica("b")
    routed(r, a, "x", "q1")
    assert ids(r.rank([a, b], "x")) == [["a"], ["b"]]
    routed(r, a, "x", "q2")
    assert ids(r.rank([a, b], "x")) == [["a", "b"]]  # every replica competes on queue length
    r.on_request_completed(a.replica_id, "q1")
    assert ids(r.rank([a, b], "x")) == [["a"], ["b"]]
    routed(r, a, "y", "q3")  # another adapter's requests do not count
    assert ids(r.rank([a, b], "x")) == [["a"], ["b"]]


def test_a_holder_loaded_beyond_both_balance_bounds_loses_its_priority():
    r, a, b = router(spread_queue=100, balance_abs=2, balance_rel=1.5), Replica("a", {"x"}), Replica("b", {"z"})
    for i in range(2):
        routed(r, a, "w", f"w{i}")
    assert ids(r.rank([a, b], "x")) == [["a"], ["b"]]  # 2 beyond b's 0: not more than balance_abs
    routed(r, a, "w", "w2")
    assert ids(r.rank([a, b], "x")) == [["a", "b"]]  # 3 beyond: the shorter queue takes it
    routed(r, b, "z", "z0")
    assert ids(r.rank([a, b], "x")) == [["a"], ["b"]]  # 3 against 1: within balance_abs again
    r = router(spread_queue=100, balance_abs=0, balance_rel=1.5)
    for i, replica in enumerate([a, a, a, b, b]):
        routed(r, replica, "w", f"q{i}")
    assert ids(r.rank([a, b], "x")) == [["a"], ["b"]]  # 3 against 2: not more than 1.5 times
    routed(r, a, "w", "q5")
    assert ids(r.rank([a, b], "x")) == [["a", "b"]]  # 4 against 2
    r.on_request_completed(a.replica_id, "q5")
    assert ids(r.rank([a, b], "x")) == [["a"], ["b"]]  # completions count down


def test_a_burst_counts_its_choices_before_ray_routes_any():
    """Ray chooses for several pending requests before it routes the first: each single-replica choice counts."""
    r, a, b = router(spread_queue=2), Replica("a", {"m1"}), Replica("b", {"m1", "m2"})

    def choose(request_id: str) -> list[list[str]]:
        return ids(asyncio.run(r.choose_replicas([a, b], pending("x", request_id))))

    assert choose("q1") == [["a"], ["b"]]  # nobody holds x: the replica with fewest adapters
    assert choose("q2") == [["a"], ["b"]]  # a holds it now (chosen), one request of it
    assert choose("q3") == [["a", "b"]]  # two chosen on a: it spreads
    routed(r, a, "x", "q1")  # Ray reports q1's replica: its choice is replaced, not added
    routed(r, a, "x", "q2")
    assert choose("q4") == [["a", "b"]]
    r.on_request_completed(a.replica_id, "q1")
    r.on_request_completed(a.replica_id, "q2")
    assert choose("q5") == [["a"], ["b"]]
