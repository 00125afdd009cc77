"""The Python client and the CLI against an in-process fake server that answers in the HTTP contract's shapes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from fake_server import KEY, MAX_UPLOAD, fake_app, sync_transport
from fastapi import FastAPI

from client import (
    AdapterDirError,
    AdapterInfo,
    AsyncLoramuxClient,
    AuthenticationError,
    ConflictError,
    LoramuxClient,
    LoramuxConnectionError,
    LoramuxError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
    ServiceUnavailableError,
    UnprocessableEntityError,
    cli,
)
from client.multipart import FilePart, MultipartBody
from client.protocol import ChunkReader, normalize_base_url, parse_retry_after
from client.sse import SSEDecoder


@pytest.fixture
def app() -> FastAPI:
    return fake_app()


@pytest.fixture
def client(app: FastAPI):
    with LoramuxClient("http://loramux.test/v1/", api_key=KEY, transport=sync_transport(app)) as c:
        yield c


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    d = tmp_path / "my-adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}))
    (d / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 10_000)  # 2.4 MiB: several chunks
    (d / "README.md").write_text("not sent")
    return d


# --- protocol pieces ------------------------------------------------------------------------------------------------


def test_sse_decoder_joins_data_lines_and_skips_comments():
    d = SSEDecoder()
    lines = [": ping", "event: message", "data: {\"a\":", "data:1}\r", "", "", "data: [DONE]", ""]
    assert [x for x in (d.feed(line) for line in lines) if x is not None] == ['{"a":\n1}', "[DONE]"]
    d.feed("data: tail")
    assert d.flush() == "tail" and d.flush() is None


def test_chunk_reader_stops_at_done_and_raises_error_events():
    reader = ChunkReader(dict)
    assert reader.feed('data: {"x": 1}') is None and reader.feed("") == {"x": 1}
    reader.feed("data: [DONE]")
    reader.feed("")
    assert reader.done and reader.feed('data: {"x": 2}') is None and reader.finish() is None
    bad = ChunkReader(dict)
    bad.feed('data: {"error": {"message": "boom", "type": "server_error", "code": 503}}')
    with pytest.raises(ServiceUnavailableError, match="boom"):
        bad.feed("")


def test_multipart_length_matches_bytes_and_progress_reaches_total(adapter_dir: Path):
    files = [FilePart("weights", adapter_dir / "adapter_model.safetensors", "adapter_model.safetensors", "x/y")]
    body = MultipartBody.build({"id": "a"}, files)
    seen: list[tuple[int, int]] = []
    data = b"".join(body.iter_bytes(lambda sent, total: seen.append((sent, total))))
    assert len(data) == body.length() == seen[-1][0] == seen[-1][1]
    assert len(seen) > 3 and all(a[0] < b[0] for a, b in zip(seen, seen[1:], strict=False))
    assert data.endswith(f"--{body.boundary}--\r\n".encode())


def test_base_url_and_retry_after_helpers():
    assert normalize_base_url("http://h:8000/v1/") == "http://h:8000"
    assert normalize_base_url("http://h:8000") == "http://h:8000"
    assert parse_retry_after("2.5") == 2.5 and parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


def test_adapter_info_tolerates_aliases_nested_residency_and_extra_fields():
    info = AdapterInfo.model_validate({
        "id": "x", "r": 4, "targets": "q_proj|v_proj", "size": 10,
        "residency": {"tier": "host", "pinned": True, "in_flight": 2, "served": 7}, "tenant": "acme", "new_field": 1,
    })
    assert (info.rank, info.size_bytes, info.residency, info.pinned, info.in_flight, info.requests_served) == (
        4, 10, "host", True, 2, 7)
    assert info.targets == ["q_proj|v_proj"] and info.owner == "acme" and info.model_extra == {"new_field": 1}


# --- sync client ---------------------------------------------------------------------------------------------------


def test_upload_sends_multipart_fields_and_auth(client: LoramuxClient, app: FastAPI, adapter_dir: Path):
    progress: list[int] = []
    info = client.upload(adapter_dir, "my-adapter", shared=True, progress=lambda sent, total: progress.append(sent))
    assert info.is_new and info.id == "my-adapter" and info.rank == 8 and info.target_modules == ["q_proj", "v_proj"]
    form = app.state.last_form
    assert form["id"] == "my-adapter" and form["shared"] == "true" and form["config_name"] == "adapter_config.json"
    assert form["config"] == (adapter_dir / "adapter_config.json").read_bytes()
    assert form["weights"] == (adapter_dir / "adapter_model.safetensors").read_bytes()
    request = app.state.log[-1]
    assert request.headers["authorization"] == f"Bearer {KEY}" and request.url.path == "/v1/adapters"
    assert progress[-1] == int(request.headers["content-length"])

    assert client.upload(adapter_dir, "my-adapter").is_new is False  # same content: 200
    (adapter_dir / "adapter_config.json").write_text('{"r": 4}')
    with pytest.raises(ConflictError, match="other content") as e:
        client.upload(adapter_dir, "my-adapter")
    assert e.value.status == 409 and e.value.code == "adapter_conflict"
    assert client.upload(adapter_dir, "my-adapter", overwrite=True).is_new
    assert app.state.log[-1].query_params["overwrite"] == "true"


def test_upload_refuses_pickle_only_dir_before_sending(client: LoramuxClient, app: FastAPI, tmp_path: Path):
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterDirError, match="adapter_model.bin.*never loads pickle"):
        client.upload(tmp_path, "x")
    with pytest.raises(AdapterDirError, match="not a directory"):
        client.upload(tmp_path / "nope", "x")
    assert app.state.log == []


def test_upload_too_large_is_413(client: LoramuxClient, adapter_dir: Path):
    (adapter_dir / "adapter_model.safetensors").write_bytes(b"\0" * (MAX_UPLOAD + 1))
    with pytest.raises(PayloadTooLargeError, match="exceeds"):
        client.upload(adapter_dir, "big")


def test_adapter_management_paths_and_query(client: LoramuxClient, app: FastAPI, adapter_dir: Path):
    client.upload(adapter_dir, "a1")
    assert [a.id for a in client.list_adapters(tenant="acme")] == ["a1"]
    assert app.state.log[-1].query_params["tenant"] == "acme"
    assert client.get_adapter("a1").sha256 == app.state.adapters["a1"]["sha256"]
    loaded = client.load("a1", pin=True)
    assert loaded.residency == "device" and loaded.pinned
    assert (app.state.log[-1].method, app.state.log[-1].url.path, app.state.log[-1].url.query) == (
        "POST", "/v1/adapters/a1/load", "pin=true")
    assert client.evict("a1") == {} and client.get_adapter("a1").residency == "disk"
    assert "purge" not in app.state.log[-2].query_params
    assert client.delete("a1")["deleted"] is True
    assert app.state.log[-1].method == "DELETE" and app.state.log[-1].query_params["purge"] == "true"
    with pytest.raises(NotFoundError, match="adapter 'a1' not found") as e:
        client.get_adapter("a1")
    assert e.value.status == 404 and e.value.type == "invalid_request_error"


def test_completion_and_chat(client: LoramuxClient, app: FastAPI):
    c = client.complete("base", "Say hi", max_tokens=3, temperature=None, seed=1)
    assert c.text == "Hello, world" and c.usage.total_tokens == 5 and c.choices[0].finish_reason == "length"
    chat = client.chat("base", [{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.text == "Hi there" and chat.choices[0].message.role == "assistant"
    assert app.state.last_json == {"model": "base", "messages": [{"role": "user", "content": "hi"}],
                                   "max_tokens": 4, "stream": False}


def test_streams_yield_deltas(client: LoramuxClient):
    assert [ch.text for ch in client.complete_stream("base", "x", max_tokens=3)] == ["Hello", ",", " world"]
    assert "".join(ch.text for ch in client.chat_stream("base", [{"role": "user", "content": "hi"}])) == "Hi there"


def test_stream_split_across_network_chunks():
    body = b'data: {"choices": [{"text": "a"}]}\n\ndata: {"choices": [{"text": "b"}]}\n\ndata: [DONE]\n\n'

    def handle(request: httpx.Request) -> httpx.Response:
        assert json.loads(request.content)["stream"] is True
        return httpx.Response(200, content=iter([body[i : i + 7] for i in range(0, len(body), 7)]))

    with LoramuxClient(transport=httpx.MockTransport(handle)) as c:
        assert [ch.text for ch in c.complete_stream("m", "p")] == ["a", "b"]


def test_errors_carry_server_message_status_and_retry_after(client: LoramuxClient, app: FastAPI):
    with pytest.raises(RateLimitError, match="over its quota") as e:
        client.complete("busy", "x")
    assert e.value.status == 429 and e.value.retry_after == 3.0
    with pytest.raises(NotFoundError, match="adapter 'nope' not found"):
        list(client.complete_stream("nope", "x"))
    with pytest.raises(UnprocessableEntityError, match="max_tokens"):  # FastAPI's own {"detail": [...]} body
        client.complete("base", "x", max_tokens="many")
    with pytest.raises(LoramuxError, match="engine failed mid-stream") as e:
        list(client.complete_stream("broken", "x"))
    assert e.value.status == 500
    assert client.health() == {"status": "ok"} and client.ready() is True
    app.state.ready = False
    assert client.ready() is False


def test_auth_required(app: FastAPI):
    with LoramuxClient(transport=sync_transport(app)) as anonymous:
        assert anonymous.health() == {"status": "ok"}
        with pytest.raises(AuthenticationError, match="invalid API key") as e:
            anonymous.list_adapters()
    assert e.value.status == 401 and "authorization" not in app.state.log[-1].headers


def test_connection_error():
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("Connection refused", request=request)

    with LoramuxClient("http://127.0.0.1:9", transport=httpx.MockTransport(refuse)) as c:
        with pytest.raises(LoramuxConnectionError, match="cannot reach the loramux server at http://127.0.0.1:9"):
            c.models()
        with pytest.raises(LoramuxConnectionError):
            list(c.chat_stream("m", []))


# --- async client ------------------------------------------------------------------------------------------------


def test_async_client_shares_the_protocol(app: FastAPI, adapter_dir: Path):
    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with AsyncLoramuxClient("http://loramux.test", KEY, transport=transport) as c:
            sent: list[int] = []
            info = await c.upload(adapter_dir, "a2", progress=lambda s, t: sent.append(s))
            weights = (adapter_dir / "adapter_model.safetensors").read_bytes()
            assert info.is_new and app.state.last_form["weights"] == weights
            assert sent[-1] == int(app.state.log[-1].headers["content-length"])
            assert [m.id for m in await c.models()] == ["base", "a2"]
            assert (await c.complete("a2", "x")).text == "Hello, world"
            assert [ch.text async for ch in c.complete_stream("a2", "x")] == ["Hello", ",", " world"]
            chunks = [ch async for ch in c.chat_stream("a2", [{"role": "user", "content": "q"}])]
            assert chunks[0].choices[0].delta.role == "assistant" and "".join(ch.text for ch in chunks) == "Hi there"
            assert (await c.load("a2")).residency == "device"
            await c.evict("a2")
            await c.delete("a2")
            with pytest.raises(NotFoundError):
                await c.get_adapter("a2")
            with pytest.raises(NotFoundError):
                [ch async for ch in c.complete_stream("a2", "x")]

    asyncio.run(scenario())


# --- CLI ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def run_cli(app: FastAPI, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """``run_cli(*argv) -> (exit code, stdout, stderr)`` with the CLI's client wired to the fake server."""
    transport = sync_transport(app)
    made: list[tuple[str, str | None]] = []

    def make(url: str, api_key: str | None, timeout: Any) -> LoramuxClient:
        made.append((url, api_key))
        return LoramuxClient(url, api_key, timeout, transport=transport)

    monkeypatch.setattr(cli, "LoramuxClient", make)
    monkeypatch.setenv("LORAMUX_API_KEY", KEY)
    monkeypatch.delenv("LORAMUX_URL", raising=False)

    def run(*argv: str) -> tuple[int, str, str]:
        code = cli.main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    run.made = made
    return run


