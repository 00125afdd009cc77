"""Starting a cluster: Ray (local or joined), the cluster state actor, the replicas and the ingress."""

from __future__ import annotations

import logging

import ray
from ray import serve
from ray.serve.schema import LoggingConfig

from server.cluster.ingress import ingress_deployment
from server.cluster.replica import replica_deployment
from server.cluster.settings import ClusterSettings
from server.cluster.state import STATE_ACTOR, ClusterState
from server.model_loader import resolve_source

log = logging.getLogger("loramux.cluster")
APP_NAME = "loramux"
NAMESPACE = "loramux"


def prepare(settings: ClusterSettings) -> ClusterSettings:
    """Settings every process reads alike: absolute paths, and the model resolved (a GGUF converted) once
    here rather than by every replica at the same time."""
    source, name = resolve_source(settings.model, settings.cache_dir)
    return settings.model_copy(update={
        "model": str(source.resolve()), "served_model_name": settings.served_model_name or name,
        "adapters_dir": settings.adapters_dir.resolve(), "cache_dir": settings.cache_dir.resolve(),
        "create_keys_file": False,
        "api_keys_file": None if settings.api_keys_file is None else settings.api_keys_file.resolve(),
    })


def start_ray(settings: ClusterSettings) -> None:
    if ray.is_initialized():
        return
    if settings.ray_address:
        ray.init(address=settings.ray_address, namespace=NAMESPACE)
    else:
        ray.init(num_cpus=settings.ray_cpus, namespace=NAMESPACE, include_dashboard=False)


def deploy(settings: ClusterSettings, blocking: bool = False):
    """Deploy the app on the running Ray instance; returns the ingress handle once every replica is up.

    Ray's HTTP proxy listens on --host/--port; `settings` should come from `prepare`.
    """
    logging_config = serve_logging(settings)
    serve.start(http_options={"host": settings.host, "port": settings.port}, logging_config=logging_config)
    state = ray.remote(ClusterState).options(name=STATE_ACTOR, namespace=NAMESPACE, get_if_exists=True,
                                             num_cpus=0, max_restarts=-1).remote()
    engines = replica_deployment(settings).bind(settings.for_replica(), state)
    app = ingress_deployment(settings).bind(engines, state)
    return serve.run(app, name=APP_NAME, route_prefix="/", blocking=blocking, logging_config=logging_config)


def serve_logging(settings: ClusterSettings) -> LoggingConfig:
    """Ray Serve's components log at --log-level; one access line per request only at info and debug (as
    uvicorn's access log, which logs at info, in the single server)."""
    verbose = settings.log_level in ("info", "debug")
    return LoggingConfig(log_level=settings.log_level.upper(), enable_access_log=verbose)


def shutdown() -> None:
    serve.delete(APP_NAME)
    try:
        ray.kill(ray.get_actor(STATE_ACTOR, namespace=NAMESPACE))
    except ValueError:
        pass
