"""Helpers for the HTTP tests: real uvicorn servers on free local ports (in a thread or as a process)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn

from server.app import create_app
from server.settings import Settings

REPO = Path(__file__).resolve().parent.parent
# One engine thread: the tiny test models gain nothing from more, and the test process's own OpenMP team
# would make a second one throttle (see server/threads.py).
TEST_FLAGS = {"device": "cpu", "dtype": "float32", "max_model_len": 256, "max_batch_size": 32, "max_loras": 8,
              "log_level": "warning", "threads": 1}


ACME, GLOBEX, OPS = "sk-acme-0123456789", "sk-globex-0123456789", "sk-ops-0123456789"
KEYS_YAML = f"""
keys:
  {ACME}: {{tenant: acme, role: user}}
  {GLOBEX}: {{tenant: globex, role: user}}
  {OPS}: {{tenant: ops, role: admin}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_settings(model_dir: Path, adapters_dir: Path, **overrides) -> Settings:
    return Settings(model=str(model_dir), adapters_dir=adapters_dir, host="127.0.0.1", port=free_port(),
                    **(TEST_FLAGS | overrides))


class ThreadServer:
    """`create_app(settings)` served by uvicorn in a background thread of the test process."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.app = create_app(settings)
        self.url = f"http://127.0.0.1:{settings.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=settings.port, log_level="warning",
                                access_log=False, timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)

    def start(self, timeout: float = 120) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def services(self):
        return self.app.state.services


@contextmanager
def thread_server(settings: Settings) -> Iterator[ThreadServer]:
    server = ThreadServer(settings).start()
    try:
        yield server
    finally:
        server.stop()


class ProcessServer:
    """`python -m server ...` as a child process (for SIGTERM, SIGKILL and restart tests)."""

    def __init__(self, model_dir: Path, adapters_dir: Path, log_path: Path, *extra: str, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        flags = TEST_FLAGS | {"log_level": "info", "drain_timeout": 20}
        args = [sys.executable, "-m", "server", "--model", str(model_dir), "--adapters-dir", str(adapters_dir),
                "--port", str(self.port)]
        for name, value in flags.items():
            args += [f"--{name.replace('_', '-')}", str(value)]
        self.log_path = log_path
        self._log = open(log_path, "ab")  # closed in wait() and kill()
        self.proc = subprocess.Popen([*args, *extra], cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=os.environ | {"PYTHONUNBUFFERED": "1"})

    def wait_ready(self, timeout: float = 120) -> ProcessServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server did not become ready:\n{self.log()}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.wait()

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")


def upload(client: httpx.Client, adapter_dir: Path, adapter_id: str, *, headers: dict | None = None,
           config: bytes | None = None, weights: bytes | None = None, weights_name: str = "adapter_model.safetensors",
           shared: bool | None = None, **params) -> httpx.Response:
    """POST /v1/adapters with the files of a PEFT directory (or the given bytes)."""
    config = config if config is not None else (adapter_dir / "adapter_config.json").read_bytes()
    weights = weights if weights is not None else (adapter_dir / "adapter_model.safetensors").read_bytes()
    data = {"id": adapter_id} | ({"shared": str(shared).lower()} if shared is not None else {})
    files = {"config": ("adapter_config.json", config, "application/json"),
             "weights": (weights_name, weights, "application/octet-stream")}
    return client.post("/v1/adapters", data=data, files=files, headers=headers, params=params)


def store_listing(root: Path) -> list[str]:
    """Every path under the store root (relative), to compare the store before and after a request."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def complete(client: httpx.Client, model: str, prompt: str | list[int], max_tokens: int = 12, **extra) -> dict:
    """A greedy completion; asserts 200 and returns the body."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0} | extra
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        sample_name, _, rest = key.partition("{")
        if sample_name == name and (not want or rest.rstrip("}") == want):
            return float(value)
    return 0.0