def test_cli_upload_list_show(run_cli, adapter_dir: Path):
    code, out, _ = run_cli("upload", str(adapter_dir), "--id", "alpha-adapter")
    assert code == 0 and out.startswith("uploaded: alpha-adapter rank=8")
    assert run_cli("upload", str(adapter_dir), "--id", "alpha-adapter")[1].startswith("already stored")
    run_cli("upload", str(adapter_dir), "--id", "b")
    run_cli("load", "b", "--pin")

    code, out, _ = run_cli("list")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["ID", "KIND", "RANK", "ALPHA", "TARGETS", "SIZE", "RESIDENCY",
                                              "PINNED", "IN-FLIGHT", "SERVED"]
    assert lines[1].split() == ["alpha-adapter", "lora", "8", "16", "q_proj,v_proj", "2.4", "MiB", "disk", "no", "0",
                                "0"]
    assert lines[2].split()[0] == "b" and "device" in lines[2] and "yes" in lines[2]
    col = lines[0].index("RESIDENCY")
    assert lines[1][col:].startswith("disk") and lines[2][col:].startswith("device")
    run_cli("upload", str(adapter_dir), "--id", "c", "--shared")
    lines = run_cli("list")[1].splitlines()
    assert lines[0].split()[-1] == "OWNER" and [r.split()[-1] for r in lines[1:]] == ["acme", "acme", "shared"]

    code, out, _ = run_cli("show", "b")
    shown = [" ".join(line.split()) for line in out.splitlines()]
    assert code == 0 and "residency: device" in shown and "target_modules: q_proj,v_proj" in shown
    assert json.loads(run_cli("show", "b", "--json")[1])["pinned"] is True
    assert json.loads(run_cli("list", "--json")[1])[0]["id"] == "alpha-adapter"
    assert run_cli.made[-1] == ("http://127.0.0.1:8000", KEY)


