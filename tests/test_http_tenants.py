"""Tenants over HTTP: API keys, roles, namespaces (another tenant's adapter is 404), shared adapters, quotas."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest
from http_fixtures import ACME, GLOBEX, KEYS_YAML, OPS, make_settings, thread_server, upload


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tenants")
    keys = tmp / "keys.yaml"
    keys.write_text(KEYS_YAML)
    settings = make_settings(tiny_model_dir, tmp / "store", api_keys_file=keys, max_concurrent_per_tenant=2,
                             log_level="info")
    with thread_server(settings) as srv:
        yield srv


def _client(server, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def acme(server):
    with _client(server, ACME) as c:
        yield c


@pytest.fixture(scope="module")
def globex(server):
    with _client(server, GLOBEX) as c:
        yield c


@pytest.fixture(scope="module")
def ops(server):
    with _client(server, OPS) as c:
        yield c


def _complete(c: httpx.Client, model: str, **params) -> httpx.Response:
    body = {"model": model, "prompt": "Tenant", "max_tokens": 8, "temperature": 0}
    return c.post("/v1/completions", json=body, params=params)


@pytest.mark.parametrize("key", [None, "sk-wrong-0123456789", "Basic abc"])
def test_missing_or_wrong_key_is_401(server, key):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        headers = {} if key is None else {"Authorization": key if key.startswith("Basic") else f"Bearer {key}"}
        for method, path in [("GET", "/v1/models"), ("GET", "/v1/adapters"), ("POST", "/v1/completions"),
                             ("POST", "/v1/chat/completions"), ("GET", "/metrics"), ("GET", "/ready"),
                             ("POST", "/v1/adapters"), ("DELETE", "/v1/adapters/x")]:
            r = c.request(method, path, headers=headers, json={})
            assert r.status_code == 401, (method, path, r.text)
            assert r.json()["error"]["type"] == "authentication_error" and r.headers["www-authenticate"] == "Bearer"
        assert c.get("/health").status_code == 200


def test_other_tenants_adapter_is_404_everywhere(acme, globex, tiny_adapter_dirs):
    r = upload(acme, tiny_adapter_dirs["a0"], "private")
    assert r.status_code == 201 and r.json()["namespace"] == "acme" and not r.json()["shared"]
    acme_text = _complete(acme, "private").json()["choices"][0]["text"]
    assert globex.get("/v1/adapters/private").status_code == 404
    r = _complete(globex, "private")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert globex.post("/v1/adapters/private/load").status_code == 404
    assert globex.delete("/v1/adapters/private").status_code == 404
    assert globex.delete("/v1/adapters/private", params={"purge": "true"}).status_code == 404
    assert "private" not in {a["id"] for a in globex.get("/v1/adapters").json()["data"]}
    assert "private" not in {m["id"] for m in globex.get("/v1/models").json()["data"]}

    r = upload(globex, tiny_adapter_dirs["a1"], "private")  # same id, another tenant: its own, never a 409
    assert r.status_code == 201 and r.json()["namespace"] == "globex"
    globex_text = _complete(globex, "private").json()["choices"][0]["text"]
    assert globex_text != acme_text
    assert _complete(acme, "private").json()["choices"][0]["text"] == acme_text
    assert acme.get("/v1/adapters/private").json()["sha256"] != globex.get("/v1/adapters/private").json()["sha256"]


def test_admin_sees_all_and_addresses_tenants(ops, acme, globex, tiny_adapter_dirs):
    upload(acme, tiny_adapter_dirs["a0"], "private")
    upload(globex, tiny_adapter_dirs["a1"], "private")
    listed = {(a["namespace"], a["id"]) for a in ops.get("/v1/adapters").json()["data"]}
    assert {("acme", "private"), ("globex", "private")} <= listed
    assert {a["namespace"] for a in ops.get("/v1/adapters", params={"tenant": "acme"}).json()["data"]} == {"acme"}
    assert ops.get("/v1/adapters/private").status_code == 404  # not in the admin's own namespace
    assert ops.get("/v1/adapters/private", params={"tenant": "acme"}).json()["namespace"] == "acme"
    assert _complete(ops, "private", tenant="globex").status_code == 200
    assert ops.post("/v1/adapters/private/load", params={"tenant": "acme", "pin": "true"}).json()["pinned"]
    assert ops.delete("/v1/adapters/private", params={"tenant": "acme"}).json()["evicted"]
    r = acme.get("/v1/adapters", params={"tenant": "globex"})
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    assert acme.get("/v1/adapters/private", params={"tenant": "globex"}).status_code == 403


def test_shared_adapters(ops, acme, globex, tiny_adapter_dirs):
    assert upload(acme, tiny_adapter_dirs["a2"], "common", shared=True).status_code == 403
    r = upload(ops, tiny_adapter_dirs["a2"], "common", shared=True)
    assert r.status_code == 201 and r.json()["namespace"] == "shared" and r.json()["shared"]
    for c in (acme, globex):
        assert _complete(c, "common").status_code == 200
        assert "common" in {a["id"] for a in c.get("/v1/adapters").json()["data"]}
        assert "common" in {m["id"] for m in c.get("/v1/models").json()["data"]}
    assert acme.delete("/v1/adapters/common").status_code == 403
    assert acme.delete("/v1/adapters/common", params={"purge": "true"}).status_code == 403
    assert acme.post("/v1/adapters/common/load", params={"pin": "true"}).status_code == 403
    assert acme.post("/v1/adapters/common/load").status_code == 200  # loading is fine, pinning is not

    assert upload(acme, tiny_adapter_dirs["a3"], "common").json()["namespace"] == "acme"  # own hides shared
    assert acme.get("/v1/adapters/common").json()["namespace"] == "acme"
    assert globex.get("/v1/adapters/common").json()["namespace"] == "shared"
    assert ops.delete("/v1/adapters/common", params={"purge": "true", "tenant": "shared"}).json()["purged"]
    assert globex.get("/v1/adapters/common").status_code == 404
    assert acme.get("/v1/adapters/common").json()["namespace"] == "acme"


def test_per_tenant_concurrency_429(server, tiny_adapter_dirs):
    base = server.services.served_model_name
    body = {"model": base, "prompt": "Quota", "max_tokens": 150, "temperature": 0, "ignore_eos": True}

    async def scenario() -> tuple[list[httpx.Response], httpx.Response]:
        async with (httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {ACME}"},
                                      timeout=60) as a,
                    httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {GLOBEX}"},
                                      timeout=60) as g):
            acme_tasks = [asyncio.create_task(a.post("/v1/completions", json=body)) for _ in range(5)]
            await asyncio.sleep(0.1)
            other = await g.post("/v1/completions", json=body | {"max_tokens": 4})
            return await asyncio.gather(*acme_tasks), other

    acme_results, other = asyncio.run(scenario())
    statuses = sorted(r.status_code for r in acme_results)
    assert statuses.count(200) >= 2 and statuses.count(429) >= 2, statuses
    limited = next(r for r in acme_results if r.status_code == 429)
    assert int(limited.headers["retry-after"]) >= 1 and "acme" in limited.json()["error"]["message"]
    assert other.status_code == 200


def test_keys_never_logged(server, acme, caplog):
    with caplog.at_level(logging.DEBUG):
        _complete(acme, server.services.served_model_name)
        with _client(server, "sk-bogus-key-that-must-not-leak") as c:
            assert c.get("/v1/models").status_code == 401
    text = caplog.text
    assert '"tenant":"acme"' in text
    assert ACME not in text and "sk-bogus-key-that-must-not-leak" not in text
