"""Composed requests (`adapters`) over HTTP: the OpenAI package, the Python client, the CLI, and bad inputs."""

from __future__ import annotations

import httpx
import openai
import pytest
from http_fixtures import complete, make_settings, thread_server, upload
from test_dora_engine import SPECS
from test_ia3 import IA3_LLAMA, save_ia3
from tiny_models import save_peft_adapters
from transformers import AutoModelForCausalLM

from client import LoramuxClient
from client.cli import build_parser

PROMPT = [400 + 13 * k for k in range(10)]
MIX = [{"id": "c-a1", "weight": 0.7}, {"id": "c-a4", "weight": 0.3}]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tiny_adapter_dirs, tmp_path_factory):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    dora = save_peft_adapters(base, {"dora": SPECS["d1"]}, tmp_path_factory.mktemp("dora"), b_std=0.5)["dora"]
    settings = make_settings(tiny_model_dir, tmp_path_factory.mktemp("store-mix"), max_adapters_per_request=3)
    with thread_server(settings) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            for name in ("a1", "a4", "a0", "a2"):
                assert upload(c, tiny_adapter_dirs[name], f"c-{name}").status_code == 201
            assert upload(c, dora, "c-dora").status_code == 201
            (ia3, _), = save_ia3(base, {"ia3": IA3_LLAMA["ia3_ff"]}, tmp_path_factory.mktemp("ia3")).values()
            assert upload(c, ia3, "c-ia3").status_code == 201
        yield srv


def tokens(body: dict) -> str:
    return body["choices"][0]["text"]


def test_composition_through_every_client(server, client, base_name):
    mixed = tokens(complete(client, base_name, PROMPT, adapters=MIX))
    singles = {tokens(complete(client, name, PROMPT)) for name in ("c-a1", "c-a4", base_name)}
    assert mixed not in singles  # the composition is neither of its adapters, nor the base model

    oa = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    c = oa.completions.create(model=base_name, prompt=PROMPT, max_tokens=12, temperature=0,
                              extra_body={"adapters": MIX})
    assert c.choices[0].text == mixed and c.model == base_name
    streamed = oa.completions.create(model=base_name, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                     extra_body={"adapters": MIX})
    assert "".join(ch.choices[0].text for ch in streamed) == mixed
    with LoramuxClient(server.url) as lm:
        assert lm.complete(base_name, PROMPT, max_tokens=12, temperature=0,
                           adapters={"c-a1": 0.7, "c-a4": 0.3}).text == mixed
        chat = lm.chat(base_name, [{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0,
                       adapters=[("c-a1", 0.7), ("c-a4", 0.3)])
        assert chat.text


def test_one_adapter_at_weight_one_is_the_plain_request(client, base_name):
    plain = tokens(complete(client, "c-a1", PROMPT))
    assert tokens(complete(client, base_name, PROMPT, adapters=[{"id": "c-a1"}])) == plain
    assert tokens(complete(client, base_name, PROMPT, adapters=[{"id": "c-a1", "weight": 0.5}])) != plain


@pytest.mark.parametrize("model, adapters, status, fragment", [
    ("c-a1", MIX, 400, "must name the base model"),
    (None, [{"id": "nope", "weight": 1}], 404, "adapters[0]: the adapter 'nope' does not exist"),
    (None, [{"id": "c-a1", "weight": 9}], 422, "less than or equal to 8"),
    (None, [{"id": "c-a1", "weight": 0.5}, {"id": "c-a1", "weight": 0.5}], 400, "names an adapter twice"),
    (None, [{"id": f"c-{n}", "weight": 0.2} for n in ("a1", "a4", "a0", "a2")], 400, "at most 3 may be composed"),
    (None, [], 422, "at least 1 item"),
    (None, [{"id": "c-dora", "weight": 0.5}], 400, "'c-dora' is a DoRA adapter, which cannot be composed"),
    (None, [{"id": "c-ia3", "weight": 1}, {"id": "c-a1", "weight": 1}], 400, "'c-ia3' is an IA3 adapter"),
])
def test_bad_compositions(client, base_name, model, adapters, status, fragment):
    body = {"model": model or base_name, "prompt": PROMPT, "max_tokens": 2, "adapters": adapters}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    assert fragment in r.text
    assert client.get("/health").json()["status"] == "ok"


def test_cli_parses_adapter_weights():
    args = build_parser().parse_args(["complete", "base", "hi", "--adapter", "legal=0.7", "--adapter", "ns/fr"])
    assert args.adapter == [("legal", 0.7), ("ns/fr", 1.0)]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["complete", "base", "hi", "--adapter", "legal=much"])


def test_listing_shows_each_kind(client, base_name):
    kinds = {a["id"]: a["kind"] for a in client.get("/v1/adapters").json()["data"]}
    assert kinds == {"c-a1": "lora", "c-a4": "lora", "c-a0": "lora", "c-a2": "lora", "c-dora": "dora", "c-ia3": "ia3"}
    def first_logprob(model: str) -> float:
        return complete(client, model, PROMPT, logprobs=0)["choices"][0]["logprobs"]["token_logprobs"][0]

    assert abs(first_logprob("c-dora") - first_logprob(base_name)) > 1e-3  # the DoRA adapter is applied
    assert abs(first_logprob("c-ia3") - first_logprob(base_name)) > 2e-4  # its vectors are near 1