def test_cli_evict_delete_and_errors(run_cli, adapter_dir: Path):
    run_cli("upload", str(adapter_dir), "--id", "x")
    assert run_cli("evict", "x")[:2] == (0, "evicted x (still stored)\n")
    assert run_cli("delete", "x")[:2] == (0, "deleted x\n")
    code, out, err = run_cli("show", "x")
    assert (code, out, err) == (1, "", "error: adapter 'x' not found\n")
    assert run_cli("list")[1] == "no adapters\n"


def test_cli_complete_and_chat_stream(run_cli, app: FastAPI):
    assert run_cli("complete", "base", "Say hi", "--max-tokens", "3", "--seed", "7")[:2] == (0, "Hello, world\n")
    assert run_cli("complete", "base", "Say hi", "--no-stream")[:2] == (0, "Hello, world\n")
    code, out, _ = run_cli("chat", "base", "hello", "--system", "be brief", "--temperature", "0")
    assert (code, out) == (0, "Hi there\n")
    assert app.state.last_json["messages"][0] == {"role": "system", "content": "be brief"}
    assert app.state.last_json["temperature"] == 0 and "top_p" not in app.state.last_json
    assert run_cli("complete", "busy", "x") == (1, "", "error: tenant acme is over its quota\n")


def test_cli_url_key_env_and_usage_errors(run_cli, monkeypatch: pytest.MonkeyPatch, adapter_dir: Path, tmp_path: Path):
    monkeypatch.setenv("LORAMUX_URL", "http://env-host:1234")
    run_cli("models")
    assert run_cli.made[-1] == ("http://env-host:1234", KEY)
    run_cli("--url", "http://flag-host:5", "--api-key", "sk-other", "list")
    assert run_cli.made[-1] == ("http://flag-host:5", "sk-other")
    monkeypatch.delenv("LORAMUX_API_KEY")
    assert run_cli("list") == (1, "", "error: missing or invalid API key\n")
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter.pt").write_bytes(b"x")
    code, _, err = run_cli("upload", str(tmp_path), "--id", "p")
    assert code == 1 and "never loads pickle" in err
    assert run_cli("upload", str(adapter_dir))[0] == 2  # --id missing
    assert run_cli("frobnicate")[0] == 2
    assert run_cli()[0] == 2


def test_cli_connection_refused(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    monkeypatch.delenv("LORAMUX_URL", raising=False)
    assert cli.main(["--url", "http://127.0.0.1:9", "--timeout", "2", "list"]) == 1
    assert capsys.readouterr().err.startswith("error: cannot reach the loramux server at http://127.0.0.1:9")
