"""Prompt and prefix tuning uploads: PEFT's files are accepted as saved; what does not fit the base model, or is
not finite, or is not a causal LM's, is refused with a 4xx naming it."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from adapter_format_helpers import tiny_llama
from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

from adapters_store.errors import AdapterValidationError
from adapters_store.format import ValidationLimits, parse_adapter, read_adapter_dir
from adapters_store.prompt import MAX_VIRTUAL_TOKENS, ModelGeometry
from server.model_runner import kv_geometry

GEOMETRY = ModelGeometry(64, *kv_geometry(tiny_llama()))  # hidden 64, 2 layers, 2 KV heads of 16


@pytest.fixture(scope="module", params=["prompt", "prefix"])
def saved(request, tmp_path_factory) -> tuple[str, bytes, bytes, torch.nn.Module]:
    root = tmp_path_factory.mktemp(request.param)
    cls = PromptTuningConfig if request.param == "prompt" else PrefixTuningConfig
    model = get_peft_model(tiny_llama(), cls(task_type="CAUSAL_LM", num_virtual_tokens=6))
    model.save_pretrained(root)
    return (request.param, *read_adapter_dir(root), model)


def parse(config: bytes, weights: bytes, geometry: ModelGeometry | None = GEOMETRY):
    return parse_adapter("x", config, weights, {}, ValidationLimits(), geometry)


def edit(saved, cfg: dict | None = None, tensor: torch.Tensor | None = None) -> tuple[bytes, bytes]:
    config = json.loads(saved[1]) | (cfg or {})
    weights = safetensors.torch.load(saved[2]) if tensor is None else {"prompt_embeddings": tensor}
    return json.dumps(config).encode(), safetensors.torch.save(weights)


def reject(config: bytes, weights: bytes, *fragments: str, status: int = 400, **kwargs) -> None:
    with pytest.raises(AdapterValidationError) as info:
        parse(config, weights, **kwargs)
    assert info.value.status == status, info.value.message
    for fragment in fragments:
        assert fragment in info.value.message, info.value.message


def test_peft_files_parse_into_virtual_tokens(saved):
    kind, config, weights, model = saved
    adapter = parse(config, weights)
    assert adapter.kind == kind and adapter.virtual.count == 6 and adapter.rank == 0 and not adapter.weights
    table = model.prompt_encoder["default"].embedding.weight.detach()  # [6, 64] or [6, 2 * 2 * 2 * 16]
    if kind == "prompt":
        assert torch.equal(adapter.virtual.tensor, table)
    else:  # layer 1's values, head 0, token 2: PEFT's get_prompt view [n, layers * 2, kv_heads, head_dim]
        assert torch.equal(adapter.virtual.tensor[1, 1, 0, 2], table.view(6, 4, 2, 16)[2, 3, 0])


def test_wrong_width_is_incompatible(saved):
    kind = saved[0]
    width = 64 if kind == "prompt" else 128
    reject(*edit(saved, tensor=torch.zeros(6, width + 8)), f"expected [6, {width}]", status=422)


def test_rows_must_match_num_virtual_tokens(saved):
    reject(*edit(saved, {"num_virtual_tokens": 5}), "has shape [6,", "expected [5,", status=422)


@pytest.mark.parametrize("n", [0, MAX_VIRTUAL_TOKENS + 1, "8", True])
def test_num_virtual_tokens_is_bounded(saved, n):
    reject(*edit(saved, {"num_virtual_tokens": n}), "num_virtual_tokens must be an integer in [1, 512]")


def test_non_finite_and_huge_entries_are_refused(saved):
    good = safetensors.torch.load(saved[2])["prompt_embeddings"]
    nan = good.clone()
    nan[2, 3] = float("nan")
    reject(*edit(saved, tensor=nan), "'prompt_embeddings' has 1 NaN/Inf values")
    huge = good.clone()
    huge[0, 0] = 1e6
    reject(*edit(saved, tensor=huge), "largest |entry| is 1e+06, above the limit of 10000")


def test_other_tensors_task_types_and_layers_are_refused(saved):
    tensors = safetensors.torch.load(saved[2]) | {"extra": torch.zeros(2)}
    reject(saved[1], safetensors.torch.save(tensors), "exactly one tensor, 'prompt_embeddings'")
    reject(*edit(saved, {"task_type": "SEQ_CLS"}), "task_type='SEQ_CLS'")
    reject(*edit(saved, {"num_transformer_submodules": 2}), "decoder-only", status=422)
    if saved[0] == "prefix":
        reject(*edit(saved, {"num_layers": 3}), "num_layers=3, but the base model has 2 layers", status=422)


def test_a_validator_without_the_geometry_refuses(saved):
    reject(saved[1], saved[2], "geometry", status=422, geometry=None)
