"""The server as a process: SIGTERM drains in-flight requests, restarts keep adapters, SIGKILL mid-upload is safe.

One scenario over three server processes on the same store (each start costs seconds of imports):
start with --seed-adapters/--preload, upload, SIGTERM during a streamed request -> restart, the adapters are
served, SIGKILL in the middle of an upload -> restart, the store is consistent.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time

import httpx
import pytest
from http_fixtures import ProcessServer, store_listing, upload

pytestmark = pytest.mark.slow
PROMPT = "After the restart"


def _complete(url: str, model: str) -> str:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _adapters(url: str) -> dict[str, dict]:
    return {a["id"]: a for a in httpx.get(f"{url}/v1/adapters", timeout=60).json()["data"]}


def _multipart(adapter_dir, adapter_id: str) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://x/v1/adapters", data={"id": adapter_id}, files={
        "config": ("adapter_config.json", (adapter_dir / "adapter_config.json").read_bytes()),
        "weights": ("adapter_model.safetensors", (adapter_dir / "adapter_model.safetensors").read_bytes()),
    })
    return request.read(), request.headers["content-type"]


def _sigterm_during_stream(server: ProcessServer) -> list[dict]:
    """SIGTERM once a 200-token stream has started; returns the chunks the client received."""
    chunks: list[dict] = []
    started, done = threading.Event(), threading.Event()

    def stream() -> None:
        body = {"model": "persist", "prompt": PROMPT, "max_tokens": 200, "temperature": 0, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunks.append(json.loads(line.removeprefix("data: ")))
                    started.set()
                elif line == "data: [DONE]":
                    done.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(30)
    server.signal(signal.SIGTERM)
    reader.join(60)
    assert done.is_set(), "the in-flight stream was cut by SIGTERM"
    assert server.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
    return chunks


def _sigkill_mid_upload(server: ProcessServer, adapter_dir) -> None:
    body, content_type = _multipart(adapter_dir, "half")
    head = (f"POST /v1/adapters HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head + body[: len(body) // 2])
        time.sleep(0.3)
        server.signal(signal.SIGKILL)
        assert server.wait(30) == -signal.SIGKILL


def test_sigterm_drain_restart_and_sigkill_mid_upload(tiny_model_dir, tiny_adapter_dirs, tmp_path):
    store = tmp_path / "store"
    seeds = tiny_adapter_dirs["a0"].parent
    first = ProcessServer(tiny_model_dir, store, tmp_path / "first.log", "--seed-adapters", str(seeds),
                          "--preload", "a3").wait_ready()
    try:
        seeded = _adapters(first.url)
        assert set(seeded) == set(tiny_adapter_dirs) and all(a["shared"] for a in seeded.values())
        assert seeded["a3"]["pinned"] and seeded["a3"]["residency"] == "device"
        with httpx.Client(base_url=first.url, timeout=60) as c:
            uploaded = upload(c, tiny_adapter_dirs["a0"], "persist")
            assert uploaded.status_code == 201
        before = _complete(first.url, "persist")
        chunks = _sigterm_during_stream(first)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert "draining the engine" in first.log()
    finally:
        first.kill()
    expected = {k: v["sha256"] for k, v in seeded.items()} | {"persist": uploaded.json()["sha256"]}

    second = ProcessServer(tiny_model_dir, store, tmp_path / "second.log", "--threads", "2").wait_ready()
    try:
        assert {k: v["sha256"] for k, v in _adapters(second.url).items()} == expected
        assert _complete(second.url, "persist") == before
        metrics = httpx.get(f"{second.url}/metrics", timeout=60).text  # the forwards ran on --threads, although
        threads = re.search(r"^loramux_engine_threads (\S+)$", metrics, re.M)  # helper threads run single-threaded
        assert threads and float(threads.group(1)) == 2, threads
        _sigkill_mid_upload(second, tiny_adapter_dirs["a2"])
    finally:
        second.kill()

    third = ProcessServer(tiny_model_dir, store, tmp_path / "third.log").wait_ready()
    try:
        assert {k: v["sha256"] for k, v in _adapters(third.url).items()} == expected
        assert _complete(third.url, "persist") == before
        assert not [p for p in store_listing(store) if p.startswith((".tmp/", ".quarantine/"))]
        assert "0 quarantined" in third.log()
        with httpx.Client(base_url=third.url, timeout=60) as c:
            assert upload(c, tiny_adapter_dirs["a2"], "half").status_code == 201
    finally:
        third.signal(signal.SIGTERM)
        third.wait(60)
