"""Hostile requests at the HTTP layer: nothing is read before authentication, every body and list is capped,
slow clients are cut, telemetry is private; a single local user (open mode) is bounded only by the queue."""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest
import yaml
from hostile_fixtures import Hostile, start_hostile
from http_fixtures import ACME, GLOBEX, OPS, make_settings, thread_server

from server.settings import Settings


@pytest.fixture(scope="module")
def hostile(tiny_model_dir, tiny_adapter_dirs, tmp_path_factory):
    h = start_hostile(tiny_model_dir, tiny_adapter_dirs, tmp_path_factory.mktemp("hostile-http"))
    yield h
    h.server.stop()


def _raw(url: str, head: str, body: bytes = b"", wait: float = 10.0) -> tuple[str, float]:
    """Send a request head and (part of) a body over a socket; returns (the response's first line, seconds)."""
    host, port = url.removeprefix("http://").split(":")
    start = time.perf_counter()
    with socket.create_connection((host, int(port)), timeout=wait) as s:
        s.sendall(head.encode() + body)
        reply = s.recv(4096).decode(errors="replace")
    return reply.split("\r\n", 1)[0], time.perf_counter() - start


def test_an_anonymous_body_is_never_read(hostile: Hostile):
    """200 MB declared, 1 KB sent: the 401 comes at once, from the headers alone (nothing is parsed)."""
    head = ("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 200000000\r\n\r\n")
    status, took = _raw(hostile.server.url, head, b'{"model": "' + b"x" * 1000)
    assert status.startswith("HTTP/1.1 401") and took < 2
    with hostile.client(ACME) as a:  # a valid key with a body over --max-body-kb: 413 before it is read
        big = b"{" + b" " * 100_000 + b"}"
        r = a.post("/v1/completions", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "--max-body-kb" in r.json()["error"]["message"]
    hostile.assert_unharmed()


@pytest.mark.parametrize("body", [
    {"prompt": "x", "stop_token_ids": list(range(5000))},
    {"prompt": ["x"] * 500},
    {"prompt": "x", "stop": ["s"] * 100},
    {"prompt": "x", "user": "u" * 5000},
], ids=["stop_token_ids", "prompt_list", "stop_list", "user"])
def test_lists_and_strings_are_capped(hostile: Hostile, body: dict):
    with hostile.client(ACME) as a:
        r = a.post("/v1/completions", json={"model": "g1", "max_tokens": 2} | body)
    assert r.status_code == 422, r.text


def test_chat_messages_are_capped(hostile: Hostile):
    with hostile.client(ACME) as a:
        r = a.post("/v1/chat/completions", json={"model": "x", "messages": [{"role": "user", "content": "hi"}] * 2000})
    assert r.status_code in (413, 422), r.text


def test_a_slow_client_is_cut(hostile: Hostile):
    """Headers and half a body, then silence: 408 after --read-timeout (1 s here)."""
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ACME}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n")
    status, took = _raw(hostile.server.url, head, b'{"model": ')
    assert status.startswith("HTTP/1.1 408") and 0.9 < took < 5
    hostile.assert_unharmed()


def test_metrics_are_for_admins_only(hostile: Hostile):
    with hostile.client(ACME) as a, hostile.client(OPS) as ops:
        r = a.get("/metrics")
        assert r.status_code == 403 and "g1" not in r.text and "globex" not in r.text
        assert ops.get("/metrics").status_code == 200 and 'adapter="globex/g1"' in ops.get("/metrics").text


def test_another_tenants_adapter_is_never_named(hostile: Hostile):
    """Use, get, load, evict and delete of globex's adapter by acme: 404s that name only what acme sent."""
    with hostile.client(ACME) as a:
        answers = [a.post("/v1/completions", json={"model": "g1", "prompt": "x"}), a.get("/v1/adapters/g1"),
                   a.post("/v1/adapters/g1/load", params={"pin": "true"}), a.delete("/v1/adapters/g1"),
                   a.delete("/v1/adapters/g1", params={"purge": "true"})]
        listed = a.get("/v1/adapters").json()["data"] + a.get("/v1/models").json()["data"]
    assert [r.status_code for r in answers] == [404] * 5
    assert all("globex" not in r.text for r in answers) and all(x.get("namespace") != "globex" for x in listed)
    hostile.assert_unharmed()


def test_open_mode_is_one_user_bounded_by_the_queue(tiny_model_dir, tmp_path):
    """No keys file: a local batch job's 96 concurrent requests are all served (the per-tenant limit of 4
    concurrent requests applies to tenants with keys only)."""
    settings = make_settings(tiny_model_dir, tmp_path / "store", max_concurrent_per_tenant=4, max_waiting=256)
    with thread_server(settings) as srv:
        base = srv.services.served_model_name
        body = {"model": base, "prompt": "Batch job", "max_tokens": 4, "temperature": 0}

        async def burst():
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
                return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(96)))

        assert [r.status_code for r in asyncio.run(burst())] == [200] * 96


def test_no_open_server_off_loopback(tmp_path):
    with pytest.raises(ValueError, match="--allow-open"):
        Settings(host="0.0.0.0")
    assert Settings(host="0.0.0.0", allow_open=True).allow_open
    assert Settings(host="0.0.0.0", api_keys_file=tmp_path / "k.yaml").host == "0.0.0.0"
    assert Settings(host="::1").host == "::1"


def test_create_keys_file(tiny_model_dir, tmp_path):
    """--create-keys-file writes one admin key (mode 0600) once; the key works, no key does not."""
    keys = tmp_path / "keys.yaml"
    settings = make_settings(tiny_model_dir, tmp_path / "store", api_keys_file=keys, create_keys_file=True)
    with thread_server(settings) as srv:
        assert keys.stat().st_mode & 0o777 == 0o600
        key = next(iter(yaml.safe_load(keys.read_text())["keys"]))
        assert httpx.get(f"{srv.url}/v1/models").status_code == 401
        assert httpx.get(f"{srv.url}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert httpx.get(f"{srv.url}/metrics", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert GLOBEX not in keys.read_text()
