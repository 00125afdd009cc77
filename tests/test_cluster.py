"""Cluster mode on a local Ray instance: 2 engine replicas (one thread each) behind the ingress.

Outputs equal the single server's; tenants stay isolated through the ingress; uploads, purges and
evictions reach both replicas; requests go to replicas that hold their adapter and a hot adapter spreads;
a replica killed mid-traffic fails its requests cleanly and comes back. Ray starts once for the module.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import pytest
from cluster_fixtures import Cluster, local_cluster
from http_fixtures import ACME, GLOBEX, KEYS_YAML, OPS, make_settings, thread_server, upload

pytestmark = pytest.mark.slow
ADAPTERS = [f"a{i}" for i in range(8)]
PROMPTS = ["The capital of France is", "Once upon a time", "def add(a, b):", "Hello"]


@pytest.fixture(scope="module")
def seeded(tiny_adapter_dirs):
    return next(iter(tiny_adapter_dirs.values())).parent


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir, seeded):
    keys = tmp_path_factory.mktemp("cluster-keys") / "keys.yaml"
    keys.write_text(KEYS_YAML)
    with local_cluster(tiny_model_dir, tmp_path_factory.mktemp("cluster-store"), seed_adapters=seeded,
                       api_keys_file=keys, served_model_name="model") as c:
        yield c


COMPOSED = {"adapters": [{"id": "a1", "weight": 0.7}, {"id": "a6", "weight": 0.3}]}


@pytest.fixture(scope="module")
def traffic() -> list[tuple[str, str, dict]]:
    """Mixed traffic: every adapter, the base model and a composition of two, several prompts."""
    plain = [(model, PROMPTS[i % len(PROMPTS)], {}) for i, model in enumerate(ADAPTERS * 2 + ["model"] * 3)]
    return plain + [("model", PROMPTS[0], COMPOSED), ("model", PROMPTS[3], COMPOSED)]


@pytest.fixture(scope="module")
def single_server_choices(tmp_path_factory, tiny_model_dir, seeded, traffic) -> list[dict]:
    """The same requests, one at a time, through the single server."""
    settings = make_settings(tiny_model_dir, tmp_path_factory.mktemp("single-store"), seed_adapters=seeded,
                             served_model_name="model")
    with thread_server(settings) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        return [choice(c.post("/v1/completions", json=body(m, p, **extra))) for m, p, extra in traffic]


def choice(r: httpx.Response) -> dict:
    """Text and per-token logprobs of a completion's only choice (logprobs show that the adapter is applied:
    the tiny model's greedy text barely moves with one)."""
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    return {"text": c["text"], "logprobs": c["logprobs"]["token_logprobs"]}


def body(model: str, prompt: str, max_tokens: int = 8, **extra) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "logprobs": 0, **extra}


def complete(client: httpx.Client, model: str, prompt: str, **extra) -> str:
    r = client.post("/v1/completions", json=body(model, prompt, **extra))
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


async def concurrently(cluster: Cluster, bodies: list[dict], key: str = OPS) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=cluster.url, timeout=120,
                                 headers={"Authorization": f"Bearer {key}"}) as c:
        return await asyncio.gather(*(c.post("/v1/completions", json=b) for b in bodies))


def listing(cluster: Cluster, key: str = OPS, **params) -> dict[str, dict]:
    with cluster.client(Authorization=f"Bearer {key}") as c:
        return {a["id"]: a for a in c.get("/v1/adapters", params=params).json()["data"]}


def test_outputs_equal_the_single_servers(cluster, traffic, single_server_choices):
    responses = asyncio.run(concurrently(cluster, [body(m, p, **extra) for m, p, extra in traffic]))
    got = [choice(r) for r in responses]
    assert [g["text"] for g in got] == [s["text"] for s in single_server_choices]
    for g, s in zip(got, single_server_choices, strict=True):  # batches differ: logprobs agree to float noise
        assert g["logprobs"] == pytest.approx(s["logprobs"], abs=1e-4)
    replicas = {r.headers["x-loramux-replica"] for r in responses}
    assert replicas <= {rep.replica for rep in cluster.reports()}
    with cluster.client(Authorization=f"Bearer {OPS}") as c:  # streamed: the same text, chunk by chunk
        streamed = c.post("/v1/completions", json=body(*traffic[1][:2], stream=True)).text
    chunks = [line.removeprefix("data: ") for line in streamed.splitlines() if line.startswith("data: {")]
    assert "".join(json.loads(x)["choices"][0]["text"] for x in chunks) == single_server_choices[1]["text"]
    assert streamed.rstrip().endswith("data: [DONE]")


