"""The HTTP API on a real uvicorn server (open mode): OpenAI package, adapter lifecycle, validation, limits."""

from __future__ import annotations

import io
import json
import socket
import time

import openai
import pytest
import safetensors.torch
import torch
from http_fixtures import complete, make_settings, metric_value, store_listing, thread_server, upload

MAX_UPLOAD_MB = 1


@pytest.fixture(scope="module")
def server(tiny_model_dir, tiny_adapter_dirs, tmp_path_factory):
    store = tmp_path_factory.mktemp("store-api")
    vllm_dir = next(iter(tiny_adapter_dirs.values())).parent
    settings = make_settings(tiny_model_dir, store, max_upload_mb=MAX_UPLOAD_MB, vllm_lora_dir=vllm_dir,
                             max_n=4, max_stop=2)
    with thread_server(settings) as srv:
        yield srv


def test_health_ready_metrics(client):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert "loramux_requests_running" in r.text and "loramux_http_requests_total" in r.text
    assert r.headers["x-request-id"]


def test_openai_package_with_adapter(server, client, tiny_adapter_dirs):
    assert upload(client, tiny_adapter_dirs["a0"], "oa-a0").status_code == 201
    oa = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    c = oa.completions.create(model="oa-a0", prompt="The capital of France is", max_tokens=10, temperature=0)
    assert c.object == "text_completion" and c.model == "oa-a0" and c.id.startswith("cmpl-")
    assert c.choices[0].finish_reason in ("stop", "length") and 1 <= c.usage.completion_tokens <= 10
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
    streamed = list(oa.completions.create(model="oa-a0", prompt="The capital of France is", max_tokens=10,
                                          temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == c.choices[0].text
    assert streamed[-1].usage.completion_tokens == c.usage.completion_tokens and not streamed[-1].choices

    messages = [{"role": "user", "content": "Say something."}]
    chat = oa.chat.completions.create(model="oa-a0", messages=messages, max_tokens=10, temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens > 5
    chunks = list(oa.chat.completions.create(model="oa-a0", messages=messages, max_tokens=10, temperature=0,
                                             stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == chat.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == chat.choices[0].finish_reason

    with pytest.raises(openai.NotFoundError) as e:
        oa.completions.create(model="no-such-adapter", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"


def test_sse_wire_format(client, base_name):
    body = {"model": base_name, "prompt": "Hi", "max_tokens": 3, "temperature": 0, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])


def test_adapter_lifecycle(client, base_name, tiny_adapter_dirs):
    """upload -> complete -> list -> evict -> complete again (reload) -> purge -> 404."""
    r = upload(client, tiny_adapter_dirs["a1"], "life")
    assert r.status_code == 201, r.text
    meta = r.json()
    assert (meta["id"], meta["rank"], meta["alpha"], meta["namespace"], meta["shared"]) == ("life", 8, 16.0,
                                                                                          "shared", True)
    assert len(meta["sha256"]) == 64 and meta["size_bytes"] > 0 and "q_proj" in meta["target_modules"]
    prompt = "Once upon a time"
    first = complete(client, "life", prompt)["choices"][0]["text"]
    assert first != complete(client, base_name, prompt)["choices"][0]["text"]
    listed = {a["id"]: a for a in client.get("/v1/adapters").json()["data"]}
    life = listed["life"]
    assert life["residency"] == "device" and life["requests_served"] >= 1 and life["in_flight"] == 0
    assert life["last_used"] is not None and abs(life["last_used"] - time.time()) < 60

    evicted = client.delete("/v1/adapters/life")
    assert evicted.status_code == 200 and evicted.json() == {"id": "life", "object": "adapter",
                                                             "namespace": "shared", "evicted": True, "purged": False}
    assert client.get("/v1/adapters/life").json()["residency"] == "disk"
    assert complete(client, "life", prompt)["choices"][0]["text"] == first

    metrics = client.get("/metrics").text
    for tier in ("host", "device"):  # read from the store twice (evicted in between), copied into a slot twice
        assert metric_value(metrics, "loramux_adapter_loads_total", tier=tier) >= 2
        assert metric_value(metrics, "loramux_adapter_load_seconds_count", tier=tier) >= 2
        assert metric_value(metrics, "loramux_adapter_load_seconds_sum", tier=tier) > 0
    assert metric_value(metrics, "loramux_step_seconds_total", kind="batched") > 0
    assert metric_value(metrics, "loramux_generated_tokens_total", adapter="shared/life") > 0

    assert client.delete("/v1/adapters/life", params={"purge": "true"}).json()["purged"] is True
    gone = client.get("/v1/adapters/life")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "adapter_not_found"
    r = client.post("/v1/completions", json={"model": "life", "prompt": prompt})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "life" not in {a["id"] for a in client.get("/v1/adapters").json()["data"]}


def test_load_and_pin(client, tiny_adapter_dirs):
    assert upload(client, tiny_adapter_dirs["a2"], "pinme").status_code == 201
    info = client.post("/v1/adapters/pinme/load", params={"pin": "true"}).json()
    assert info["residency"] == "device" and info["pinned"] is True
    assert client.post("/v1/adapters/pinme/load").json()["pinned"] is True  # no ?pin: pin state kept
    assert client.post("/v1/adapters/pinme/load", params={"pin": "false"}).json()["pinned"] is False
    assert client.delete("/v1/adapters/pinme", params={"purge": "true"}).status_code == 200
    assert client.post("/v1/adapters/pinme/load").status_code == 404


def test_reupload_idempotent_conflict_overwrite(server, client, tiny_adapter_dirs):
    root = server.settings.adapters_dir
    first = upload(client, tiny_adapter_dirs["a3"], "dup")
    assert first.status_code == 201
    again = upload(client, tiny_adapter_dirs["a3"], "dup")
    assert again.status_code == 200 and again.json()["sha256"] == first.json()["sha256"]
    before = store_listing(root)
    conflict = upload(client, tiny_adapter_dirs["a4"], "dup")
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "adapter_conflict"
    assert store_listing(root) == before
    assert client.get("/v1/adapters/dup").json()["sha256"] == first.json()["sha256"]
    replaced = upload(client, tiny_adapter_dirs["a4"], "dup", overwrite="true")
    assert replaced.status_code == 201 and replaced.json()["sha256"] != first.json()["sha256"]
    assert upload(client, tiny_adapter_dirs["a4"], "a4-copy").status_code == 201
    assert (complete(client, "dup", "Hello there")["choices"][0]["text"]
            == complete(client, "a4-copy", "Hello there")["choices"][0]["text"])


def _tensors(adapter_dir) -> dict[str, torch.Tensor]:
    return safetensors.torch.load((adapter_dir / "adapter_model.safetensors").read_bytes())


def _config(adapter_dir, **changes) -> bytes:
    return json.dumps(json.loads((adapter_dir / "adapter_config.json").read_bytes()) | changes).encode()


def _bad_adapter(kind: str, adapter_dir) -> dict:
    """Upload arguments for one kind of invalid adapter (built from the valid adapter a0: r=4 on q, v)."""
    tensors = _tensors(adapter_dir)
    a_key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    b_key = a_key.replace("lora_A", "lora_B")
    if kind == "pickle_bin":
        buf = io.BytesIO()
        torch.save(tensors, buf)
        return {"weights": buf.getvalue(), "weights_name": "adapter_model.bin"}
    if kind == "pickle_renamed":
        buf = io.BytesIO()
        torch.save(tensors, buf)
        return {"weights": buf.getvalue()}
    if kind == "header_too_big":
        return {"weights": (2**21).to_bytes(8, "little") + b'{"a": 1}' + b" " * 64}
    if kind == "wrong_dtype":
        return {"weights": safetensors.torch.save({k: v.double() for k, v in tensors.items()})}
    if kind == "nan":
        tensors[b_key] = tensors[b_key].clone()
        tensors[b_key][0, 0] = float("nan")
        return {"weights": safetensors.torch.save(tensors)}
    if kind == "rank_above_max":
        return {"config": _config(adapter_dir, r=128)}
    if kind == "unknown_module":
        tensors[a_key.replace("q_proj", "foo_proj")] = tensors[a_key].clone()
        tensors[b_key.replace("q_proj", "foo_proj")] = tensors[b_key].clone()
        return {"weights": safetensors.torch.save(tensors)}
    if kind == "wrong_shape":
        tensors[a_key] = tensors[a_key].t().contiguous()
        return {"weights": safetensors.torch.save(tensors)}
    if kind == "dora":
        return {"config": _config(adapter_dir, use_dora=True)}
    if kind == "missing_twin":
        del tensors[b_key]
        return {"weights": safetensors.torch.save(tensors)}
    if kind == "config_not_json":
        return {"config": b"{not json"}
    if kind == "not_safetensors":
        return {"weights": b"abc"}
    raise AssertionError(kind)


BAD_ADAPTERS = {  # kind -> (status, fragment of the error message)
    "pickle_bin": (400, "pickle"),
    "pickle_renamed": (400, "pickle"),
    "header_too_big": (413, "header"),
    "wrong_dtype": (400, "dtype"),
    "nan": (400, "NaN"),
    "rank_above_max": (422, "max rank"),
    "unknown_module": (422, "foo_proj"),
    "wrong_shape": (422, "shape"),
    "dora": (400, "has no lora_magnitude_vector, which use_dora=true requires"),
    "missing_twin": (400, "lora_B"),
    "config_not_json": (400, "JSON"),
    "not_safetensors": (400, "safetensors"),
}


@pytest.mark.parametrize("kind", sorted(BAD_ADAPTERS))
def test_bad_adapter_rejected_store_unchanged(server, client, tiny_adapter_dirs, kind):
    status, fragment = BAD_ADAPTERS[kind]
    root = server.settings.adapters_dir
    before = store_listing(root)
    r = upload(client, tiny_adapter_dirs["a0"], f"bad-{kind}", **_bad_adapter(kind, tiny_adapter_dirs["a0"]))
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert fragment in error["message"] and error["type"] and error["code"]
    assert store_listing(root) == before
    assert client.get(f"/v1/adapters/bad-{kind}").status_code == 404


@pytest.mark.parametrize(("form", "status", "fragment"), [
    ({"id": "../escape"}, 400, "invalid adapter id"),
    ({"id": "ok", "drop": "weights"}, 422, "weights"),
    ({"id": "ok", "shared": "maybe"}, 422, "shared"),
])
def test_bad_upload_form(server, client, tiny_adapter_dirs, form, status, fragment):
    before = store_listing(server.settings.adapters_dir)
    d = tiny_adapter_dirs["a0"]
    files = {"config": ("adapter_config.json", (d / "adapter_config.json").read_bytes()),
             "weights": ("adapter_model.safetensors", (d / "adapter_model.safetensors").read_bytes())}
    files.pop(form.pop("drop", ""), None)
    r = client.post("/v1/adapters", data=form, files=files)
    assert r.status_code == status and fragment in r.json()["error"]["message"], r.text
    assert store_listing(server.settings.adapters_dir) == before
    r = client.post("/v1/adapters", content=b'{"id": "x"}', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "multipart" in r.json()["error"]["message"]


def _raw_request(server, head: str, body_chunks: list[bytes], timeout: float = 10) -> tuple[str, float]:
    """Send a request over a raw socket, leaving the body unfinished; returns (response head, seconds)."""
    with socket.create_connection(("127.0.0.1", server.settings.port), timeout=timeout) as sock:
        start = time.monotonic()
        sock.sendall(head.encode())
        for chunk in body_chunks:
            try:
                sock.sendall(chunk)
            except OSError:  # the server answered and closed while the body was still coming
                break
        data = b""
        while b"\r\n\r\n" not in data:
            part = sock.recv(65536)
            if not part:
                break
            data += part
        return data.decode("latin-1"), time.monotonic() - start


def test_upload_body_capped_while_streaming(server, client):
    """413 from Content-Length alone, and mid-body for a chunked upload that is never finished."""
    before = store_listing(server.settings.adapters_dir)
    limit = MAX_UPLOAD_MB * 2**20
    head = (f"POST /v1/adapters HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {10 * limit}\r\n\r\n")
    response, _ = _raw_request(server, head, [b"--b\r\n"])
    assert response.startswith("HTTP/1.1 413"), response
    head = ("POST /v1/adapters HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            "Transfer-Encoding: chunked\r\n\r\n")
    part = b'--b\r\nContent-Disposition: form-data; name="weights"; filename="w"\r\n\r\n'
    chunks = [f"{len(part):x}\r\n".encode() + part + b"\r\n"]
    block = b"x" * 65536
    chunks += [f"{len(block):x}\r\n".encode() + block + b"\r\n"] * (2 * limit // len(block))
    response, _ = _raw_request(server, head, chunks)  # the terminating 0-chunk is never sent
    assert response.startswith("HTTP/1.1 413"), response
    assert store_listing(server.settings.adapters_dir) == before
    assert metric_value(client.get("/metrics").text, "loramux_rejections_total", reason="body_too_large") >= 2


def test_request_limits_and_validation(client, base_name):
    def post(**body):
        return client.post("/v1/completions", json={"model": base_name, "prompt": "hi"} | body)

    r = post(max_tokens=300)
    assert r.status_code == 400 and "300" in r.json()["error"]["message"] and "256" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "invalid_request_error"
    r = post(n=5)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = post(stop=["a", "b", "c"])
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
    assert post(echo=True).status_code == 400
    assert post(prompt=[]).status_code == 400
    r = post(prompt=[10**9])
    assert r.status_code == 400 and "token ids" in r.json()["error"]["message"]
    assert post(prompt=[-1]).status_code == 422
    assert post(min_tokens=20, max_tokens=4).status_code == 400
    r = post(temperature="hot")
    assert r.status_code == 422 and r.json()["error"]["param"] == "temperature"
    r = client.post("/v1/chat/completions", json={"model": base_name, "messages": []})
    assert r.status_code == 422 and "messages" in r.json()["error"]["message"]
    r = client.get("/v1/no-such-route")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = client.put("/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_sampling_fields(client, base_name, chat_tokenizer):
    text_prompt = "The quick brown fox"
    ids = chat_tokenizer(text_prompt).input_ids
    by_text = complete(client, base_name, text_prompt, max_tokens=6)
    assert complete(client, base_name, ids, max_tokens=6)["choices"][0]["text"] == by_text["choices"][0]["text"]
    both = complete(client, base_name, [text_prompt, "Another prompt"], max_tokens=6)
    assert [c["index"] for c in both["choices"]] == [0, 1]
    assert both["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert both["usage"]["prompt_tokens"] == len(ids) + len(chat_tokenizer("Another prompt").input_ids)

    sampled = complete(client, base_name, text_prompt, max_tokens=8, temperature=1.0, seed=7, n=3, top_k=50,
                       top_p=0.9)
    assert [c["index"] for c in sampled["choices"]] == [0, 1, 2]
    again = complete(client, base_name, text_prompt, max_tokens=8, temperature=1.0, seed=7, n=3, top_k=50,
                     top_p=0.9)
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in sampled["choices"]]

    long = complete(client, base_name, text_prompt, max_tokens=20, ignore_eos=True, min_tokens=20)
    assert long["usage"]["completion_tokens"] == 20 and long["choices"][0]["finish_reason"] == "length"
    full = long["choices"][0]["text"]
    stop = full[len(full) // 2: len(full) // 2 + 2]
    if stop.strip():
        cut = complete(client, base_name, text_prompt, max_tokens=20, ignore_eos=True, stop=stop)["choices"][0]
        assert cut["finish_reason"] == "stop" and stop not in cut["text"] and full.startswith(cut["text"])


def test_chat_stream_with_n_matches_non_streamed(client, base_name):
    body = {"model": base_name, "messages": [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
            "max_tokens": 6, "temperature": 0.8, "seed": 3, "n": 2}
    whole = client.post("/v1/chat/completions", json=body).json()
    texts = {0: "", 1: ""}
    roles = []
    with client.stream("POST", "/v1/chat/completions", json=body | {"stream": True,
                                                                    "stream_options": {"include_usage": True}}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    for event in events[:-1]:
        assert event["object"] == "chat.completion.chunk" and event["usage"] is None
        choice = event["choices"][0]
        roles += [choice["index"]] if choice["delta"].get("role") == "assistant" else []
        texts[choice["index"]] += choice["delta"].get("content") or ""
    assert roles == [0, 1] and events[-1]["usage"] == whole["usage"]
    assert [texts[0], texts[1]] == [c["message"]["content"] for c in whole["choices"]]


def test_logprobs_formats(client, base_name):
    lp = complete(client, base_name, "Hello", max_tokens=5, logprobs=3)["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 5
    assert all(len(top) <= 3 and max(top.values()) >= lp["token_logprobs"][i] - 1e-5
               for i, top in enumerate(lp["top_logprobs"]))
    assert lp["text_offset"][0] == 0 and lp["text_offset"][1] == len(lp["tokens"][0])
    body = {"model": base_name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
            "temperature": 0, "logprobs": True, "top_logprobs": 2}
    content = client.post("/v1/chat/completions", json=body).json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 4 and all(len(e["top_logprobs"]) == 2 and e["logprob"] <= 0 for e in content)
    assert client.post("/v1/chat/completions", json=body | {"logprobs": False}).status_code == 400


def test_models_list(client, base_name, tiny_adapter_dirs):
    upload(client, tiny_adapter_dirs["a5"], "listed")
    data = client.get("/v1/models").json()["data"]
    assert data[0]["id"] == base_name and data[0]["parent"] is None and data[0]["max_model_len"] == 256
    cards = {m["id"]: m for m in data}
    assert cards["listed"]["parent"] == base_name and cards["listed"]["object"] == "model"


def test_vllm_aliases(server, client, tiny_adapter_dirs, monkeypatch):
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "via-vllm", "lora_path": "a6"})
    assert r.status_code == 200 and r.text.startswith("Success"), r.text
    assert client.get("/v1/adapters/via-vllm").json()["residency"] == "device"
    assert complete(client, "via-vllm", "Hi")["choices"][0]["text"] is not None
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": "../../etc"})
    assert r.status_code == 403 and "allow-listed" in r.json()["error"]["message"]
    r = client.post("/v1/unload_lora_adapter", json={"lora_name": "via-vllm"})
    assert r.status_code == 200 and r.text.startswith("Success")
    assert client.get("/v1/adapters/via-vllm").status_code == 404
    monkeypatch.setattr(server.settings, "vllm_lora_dir", None)
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "a6"})
    assert r.status_code == 404 and "--vllm-lora-dir" in r.json()["error"]["message"]
