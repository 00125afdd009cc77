"""`loramux-server` flags and LORAMUX_* variables become one Settings object."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.__main__ import build_parser, parse_settings
from server.cluster.settings import ClusterSettings


def test_cli_flags_and_environment(monkeypatch):
    defaults = parse_settings([])
    assert (defaults.model, defaults.host, defaults.port, defaults.adapters_dir) == (
        "default", "127.0.0.1", 8000, Path(".loramux/adapters"))
    assert (defaults.max_loras, defaults.max_cpu_loras, defaults.max_rank, defaults.api_keys_file) == (16, 64, 64, None)
    monkeypatch.setenv("LORAMUX_MAX_LORAS", "3")
    monkeypatch.setenv("LORAMUX_PRELOAD", "x, y")
    monkeypatch.setenv("LORAMUX_MODE", "merged")
    s = parse_settings([])
    assert (s.max_loras, s.preload, s.mode) == (3, ["x", "y"], "merged")
    s = parse_settings(["--max-loras", "5", "--preload", "a,b", "c", "--api-keys-file", "keys.yaml", "--dtype",
                        "bfloat16", "--served-model-name", "base", "--seed-adapters", "adapters_store/demo",
                        "--max-upload-mb", "2"])
    assert (s.max_loras, s.preload, s.api_keys_file, s.dtype, s.served_model_name) == (
        5, ["a", "b", "c"], Path("keys.yaml"), "bfloat16", "base")
    assert s.seed_adapters == Path("adapters_store/demo") and s.max_upload_bytes == 2 * 2**20
    for bad in (["--mode", "fast"], ["--port", "-1"], ["--max-loras", "many"]):
        with pytest.raises(SystemExit):
            parse_settings(bad)
    monkeypatch.setenv("LORAMUX_CACHE_DIR", "/tmp/loramux-cache")
    assert parse_settings([]).cache_dir == Path("/tmp/loramux-cache")
    monkeypatch.delenv("LORAMUX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "/tmp/xdg")
    assert parse_settings([]).cache_dir == Path("/tmp/xdg/loramux")


def test_cluster_flags_extend_the_servers():
    parser = build_parser(ClusterSettings, prog="loramux-cluster")
    s = parse_settings(["--replicas", "3", "--routing", "random", "--replica-cpus", "2", "--max-loras", "8"], parser,
                       ClusterSettings)
    assert (s.replicas, s.routing, s.replica_cpus, s.max_loras, s.spread_queue) == (3, "random", 2.0, 8, 8)
    assert s.threads is None and s.for_replica().threads == 2  # a replica's engine: its own CPUs, not every core
    assert ClusterSettings(threads=1, replica_cpus=4).for_replica().threads == 1
    s = parse_settings(["--balance-abs", "0", "--balance-rel", "2"], parser, ClusterSettings)
    defaults = ClusterSettings()
    assert (s.balance_abs, s.balance_rel, defaults.balance_abs, defaults.balance_rel) == (0, 2, 4, 1.5)
    for bad in (["--replicas", "0"], ["--routing", "nearest"], ["--spread-queue", "0"], ["--balance-rel", "0.5"],
                ["--balance-abs", "-1"]):
        with pytest.raises(SystemExit):
            parse_settings(bad, build_parser(ClusterSettings), ClusterSettings)


def test_ray_serve_logs_at_the_log_level_with_access_lines_at_info_only():
    from server.cluster.launch import serve_logging

    quiet, chatty = serve_logging(ClusterSettings(log_level="warning")), serve_logging(ClusterSettings())
    assert (quiet.log_level, quiet.enable_access_log, chatty.log_level, chatty.enable_access_log) == (
        "WARNING", False, "INFO", True)
