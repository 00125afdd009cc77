"""`python -m server` as a child process of a benchmark: started on a free port, waited for, stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 600.0


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log_path: Path
    headers: dict[str, str]  # an admin's Authorization, when the server has API keys

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.log_tail()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/ready", headers=self.headers, timeout=2, trust_env=False).status_code == 200:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"the server was not ready within {READY_TIMEOUT_S:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def engine_counters(self) -> dict[str, float]:
        """Steps and step seconds so far, summed over execution kinds (from /metrics)."""
        text = httpx.get(f"{self.url}/metrics", headers=self.headers, timeout=10, trust_env=False).text
        sums = {"steps": 0.0, "step_s": 0.0}
        for line in text.splitlines():
            key = {"loramux_steps_total": "steps", "loramux_step_seconds_total": "step_s"}.get(line.split("{")[0])
            if key:
                sums[key] += float(line.rsplit(" ", 1)[1])
        return sums


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def launch_server(flags: dict[str, object], log_path: Path, admin_key: str | None = None,
                  env: dict[str, str] | None = None) -> Iterator[Server]:
    """Starts `python -m server --flag value ...` on a free port (not waiting for it: call wait_ready);
    SIGTERM, then SIGKILL, on exit. A value of True is a bare flag; `env` is added to this process's."""
    port = free_port()
    cmd = [sys.executable, "-m", "server", "--port", str(port)]
    cmd += [x for k, v in flags.items() for x in ([f"--{k}"] if v is True else [f"--{k}", str(v)])]
    with log_path.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env=None if env is None else os.environ | env)
    try:
        headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
        yield Server(proc, f"http://127.0.0.1:{port}", log_path, headers)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


