"""The Python client and the `loramux` CLI against a real server (tiny model, real HTTP)."""

from __future__ import annotations

import asyncio

import pytest
from http_fixtures import make_settings, thread_server

from client import AsyncLoramuxClient, LoramuxClient
from client.cli import main as cli
from client.errors import ConflictError, NotFoundError


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with thread_server(make_settings(tiny_model_dir, tmp_path_factory.mktemp("store"))) as srv:
        yield srv


def test_client_round_trip(server, tiny_adapter_dirs):
    with LoramuxClient(server.url) as c:
        info = c.upload(tiny_adapter_dirs["a1"], "e2e")
        assert info.is_new and info.rank == 8
        assert not c.upload(tiny_adapter_dirs["a1"], "e2e").is_new
        with pytest.raises(ConflictError):
            c.upload(tiny_adapter_dirs["a2"], "e2e")
        first = c.complete("e2e", "Hello there", max_tokens=8, temperature=0, ignore_eos=True)
        streamed = "".join(chunk.text for chunk in c.complete_stream("e2e", "Hello there", max_tokens=8,
                                                                     temperature=0, ignore_eos=True))
        assert first.choices[0].text == streamed and first.usage.completion_tokens == 8
        assert "e2e" in [a.id for a in c.list_adapters()]
        c.evict("e2e")
        assert c.get_adapter("e2e").residency == "disk"
        assert c.complete("e2e", "Hello there", max_tokens=8, temperature=0,
                          ignore_eos=True).choices[0].text == first.choices[0].text
        c.delete("e2e")
        with pytest.raises(NotFoundError):
            c.get_adapter("e2e")


def test_async_client_chat_stream(server, tiny_adapter_dirs):
    async def run():
        async with AsyncLoramuxClient(server.url) as c:
            await c.upload(tiny_adapter_dirs["a3"], "e2e-async")
            whole = await c.chat("e2e-async", [{"role": "user", "content": "hi"}], max_tokens=6, temperature=0)
            parts = [chunk.text async for chunk in c.chat_stream("e2e-async", [{"role": "user", "content": "hi"}],
                                                                  max_tokens=6, temperature=0)]
            return whole, "".join(p for p in parts if p)

    whole, streamed = asyncio.run(run())
    assert whole.choices[0].message.content == streamed


def test_cli_upload_list_complete(server, tiny_adapter_dirs, capsys):
    base = ["--url", server.url]
    assert cli([*base, "upload", str(tiny_adapter_dirs["a4"]), "--id", "cli-a4"]) == 0
    assert cli([*base, "list"]) == 0
    table = capsys.readouterr().out
    assert "cli-a4" in table and "RANK" in table
    assert cli([*base, "complete", "cli-a4", "Hello", "--max-tokens", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip()
    assert cli([*base, "show", "nope"]) == 1
    assert "error:" in capsys.readouterr().err
