"""PEFT adapter parsing against adapters written by PEFT itself on tiny in-process models."""

from __future__ import annotations

import io
import json
import math
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch
from adapter_format_helpers import (
    K0,
    LIMITS,
    PREFIX,
    Q0,
    Saved,
    assert_matches_peft,
    edit,
    parse,
    reject,
    save_peft,
    target_shapes,
    tiny_gpt2,
    tiny_llama,
)
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key

from adapters_store.config import AdapterConfig, pattern_key
from adapters_store.errors import AdapterValidationError
from adapters_store.format import (
    ModuleShape,
    ValidationLimits,
    adapter_sha256,
    read_adapter_dir,
)

# -- accepted adapters ---------------------------------------------------------------------------------------


def test_parses_peft_llama_adapter_exactly(basic: Saved, llama_shapes: dict[str, ModuleShape]) -> None:
    adapter = parse(basic.config, basic.weights, llama_shapes)
    assert_matches_peft(adapter, basic)
    assert adapter.id == "x"
    assert adapter.sha256 == adapter_sha256(basic.config, basic.weights)
    assert (adapter.rank, adapter.alpha, adapter.use_rslora) == (8, 16.0, False)
    assert adapter.target_modules == ("k_proj", "o_proj", "q_proj", "v_proj")
    assert adapter.size_bytes == len(basic.weights)
    assert list(adapter.weights) == sorted(adapter.weights)
    assert adapter.weights[K0].A.shape == (8, 64) and adapter.weights[K0].B.shape == (32, 8)  # GQA: d_out 32
    assert adapter.weights[Q0].B.shape == (64, 8)
    assert adapter.weights[Q0].scale == 2.0


def test_sha256_definition() -> None:
    import hashlib

    text = hashlib.sha256(b"c").hexdigest() + hashlib.sha256(b"w").hexdigest()
    assert adapter_sha256(b"c", b"w") == hashlib.sha256(text.encode()).hexdigest()
    assert adapter_sha256(b"c", b"w") != adapter_sha256(b"cw", b"")


@pytest.mark.parametrize(
    "lora",
    [
        pytest.param(
            dict(
                r=8,
                lora_alpha=16,
                rank_pattern={"k_proj": 4, r"layers\.1\.self_attn\.q_proj": 16},
                alpha_pattern={"v_proj": 5, "model.layers.0.self_attn.o_proj": 3},
            ),
            id="patterns",
        ),
        pytest.param(
            dict(r=4, lora_alpha=8, rank_pattern={"layers.1.self_attn.q_proj": 12, "q_proj": 2}),
            id="first-pattern-wins",
        ),
        pytest.param(dict(r=16, lora_alpha=8, use_rslora=True), id="rslora"),
        pytest.param(
            dict(
                r=8, lora_alpha=8, use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 32}
            ),
            id="rslora-patterns",
        ),
    ],
)
def test_scales_match_peft(tmp_path: Path, llama_shapes: dict[str, ModuleShape], lora: dict) -> None:
    saved = save_peft(tmp_path, tiny_llama(), target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], **lora)
    adapter = parse(saved.config, saved.weights, llama_shapes)
    assert_matches_peft(adapter, saved)
    assert adapter.rank == max(w.A.shape[0] for w in adapter.weights.values())
    assert adapter.use_rslora == lora.get("use_rslora", False)


def test_overlapping_patterns_resolve_as_peft_reloads_them(
    tmp_path: Path, llama_shapes: dict[str, ModuleShape]
) -> None:
    """PEFT saves the config with sorted keys, so first-match order can differ from training time; PEFT's
    own reload then fails on the shapes, and so does parse_adapter, naming the pattern."""
    saved = save_peft(
        tmp_path,
        tiny_llama(),
        r=4,
        target_modules=["q_proj"],
        rank_pattern={"q_proj": 2, "layers.1.self_attn.q_proj": 12},
    )
    reject(
        saved.config,
        saved.weights,
        llama_shapes,
        "model.layers.1.self_attn.q_proj has tensor rank 2",
        "rank_pattern['layers.1.self_attn.q_proj']=12",
    )


def test_rslora_scale_is_alpha_over_sqrt_r(tmp_path: Path, llama_shapes: dict[str, ModuleShape]) -> None:
    saved = save_peft(tmp_path, tiny_llama(), r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj"])
    adapter = parse(saved.config, saved.weights, llama_shapes)
    assert adapter.weights[Q0].scale == pytest.approx(8 / math.sqrt(16))


@pytest.mark.parametrize(
    "lora",
    [
        pytest.param(dict(target_modules=r".*\.layers\.1\.self_attn\.(q_proj|v_proj)"), id="regex"),
        pytest.param(
            dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1], layers_pattern="layers"),
            id="layers-to-transform",
        ),
        pytest.param(dict(target_modules=["gate_proj", "up_proj"], layers_to_transform=0), id="layer-int"),
        pytest.param(dict(target_modules="all-linear", exclude_modules=["o_proj"]), id="all-linear-exclude"),
    ],
)
def test_module_selection_matches_peft(
    tmp_path: Path, llama_shapes: dict[str, ModuleShape], lora: dict
) -> None:
    saved = save_peft(tmp_path, tiny_llama(), r=4, **lora)
    adapter = parse(saved.config, saved.weights, llama_shapes)
    assert_matches_peft(adapter, saved)


