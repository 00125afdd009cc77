"""The README's quickstart, run the way a user would: its own commands, in a fresh clone.

Slow (it builds a virtual environment in the clone and loads the default model), but it runs in CI:
it is the only test that proves `make serve` works from nothing but the repository.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from http_fixtures import free_port

ROOT = Path(__file__).resolve().parents[1]


def readme_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def command_lines(block: str) -> list[str]:
    """The block's commands: comments stripped, backslash continuations joined."""
    joined = block.replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip()]


@pytest.mark.slow
def test_readme_quickstart_in_a_fresh_clone(tmp_path):
    blocks = readme_blocks()
    serve = next(line for line in command_lines(blocks[0]) if line.startswith("make serve"))
    example = next(line for b in blocks for line in command_lines(b) if line.startswith("curl"))
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    port = free_port()
    env = {**os.environ, "PORT": str(port), "PYTHON": sys.executable}
    env.pop("VIRTUAL_ENV", None)
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(["bash", "-c", serve], cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-4000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        else:
            pytest.fail("the server never became ready:\n" + (tmp_path / "serve.log").read_text()[-4000:])
        out = subprocess.run(shlex.split(example.replace("8000", str(port))), capture_output=True, text=True,
                             timeout=300, check=True)
        reply = json.loads(out.stdout)
        assert reply["choices"][0]["message"]["content"].strip()
        assert reply["usage"]["completion_tokens"] > 0
        printed = (tmp_path / "serve.log").read_text()
        assert f"http://127.0.0.1:{port}" in printed, "the server should print its URL"
        assert "curl" in printed, "the server should print a copy-paste request"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
