"""Prompt and prefix tuning over HTTP: uploaded as PEFT saves them, named by `model` or beside a LoRA adapter in
`adapters`, listed with their kind and virtual tokens, equal to PEFT's forward; bad combinations refused. And
adapters of the embedding and the head (LoRA, trained tokens) uploaded with the copies PEFT saves beside them."""

from __future__ import annotations

import httpx
import openai
import pytest
from http_fixtures import complete, make_settings, metric_value, thread_server, upload
from test_prompt_tuning import greedy, reference
from tiny_models import save_peft_adapters
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPT = [400 + 13 * k for k in range(10)]
MAX_TOKENS = 8
EDGES = {"emb": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head"]),
         "tokens": dict(r=2, lora_alpha=4, target_modules=["q_proj"], trainable_token_indices=[400, 413, 426])}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tiny_adapter_dirs, virtual_dirs, tmp_path_factory):
    settings = make_settings(tiny_model_dir, tmp_path_factory.mktemp("store-virtual"), max_model_len=64)
    with thread_server(settings) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            assert upload(c, tiny_adapter_dirs["a1"], "h-a1").status_code == 201
            for name in ("pt5", "px4"):
                assert upload(c, virtual_dirs[name], f"h-{name}").status_code == 201
            base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
            edges = save_peft_adapters(base, EDGES, tmp_path_factory.mktemp("edges"), seed=3, b_std=0.3)
            for name, path in edges.items():
                assert upload(c, path, f"h-{name}").status_code == 201
        yield srv


def peft_text(tiny_model_dir, tiny_adapter_dirs, dirs, lora, virtual) -> str:
    tokens, _ = greedy(reference(tiny_model_dir, tiny_adapter_dirs, dirs, lora, virtual), PROMPT)
    return AutoTokenizer.from_pretrained(tiny_model_dir).decode(tokens[:MAX_TOKENS])


def text(body: dict) -> str:
    return body["choices"][0]["text"]


def test_virtual_tokens_by_model_and_beside_lora_equal_peft(server, client, base_name, tiny_model_dir,
                                                             tiny_adapter_dirs, virtual_dirs):
    extra = {"ignore_eos": True}
    prefix = complete(client, "h-px4", PROMPT, MAX_TOKENS, **extra)
    assert text(prefix) == peft_text(tiny_model_dir, tiny_adapter_dirs, virtual_dirs, None, "px4")
    assert prefix["usage"]["prompt_tokens"] == len(PROMPT)  # virtual tokens are not the caller's prompt
    both = complete(client, base_name, PROMPT, MAX_TOKENS, adapters=[{"id": "h-a1"}, {"id": "h-pt5"}], **extra)
    assert text(both) == peft_text(tiny_model_dir, tiny_adapter_dirs, virtual_dirs, "a1", "pt5")
    oa = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    streamed = oa.completions.create(model="h-px4", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                     extra_body=extra)
    assert "".join(ch.choices[0].text for ch in streamed) == text(prefix)


def test_listing_shows_kind_and_virtual_tokens(client):
    listed = {a["id"]: (a["kind"], a["virtual_tokens"], a["rank"], a["composable"])
              for a in client.get("/v1/adapters").json()["data"]}
    assert listed == {"h-a1": ("lora", 0, 8, True), "h-pt5": ("prompt", 5, 0, False), "h-px4": ("prefix", 4, 0, False),
                      "h-emb": ("lora", 0, 4, True), "h-tokens": ("lora", 0, 2, False)}


def test_metrics_count_stored_adapters_by_kind(client):
    text = client.get("/metrics").text
    counts = {kind: metric_value(text, "loramux_adapters_stored", kind=kind) for kind in ("lora", "prompt", "prefix")}
    assert counts == {"lora": 3, "prompt": 1, "prefix": 1}


def test_edge_adapters_serve(client, base_name):
    def first_logprob(model: str) -> float:
        return complete(client, model, PROMPT, 1, logprobs=0)["choices"][0]["logprobs"]["token_logprobs"][0]

    base = first_logprob(base_name)
    for name in ("h-emb", "h-tokens"):
        assert abs(first_logprob(name) - base) > 1e-4, name  # applied (exactness: test_edge_lora.py)
    r = client.post("/v1/completions", json={"model": base_name, "prompt": PROMPT, "max_tokens": 2,
                                             "adapters": [{"id": "h-tokens", "weight": 0.5}]})
    assert r.status_code == 400 and "cannot be composed or scaled" in r.text


def test_load_reads_the_host_copy_and_pinning_is_refused(client):
    r = client.post("/v1/adapters/h-px4/load")
    assert r.status_code == 200 and r.json()["residency"] == "host", r.text
    r = client.post("/v1/adapters/h-px4/load", params={"pin": "true"})
    assert r.status_code == 400 and "nothing to pin" in r.text


@pytest.mark.parametrize("adapters, status, fragment", [
    ([{"id": "h-pt5"}, {"id": "h-px4"}], 400, "at most one prompt or prefix tuning adapter per request"),
    ([{"id": "h-px4", "weight": 0.5}], 400, "its virtual tokens take no weight (got 0.5, only 1)"),
])
def test_bad_virtual_combinations(client, base_name, adapters, status, fragment):
    r = client.post("/v1/completions", json={"model": base_name, "prompt": PROMPT, "max_tokens": 2,
                                             "adapters": adapters})
    assert r.status_code == status and fragment in r.text, r.text


def test_the_context_limit_counts_virtual_tokens(client):
    r = client.post("/v1/completions", json={"model": "h-px4", "prompt": PROMPT, "max_tokens": 64 - 10 - 4 + 1})
    assert r.status_code == 400 and "virtual tokens of 'h-px4' (4)" in r.text, r.text
    chat = client.post("/v1/chat/completions", json={"model": "h-pt5", "messages": [{"role": "user", "content": "Hi"}]})
    assert chat.status_code == 200, chat.text  # its default max_tokens leaves room for the virtual tokens
