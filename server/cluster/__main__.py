"""`loramux-cluster`: the server's flags plus --replicas and friends; runs until interrupted."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence

import ray

from server.__main__ import build_parser, configure_logging, parse_settings
from server.app import load_keys
from server.cluster.launch import deploy, prepare, shutdown, start_ray
from server.cluster.settings import ClusterSettings

log = logging.getLogger("loramux.cluster")


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser(ClusterSettings, prog="loramux-cluster",
                          description="loramux on Ray Serve: an ingress with the same HTTP API in front of "
                                      "engine replicas that share one adapter store.")
    settings = parse_settings(argv, parser, ClusterSettings)
    configure_logging(settings.log_level)
    load_keys(settings)  # reads (or, with --create-keys-file, creates) the keys file before anything starts
    start_ray(settings)
    settings = prepare(settings)
    log.info("starting %d engine replicas (%.3g CPUs each) behind http://%s:%d", settings.replicas,
             settings.replica_cpus, settings.host, settings.port)
    deploy(settings)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    log.info("cluster up on http://%s:%d (Ctrl-C or SIGTERM stops it)", settings.host, settings.port)
    stop.wait()
    log.info("stopping: in-flight requests finish on their replicas (Ray's graceful shutdown)")
    deleting = threading.Thread(target=shutdown, daemon=True)  # Ray's own processes may have had the signal too
    deleting.start()
    deleting.join(timeout=settings.drain_timeout + 10)
    ray.shutdown()


if __name__ == "__main__":
    main()
