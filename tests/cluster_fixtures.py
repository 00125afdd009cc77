"""A local Ray instance with a loramux cluster on it (2 engine replicas of one thread each), for the
cluster tests; Ray starts once per test session and stops at its end."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import ray
from http_fixtures import TEST_FLAGS, free_port

from server.cluster.launch import NAMESPACE, deploy, prepare, shutdown
from server.cluster.settings import ClusterSettings
from server.cluster.state import STATE_ACTOR, ReplicaReport

CLUSTER_FLAGS = TEST_FLAGS | {"replicas": 2, "replica_cpus": 1, "ray_cpus": 2, "max_loras": 4, "spread_queue": 2,
                              "health_period_s": 1.0}


class Cluster:
    def __init__(self, settings: ClusterSettings):
        self.settings = settings
        self.url = f"http://127.0.0.1:{settings.port}"

    def reports(self) -> list[ReplicaReport]:
        state = ray.get_actor(STATE_ACTOR, namespace=NAMESPACE)
        return ray.get(state.reports.remote())

    def wait_replicas(self, n: int, timeout: float = 120, exclude: frozenset[str] = frozenset()) -> list[str]:
        """Wait until `n` replicas (none of `exclude`) report; returns their ids."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            names = [r.replica for r in self.reports() if r.replica not in exclude]
            if len(names) >= n:
                return names
            time.sleep(0.2)
        raise TimeoutError(f"{n} replicas did not report within {timeout} s (have {names})")

    def client(self, **headers) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, headers=headers)


@contextmanager
def local_cluster(model_dir: Path, adapters_dir: Path, **overrides) -> Iterator[Cluster]:
    settings = ClusterSettings(model=str(model_dir), adapters_dir=adapters_dir, host="127.0.0.1", port=free_port(),
                               **(CLUSTER_FLAGS | overrides))
    ray.init(num_cpus=settings.ray_cpus, namespace=NAMESPACE, include_dashboard=False,
             log_to_driver=False)  # the replicas' logs stay in Ray's session directory, out of the test output
    settings = prepare(settings)
    deploy(settings)
    cluster = Cluster(settings)
    try:
        cluster.wait_replicas(settings.replicas)
        yield cluster
    finally:
        shutdown()
        ray.shutdown()
