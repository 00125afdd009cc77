"""An in-process fake loramux server answering in the HTTP contract's shapes, for the client's unit tests
(tests/test_client_e2e.py runs the client against the real server)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

KEY = "sk-test"
MAX_UPLOAD = 4 << 20


def oai_error(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error", "code": code, "param": None}}
    return JSONResponse(body, status_code=status, headers=headers)


def sse(events: list[Any]) -> StreamingResponse:
    async def gen():
        yield ": ping\r\n\r\n"
        for e in events:
            yield f"data: {json.dumps(e)}\r\n\r\n"
        yield "data: [DONE]\r\n\r\n"

    return StreamingResponse(gen(), media_type="text/event-stream")


class CompletionBody(BaseModel):
    model: str
    prompt: str | list[str] | list[int]
    max_tokens: int = 16
    stream: bool = False


def fake_app() -> FastAPI:
    """Canned, contract-shaped answers; ``app.state.log`` records every request."""
    app = FastAPI()
    app.state.log = []
    app.state.ready = True
    app.state.adapters = {}  # id -> metadata dict

    @app.middleware("http")
    async def record_and_auth(request: Request, call_next):
        app.state.log.append(request)
        if request.url.path != "/health" and request.headers.get("authorization") != f"Bearer {KEY}":
            return oai_error(401, "missing or invalid API key", "invalid_api_key")
        return await call_next(request)

    _generation_routes(app)
    _adapter_routes(app)
    _health_routes(app)
    return app


def _generation_routes(app: FastAPI) -> None:
    def known(model: str) -> bool:
        return model == "base" or model in app.state.adapters

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        if body.model == "busy":
            return oai_error(429, "tenant acme is over its quota", "rate_limited", {"Retry-After": "3"})
        if not known(body.model) and body.model != "broken":
            return oai_error(404, f"adapter '{body.model}' not found", "adapter_not_found")
        pieces = ["Hello", ",", " world"][: body.max_tokens]
        base = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": body.model}
        if body.stream:
            events: list[Any] = [{**base, "choices": [{"index": 0, "text": p, "finish_reason": None}]} for p in pieces]
            if body.model == "broken":
                events.append({"error": {"message": "engine failed mid-stream", "type": "server_error", "code": 500}})
            return sse(events)
        usage = {"prompt_tokens": 2, "completion_tokens": len(pieces), "total_tokens": 2 + len(pieces)}
        return {**base, "choices": [{"index": 0, "text": "".join(pieces), "finish_reason": "length"}], "usage": usage}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        app.state.last_json = body
        base = {"id": "chat-1", "created": 1, "model": body["model"]}
        if body.get("stream"):
            deltas = [{"role": "assistant"}, {"content": "Hi"}, {"content": " there"}]
            return sse([{**base, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": d}]}
                        for d in deltas])
        message = {"role": "assistant", "content": "Hi there"}
        return {**base, "object": "chat.completion", "choices": [{"index": 0, "message": message,
                                                                   "finish_reason": "stop"}]}

    @app.get("/v1/models")
    async def models():
        data = [{"id": "base", "object": "model", "owned_by": "loramux"}]
        data += [{"id": a, "object": "model", "parent": "base"} for a in app.state.adapters]
        return {"object": "list", "data": data}


def _adapter_routes(app: FastAPI) -> None:
    @app.post("/v1/adapters")
    async def upload(request: Request):
        head = request.headers.get("content-length")
        if head and int(head) > MAX_UPLOAD:
            return oai_error(413, f"upload of {head} bytes exceeds the {MAX_UPLOAD}-byte cap", "too_large")
        form = await request.form()
        config, weights = await form["config"].read(), await form["weights"].read()
        app.state.last_form = {"id": form["id"], "shared": form.get("shared"), "config_name": form["config"].filename,
                               "config": config, "weights": weights}
        adapter_id, sha = form["id"], hashlib.sha256(config + weights).hexdigest()
        old = app.state.adapters.get(adapter_id)
        if old and old["sha256"] == sha:
            return JSONResponse(old, status_code=200)
        if old and request.query_params.get("overwrite") != "true":
            return oai_error(409, f"adapter '{adapter_id}' exists with other content", "adapter_conflict")
        shared = form.get("shared") == "true"
        meta = {"id": adapter_id, "namespace": "shared" if shared else "acme", "shared": shared,
                "kind": "lora", "rank": 8, "alpha": 16.0, "target_modules": ["q_proj", "v_proj"],
                "size_bytes": len(weights), "sha256": sha, "residency": "disk", "pinned": False, "in_flight": 0,
                "requests_served": 0, "last_used": None}
        app.state.adapters[adapter_id] = meta
        return JSONResponse(meta, status_code=201)

    @app.get("/v1/adapters")
    async def list_adapters():
        return {"object": "list", "data": list(app.state.adapters.values())}

    def missing(adapter_id: str) -> JSONResponse:
        return oai_error(404, f"adapter '{adapter_id}' not found", "adapter_not_found")

    @app.get("/v1/adapters/{adapter_id}")
    async def get_adapter(adapter_id: str):
        return app.state.adapters.get(adapter_id) or missing(adapter_id)

    @app.post("/v1/adapters/{adapter_id}/load")
    async def load(adapter_id: str, pin: bool = False):
        if adapter_id not in app.state.adapters:
            return missing(adapter_id)
        app.state.adapters[adapter_id].update(residency="device", pinned=pin)
        return app.state.adapters[adapter_id]

    @app.delete("/v1/adapters/{adapter_id}")
    async def evict_or_delete(adapter_id: str, purge: bool = False):
        if adapter_id not in app.state.adapters:
            return missing(adapter_id)
        if purge:
            del app.state.adapters[adapter_id]
            return {"id": adapter_id, "object": "adapter", "deleted": True}
        app.state.adapters[adapter_id].update(residency="disk", pinned=False)
        return Response(status_code=204)


def _health_routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if app.state.ready:
            return {"status": "ready"}
        return oai_error(503, "model is loading", "not_ready", {"Retry-After": "5"})


def sync_transport(app: FastAPI) -> httpx.MockTransport:
    """Serve an ASGI app to the sync client: read the (streamed) request body, answer through ASGITransport."""
    asgi = httpx.ASGITransport(app=app)

    def handle(request: httpx.Request) -> httpx.Response:
        body = request.read()

        async def go() -> httpx.Response:
            forwarded = httpx.Request(request.method, request.url, headers=request.headers, content=body)
            response = await asgi.handle_async_request(forwarded)
            return httpx.Response(response.status_code, headers=response.headers, content=await response.aread())

        return asyncio.run(go())

    return httpx.MockTransport(handle)