SELECTION_CONFIGS = [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules=["self_attn.q_proj", "mlp"]),
    dict(target_modules=r".*(q|v)_proj"),
    dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[0]),
    dict(target_modules=["q_proj"], layers_to_transform=1, layers_pattern=["blocks", "layers"]),
    dict(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="h"),
    dict(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern=""),
    dict(target_modules=["v_proj"], layers_to_transform=[], layers_pattern="layers"),
    dict(target_modules=["model.layers.0.self_attn.q_proj", "k_proj"], layers_to_transform=[1]),
    dict(target_modules=["q_proj", "k_proj"], exclude_modules=r".*layers\.0.*"),
    dict(target_modules=["q_proj", "k_proj"], exclude_modules=["layers.1.self_attn.k_proj"]),
]


@pytest.mark.parametrize("fields", SELECTION_CONFIGS)
def test_selection_semantics_equal_peft(llama_shapes: dict[str, ModuleShape], fields: dict) -> None:
    ours = AdapterConfig.parse("x", json.dumps({"peft_type": "LORA", **fields}).encode(), LIMITS)
    theirs = LoraConfig(**fields)
    for name in llama_shapes:
        assert ours.selects(name) == bool(check_target_module_exists(theirs, name)), name


@pytest.mark.parametrize(
    "patterns",
    [
        {"q_proj": 1},
        {r"layers\.1\..*": 1, "q_proj": 2},
        {"self_attn.q_proj": 1},
        {"^model.layers.0.self_attn.q_proj": 1},
        {"proj": 1},
    ],
)
def test_pattern_key_equals_peft(llama_shapes: dict[str, ModuleShape], patterns: dict) -> None:
    for name in llama_shapes:
        theirs = get_pattern_key(patterns.keys(), name)
        assert pattern_key(patterns, name) == (theirs if theirs in patterns else None), name


def test_gpt2_conv1d_fan_in_fan_out(tmp_path: Path) -> None:
    base = tiny_gpt2()
    shapes = target_shapes(base)
    assert shapes["transformer.h.0.attn.c_attn"] == ModuleShape(64, 192, fan_in_fan_out=True)
    saved = save_peft(
        tmp_path, base, r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True
    )
    adapter = parse(saved.config, saved.weights, shapes)
    assert_matches_peft(adapter, saved)
    w = adapter.weights["transformer.h.0.attn.c_attn"]
    assert w.A.shape == (4, 64) and w.B.shape == (192, 4)
    assert adapter.target_modules == ("c_attn", "c_fc", "c_proj")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_kept(
    tmp_path: Path, llama_shapes: dict[str, ModuleShape], dtype: torch.dtype
) -> None:
    saved = save_peft(tmp_path, tiny_llama(), dtype=dtype, r=4, target_modules=["q_proj"])
    adapter = parse(saved.config, saved.weights, llama_shapes)
    assert {w.A.dtype for w in adapter.weights.values()} == {dtype}
    assert_matches_peft(adapter, saved)


def test_adapter_name_segment_and_missing_prefix(basic: Saved, llama_shapes: dict[str, ModuleShape]) -> None:
    tensors = safetensors.torch.load(basic.weights)
    renamed = {}
    for i, (key, t) in enumerate(tensors.items()):
        key = key.replace(".weight", ".default.weight")
        renamed[key.removeprefix(PREFIX) if i % 2 else key] = t
    adapter = parse(*edit(basic, tensors=renamed), llama_shapes)
    assert_matches_peft(adapter, basic)


def test_selected_module_without_tensors_is_fine(basic: Saved, llama_shapes: dict[str, ModuleShape]) -> None:
    tensors = {k: v for k, v in safetensors.torch.load(basic.weights).items() if "layers.1" not in k}
    adapter = parse(*edit(basic, tensors=tensors), llama_shapes)
    assert all(name.startswith("model.layers.0.") for name in adapter.weights)


# -- read_adapter_dir ----------------------------------------------------------------------------------------


def test_read_adapter_dir(basic: Saved) -> None:
    config, weights = read_adapter_dir(basic.path)
    assert config == (basic.path / "adapter_config.json").read_bytes()
    assert weights == (basic.path / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("name", ["adapter_model.bin", "model.pt"])
def test_read_adapter_dir_rejects_pickle_without_loading_it(
    tmp_path: Path, basic: Saved, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "adapter_config.json").write_bytes(basic.config)
    buf = io.BytesIO()
    torch.save(safetensors.torch.load(basic.weights), buf)
    (tmp_path / name).write_bytes(buf.getvalue())

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle must never be loaded")

    for module, attr in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, attr, never)
    with pytest.raises(AdapterValidationError) as info:
        read_adapter_dir(tmp_path)
    assert info.value.status == 400 and info.value.code == "pickle_not_allowed"
    assert name in info.value.message and "pickle" in info.value.message


def test_read_adapter_dir_missing_files(tmp_path: Path, basic: Saved) -> None:
    with pytest.raises(AdapterValidationError, match="no adapter_model.safetensors"):
        read_adapter_dir(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(basic.weights)
    with pytest.raises(AdapterValidationError, match="no adapter_config.json"):
        read_adapter_dir(tmp_path)
    with pytest.raises(AdapterValidationError, match="not a directory"):
        read_adapter_dir(tmp_path / "nope")


def test_read_adapter_dir_size_caps_before_reading(basic: Saved) -> None:
    limits = ValidationLimits(max_file_bytes=100)
    with pytest.raises(AdapterValidationError) as info:
        read_adapter_dir(basic.path, limits)
    assert info.value.status == 413
    assert f"{len(basic.weights)} bytes" in info.value.message and "100 bytes" in info.value.message