def test_tenants_stay_isolated_through_the_ingress(cluster, tiny_adapter_dirs):
    with cluster.client(Authorization=f"Bearer {ACME}") as acme, \
            cluster.client(Authorization=f"Bearer {GLOBEX}") as globex:
        r = upload(acme, tiny_adapter_dirs["a3"], "private")
        assert r.status_code == 201, r.text
        assert complete(acme, "private", PROMPTS[0])
        r = globex.post("/v1/completions", json=body("private", PROMPTS[0]))
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert "private" not in listing(cluster, GLOBEX) and "private" in listing(cluster, ACME)
        assert globex.delete("/v1/adapters/private").status_code == 404
        assert globex.post("/v1/completions", json=body("a0", PROMPTS[0])).status_code == 200  # shared ones
    assert "private" in listing(cluster, OPS, tenant="acme")


def test_an_upload_spreads_to_both_replicas_when_hot_and_a_purge_reaches_both(cluster, tiny_adapter_dirs):
    with cluster.client(Authorization=f"Bearer {OPS}") as c:
        assert upload(c, tiny_adapter_dirs["a5"], "hot", shared="true").status_code == 201
    # long enough that the requests overlap: the router spreads on requests in flight, not on arrivals
    responses = asyncio.run(concurrently(cluster, [body("hot", p, max_tokens=96) for p in PROMPTS * 3]))
    assert all(r.status_code == 200 for r in responses)
    served_by = {r.headers["x-loramux-replica"] for r in responses}
    assert len(served_by) == 2, f"the hot adapter stayed on {served_by}"
    texts = {(r.request.content, r.json()["choices"][0]["text"]) for r in responses}
    assert len(texts) == len(PROMPTS)  # each prompt got one text, whichever replica ran it
    held = listing(cluster)["hot"]["replicas"]
    assert {h["replica"] for h in held} == served_by
    with cluster.client(Authorization=f"Bearer {OPS}") as c:
        assert c.delete("/v1/adapters/hot", params={"purge": "true"}).status_code == 200
        assert c.post("/v1/completions", json=body("hot", PROMPTS[0])).status_code == 404
    for report in cluster.reports():  # the eviction returned once both replicas applied it
        assert not [i for i in report.held if i.id == "hot"], report.replica


def test_requests_go_to_a_replica_that_holds_their_adapter(cluster):
    names = ADAPTERS[:4]
    with cluster.client(Authorization=f"Bearer {OPS}") as c:
        for name in names:  # warm-up: each adapter lands somewhere
            complete(c, name, PROMPTS[0])
        time.sleep(0.5)  # Ray learns the replicas' adapters from their pushes
        loads_before = sum(r.counters["loads_device"] for r in cluster.reports())
        holders = {n: {h["replica"] for h in listing(cluster)[n].get("replicas", [])} for n in names}
        landed = []
        for _ in range(5):
            for name in names:
                r = c.post("/v1/completions", json=body(name, PROMPTS[1], max_tokens=2))
                landed.append((name, r.headers["x-loramux-replica"]))
    loads = sum(r.counters["loads_device"] for r in cluster.reports()) - loads_before
    assert all(replica in holders[name] for name, replica in landed), (holders, landed)
    assert loads <= 1, f"{loads} adapter loads for {len(landed)} requests over {len(names)} held adapters"


def test_a_killed_replica_fails_its_requests_cleanly_and_comes_back(cluster):
    before = {r.replica: r.pid for r in cluster.reports()}
    victim = sorted(before)[0]

    async def traffic_with_a_kill() -> list[httpx.Response | Exception]:
        async with httpx.AsyncClient(base_url=cluster.url, timeout=60,
                                     headers={"Authorization": f"Bearer {OPS}"}) as c:
            tasks = [asyncio.ensure_future(c.post("/v1/completions", json=body(ADAPTERS[i % 8], PROMPTS[i % 4],
                                                                               max_tokens=48)))
                     for i in range(12)]
            await asyncio.sleep(1.0)
            os.kill(before[victim], signal.SIGKILL)
            return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=90)

    results = asyncio.run(traffic_with_a_kill())  # no request hangs
    statuses = [r.status_code if isinstance(r, httpx.Response) else repr(r) for r in results]
    assert all(s in (200, 503) for s in statuses), statuses
    for r in results:
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "engine_stopped"
    with cluster.client(Authorization=f"Bearer {OPS}") as c:  # the other replica keeps serving
        assert complete(c, "a1", PROMPTS[0])
    survivors = set(before) - {victim}
    names = cluster.wait_replicas(2, timeout=120, exclude=frozenset({victim}))
    assert survivors < set(names)  # Ray started a new replica beside the survivor
    with cluster.client(Authorization=f"Bearer {OPS}") as c:
        assert complete(c, "a2", PROMPTS[2])
