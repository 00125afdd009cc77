"""LoRA on the input embedding and the output head against PEFT, per row in mixed batches (with plain LoRA, base and
composed rows) in every mode; the frozen copies PEFT saves beside them are checked, never served."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
import safetensors.torch
import torch
from engine_harness import MODES, assert_equals_reference, build_engine, collect_together, mode_options
from peft import PeftModel
from test_composition import MAX_TOKENS
from test_composition import peft_greedy as greedy_of
from tiny_models import save_peft_adapters
from transformers import AutoModelForCausalLM

from adapters_store.errors import AdapterValidationError
from adapters_store.format import ValidationLimits, parse_adapter, read_adapter_dir
from server.engine_types import GenerationRequest, WeightedAdapter
from server.errors import InvalidRequest
from server.sampling import SamplingParams

EDGE_SPECS = {  # the tiny chat model ties its head to its embedding: PEFT adapts each on its own
    "emb_r4": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
    "head_r8": dict(r=8, lora_alpha=8, target_modules=["lm_head", "v_proj", "down_proj"]),
    "both_r6": dict(r=6, lora_alpha=12, target_modules=["embed_tokens", "lm_head"]),
    "copy_head": dict(r=4, lora_alpha=8, target_modules=["k_proj"], modules_to_save=["lm_head"]),
    "copy_emb": dict(r=4, lora_alpha=8, target_modules=["o_proj"], modules_to_save=["embed_tokens"]),
    # rows of tokens its requests' prompts hold (rows 5 and 15 of the workload: 485 + 11k, 855 + 11k) and of
    # others; tied, the head's rows of those tokens too
    "tokens": dict(r=2, lora_alpha=4, target_modules=["up_proj"],
                   trainable_token_indices=[485, 496, 507, 518, 855, 866, 877, 10, 20]),
}
MIXES = {"mix_emb": (("emb_r4", "a1"), (0.6, 0.4)), "mix_edges": (("both_r6", "head_r8"), (0.5, 0.7))}


@pytest.fixture(scope="module")
def edge_dirs(tiny_model_dir, tmp_path_factory):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return save_peft_adapters(base, EDGE_SPECS, tmp_path_factory.mktemp("edges"), seed=7, b_std=0.3)


REPLACING = ("copy_head", "copy_emb", "tokens")  # each in a PeftModel of its own (PEFT cannot stack them on LoRA)


@pytest.fixture(scope="module")
def peft(tiny_model_dir, tiny_adapter_dirs, edge_dirs) -> dict[str | None, tuple[PeftModel, str | None]]:
    """name -> (the PEFT model serving it, the adapter to set on it; None: the base model)."""
    dirs = {k: v for k, v in edge_dirs.items() if k not in REPLACING} | {"a1": tiny_adapter_dirs["a1"]}
    names = list(dirs)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), dirs[names[0]],
                                      adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(dirs[name], adapter_name=name)
    for mix, (adapters, weights) in MIXES.items():
        model.add_weighted_adapter(list(adapters), list(weights), mix, combination_type="cat")
    refs = {name: (model.eval(), name) for name in [*names, *MIXES]} | {None: (model, None)}
    for name in REPLACING:
        own = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), edge_dirs[name])
        refs[name] = (own.eval(), "default")
    return refs


def peft_greedy(refs: dict, what: str | None, prompt: list[int]) -> tuple[list[int], list[float]]:
    model, adapter = refs[what]
    return greedy_of(model, adapter, prompt)


@pytest.fixture(scope="module", params=MODES)
def engine(request, tiny_model_dir, tiny_adapter_dirs, edge_dirs, tmp_path_factory):
    eng, records = build_engine(tiny_model_dir, edge_dirs | {"a1": tiny_adapter_dirs["a1"]},
                                tmp_path_factory.mktemp("store"), **mode_options(request.param), max_batch_size=24,
                                max_model_len=64, max_tokens_per_step=32, merge_share=0.4)
    yield eng, records
    eng.shutdown(drain_timeout=5)


def make_request(prompt: list[int], records: dict, what: str | None) -> GenerationRequest:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=0)
    if what in MIXES:
        mix = tuple(WeightedAdapter(records[a], w) for a, w in zip(*MIXES[what], strict=True))
        return GenerationRequest(uuid.uuid4().hex, tuple(prompt), params, None, mix=mix)
    return GenerationRequest(uuid.uuid4().hex, tuple(prompt), params, None if what is None else records[what])


def test_edge_lora_equals_peft_in_a_mixed_batch(engine, peft):
    eng, records = engine
    whats = [*EDGE_SPECS, "a1", None, *MIXES] * 2 + ["a1"] * 14 + ["head_r8"] * 4  # auto merges a1 (16 of 38)
    work = [(what, [300 + 37 * i + 11 * k for k in range(6 + i % 5)]) for i, what in enumerate(whats)]
    results = asyncio.run(collect_together(eng, [make_request(p, records, w) for w, p in work]))
    assert_equals_reference(work, results, lambda what, prompt: peft_greedy(peft, what, prompt))
    if eng.stats().mode == "auto":  # the edge rows ran beside the merged a1
        assert eng.stats().step_seconds.get("hybrid", 0) > 0, eng.stats().step_seconds
    slots = eng.runner.slots
    for name in EDGE_SPECS:  # never folded into the weights, whatever the mode
        assert not slots.mergeable(slots.slot_of(records[name].identity)), name


def test_edges_change_the_output(peft):
    prompt = [485 + 11 * k for k in range(8)]
    base = peft_greedy(peft, None, prompt)[1]
    for name in EDGE_SPECS:
        assert peft_greedy(peft, name, prompt)[1] != base, name


def _parse(config: bytes, weights: bytes, runner):
    return parse_adapter("x", config, weights, runner.lora.shapes, ValidationLimits(), runner.geometry)


def test_the_saved_base_copies_are_checked(engine, edge_dirs):
    eng, _ = engine
    config, weights = read_adapter_dir(edge_dirs["both_r6"])
    tensors = safetensors.torch.load(weights)
    copies = [k for k in tensors if k.endswith("base_layer.weight")]
    assert len(copies) == 2  # PEFT saves the frozen embedding and head beside edge LoRA
    adapter = _parse(config, weights, eng.runner)
    assert sorted(adapter.edges) == ["embed", "head"] and not adapter.weights
    assert adapter.target_modules == ("embed_tokens", "lm_head")
    changed = dict(tensors)
    changed[copies[0]] = changed[copies[0]].clone()
    changed[copies[0]][5] *= 1.5  # a trained row
    with pytest.raises(AdapterValidationError, match=r"is not the base model's .*1 of \d+ rows differ \(row 5"):
        _parse(config, safetensors.torch.save(changed), eng.runner)
    resized = dict(tensors) | {copies[0]: torch.zeros(tensors[copies[0]].shape[0] + 2, tensors[copies[0]].shape[1])}
    with pytest.raises(AdapterValidationError, match="a resized vocabulary is not supported") as info:
        _parse(config, safetensors.torch.save(resized), eng.runner)
    assert info.value.status == 422
    no_copies = {k: v for k, v in tensors.items() if k not in copies}  # save_embedding_layers=False
    assert sorted(_parse(config, safetensors.torch.save(no_copies), eng.runner).edges) == ["embed", "head"]


def test_wrong_edge_shapes_and_keys_are_refused(engine, edge_dirs):
    eng, _ = engine
    config, weights = read_adapter_dir(edge_dirs["emb_r4"])
    tensors = safetensors.torch.load(weights)
    key = next(k for k in tensors if k.endswith("lora_embedding_A"))
    short = dict(tensors) | {key: tensors[key][:, :-3].contiguous()}
    with pytest.raises(AdapterValidationError, match=r"expected \[4, \d+\] \(r x d_in\)"):
        _parse(config, safetensors.torch.save(short), eng.runner)
    renamed = {k.replace("lora_embedding_A", "lora_A.weight"): v for k, v in tensors.items()}
    with pytest.raises(AdapterValidationError, match="takes lora_embedding_A/B"):
        _parse(config, safetensors.torch.save(renamed), eng.runner)
    dora = json.dumps(json.loads(config) | {"use_dora": True}).encode()
    with pytest.raises(AdapterValidationError):
        _parse(dora, weights, eng.runner)


def test_replacing_adapters_are_not_composed(engine):
    eng, records = engine
    for name in REPLACING:
        req = GenerationRequest(uuid.uuid4().hex, (300, 301), SamplingParams(max_tokens=2), None,
                                mix=(WeightedAdapter(records[name], 0.5), WeightedAdapter(records["a1"], 0.5)))
        with pytest.raises(InvalidRequest, match=f"'{name}' replaces rows or a copy of the embedding or the head"):
            asyncio.run(_generate(eng, req))
    assert eng.stats().waiting == 0


async def _generate(eng, req):
    await eng.generate(req)


def test_bad_replacements_are_refused(engine, edge_dirs):
    eng, _ = engine
    config, weights = read_adapter_dir(edge_dirs["tokens"])
    raw, vocab = json.loads(config), eng.runner.geometry.vocab

    def refused(change: dict, fragment: str, tensors: dict | None = None) -> None:
        body = json.dumps(raw | change).encode()
        with pytest.raises(AdapterValidationError, match=fragment):
            _parse(body, weights if tensors is None else safetensors.torch.save(tensors), eng.runner)

    refused({"trainable_token_indices": [1, vocab]}, rf"ids outside \[0, {vocab}\)")
    refused({"trainable_token_indices": [5, 5]}, "repeated ids")
    refused({"trainable_token_indices": {"lm_head": [5]}}, "only the input embedding's tokens are servable")
    refused({"trainable_token_indices": [485, 496]}, r"expected \[2, 64\]")  # 9 rows saved
    head_config, head_weights = read_adapter_dir(edge_dirs["head_r8"])  # LoRA on the head, and a copy of it
    tensors = safetensors.torch.load(head_weights)
    copy = tensors["base_model.model.lm_head.base_layer.weight"].clone()
    body = json.dumps(json.loads(head_config) | {"modules_to_save": ["lm_head"]}).encode()
    with pytest.raises(AdapterValidationError, match="the head takes one of .* this adapter gives it LoRA and "
                       "modules_to_save"):
        _parse(body, safetensors.torch.save(tensors | {"base_model.model.lm_head.weight": copy}), eng.runner)
