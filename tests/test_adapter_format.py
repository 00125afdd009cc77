"""PEFT adapter parsing and validation against adapters written by PEFT itself on tiny in-process models."""

from __future__ import annotations

import io
import json
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors.torch
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from adapters_store.errors import AdapterValidationError
from adapters_store.format import (
    LoraAdapter,
    ModuleShape,
    ValidationLimits,
    _LoraConfig,
    _pattern_key,
    adapter_sha256,
    parse_adapter,
    read_adapter_dir,
)

PREFIX = "base_model.model."
Q0 = "model.layers.0.self_attn.q_proj"
K0 = "model.layers.0.self_attn.k_proj"
V0 = "model.layers.0.self_attn.v_proj"
LIMITS = ValidationLimits()


def tiny_llama() -> LlamaForCausalLM:
    """GQA: q_proj is 64 -> 64, k_proj and v_proj are 64 -> 32."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config)


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config)


def target_shapes(model: nn.Module) -> dict[str, ModuleShape]:
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            shapes[name] = ModuleShape(module.in_features, module.out_features)
        elif isinstance(module, Conv1D):
            d_in, d_out = module.weight.shape  # Conv1D weight: [d_in, d_out]
            shapes[name] = ModuleShape(d_in, d_out, fan_in_fan_out=True)
    return shapes


@dataclass
class Saved:
    config: bytes
    weights: bytes
    model: nn.Module  # the PeftModel that wrote them
    path: Path


def save_peft(directory: Path, base: nn.Module, dtype: torch.dtype | None = None, **lora: object) -> Saved:
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, **lora))
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(directory)
    config, weights = read_adapter_dir(directory)
    return Saved(config, weights, model, directory)


def peft_layers(saved: Saved) -> dict[str, LoraLayer]:
    return {
        name.removeprefix(PREFIX): m for name, m in saved.model.named_modules() if isinstance(m, LoraLayer)
    }


def assert_matches_peft(adapter: LoraAdapter, saved: Saved) -> None:
    layers = peft_layers(saved)
    assert sorted(adapter.weights) == sorted(layers)
    for name, w in adapter.weights.items():
        layer = layers[name]
        assert torch.equal(w.A, layer.lora_A["default"].weight.detach())
        assert torch.equal(w.B, layer.lora_B["default"].weight.detach())
        assert w.scale == pytest.approx(layer.scaling["default"], rel=1e-12)


@pytest.fixture(scope="module")
def llama_shapes() -> dict[str, ModuleShape]:
    return target_shapes(tiny_llama())


@pytest.fixture(scope="module")
def basic(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    """r=8, alpha=16 on q, k, v, o of both layers."""
    return save_peft(
        tmp_path_factory.mktemp("basic"),
        tiny_llama(),
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    )


def parse(
    config: bytes, weights: bytes, shapes: dict[str, ModuleShape], limits: ValidationLimits = LIMITS
) -> LoraAdapter:
    return parse_adapter("x", config, weights, shapes, limits)


def edit(saved: Saved, cfg: dict | None = None, tensors: dict | None = None) -> tuple[bytes, bytes]:
    """Re-encode ``saved`` with config keys updated by ``cfg`` and tensors replaced by ``tensors``."""
    config = json.loads(saved.config) | (cfg or {})
    weights = safetensors.torch.load(saved.weights) if tensors is None else tensors
    return json.dumps(config).encode(), safetensors.torch.save(weights)


def reject(
    config: bytes,
    weights: bytes,
    shapes: dict[str, ModuleShape],
    *fragments: str,
    status: int = 400,
    limits: ValidationLimits = LIMITS,
) -> AdapterValidationError:
    with pytest.raises(AdapterValidationError) as info:
        parse(config, weights, shapes, limits)
    err = info.value
    assert err.status == status, err.message
    assert err.message.startswith("adapter 'x': ")
    for fragment in fragments:
        assert fragment in err.message
    return err


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
    ours = _LoraConfig._from_dict("x", {"peft_type": "LORA", **fields}, LIMITS)
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
        assert _pattern_key(patterns, name) == (theirs if theirs in patterns else None), name


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


# -- rejections ----------------------------------------------------------------------------------------------


def _tensors(saved: Saved) -> dict[str, torch.Tensor]:
    return safetensors.torch.load(saved.weights)


def _key(module: str, ab: str) -> str:
    return f"{PREFIX}{module}.lora_{ab}.weight"


@pytest.mark.parametrize(
    ("cfg", "status", "fragments"),
    [
        ({"peft_type": "IA3"}, 400, ["peft_type is 'IA3'", "LORA"]),
        ({"peft_type": None}, 400, ["peft_type is None"]),
        ({"use_dora": True}, 400, ["use_dora=True", "DoRA"]),
        ({"modules_to_save": ["lm_head"]}, 400, ["modules_to_save=['lm_head']"]),
        ({"bias": "all"}, 400, ["bias='all'"]),
        ({"bias": "lora_only"}, 400, ["bias='lora_only'"]),
        ({"lora_bias": True}, 400, ["lora_bias=True"]),
        ({"layer_replication": [[0, 2], [1, 2]]}, 400, ["layer_replication"]),
        ({"r": 128}, 422, ["r=128", "max rank 64"]),
        ({"r": 0}, 400, ["r must be a positive integer, got 0"]),
        ({"r": "8"}, 400, ["r must be a positive integer, got '8'"]),
        ({"rank_pattern": {"q_proj": 100}}, 422, ["rank_pattern['q_proj']=100", "max rank 64"]),
        ({"lora_alpha": "x"}, 400, ["lora_alpha must be a number"]),
        ({"target_modules": None}, 400, ["target_modules is missing"]),
        ({"target_modules": "(q_proj"}, 400, ["target_modules", "not a valid regular expression"]),
        ({"target_modules": "(.*_)+proj"}, 400, ["target_modules entry '(.*_)+proj'", "catastrophic"]),
        ({"rank_pattern": {"(q+)*": 8}}, 400, ["rank_pattern entry '(q+)*'", "catastrophic"]),
        ({"alpha_pattern": {"q" * 600: 8}}, 400, ["alpha_pattern entry is 600 characters", "limit of 512"]),
        ({"r": 4}, 400, ["tensor rank 8", "r=4"]),
        ({"rank_pattern": {"v_proj": 6}}, 400, [V0, "tensor rank 8", "rank_pattern['v_proj']=6"]),
        ({"target_modules": ["q_proj", "v_proj"]}, 400, [K0, "does not select", "['q_proj', 'v_proj']"]),
        (
            {"layers_to_transform": [1]},
            400,
            ["model.layers.0.", "does not select", "layers_to_transform=[1]"],
        ),
        ({"target_modules": r".*\.(q|k|v)_proj"}, 400, ["o_proj", "does not select"]),
    ],
)
def test_rejects_bad_config(
    basic: Saved, llama_shapes: dict[str, ModuleShape], cfg: dict, status: int, fragments: list[str]
) -> None:
    reject(*edit(basic, cfg=cfg), llama_shapes, *fragments, status=status)


def test_rejects_malformed_config(basic: Saved, llama_shapes: dict[str, ModuleShape]) -> None:
    reject(b"{not json", basic.weights, llama_shapes, "adapter_config.json is not valid JSON")
    reject(b"[1, 2]", basic.weights, llama_shapes, "must be a JSON object, got list")
    reject(b"\xff\xfe", basic.weights, llama_shapes, "not valid JSON")


def test_rejects_config_over_cap(basic: Saved, llama_shapes: dict[str, ModuleShape]) -> None:
    limits = ValidationLimits(max_config_bytes=100)
    err = reject(
        basic.config,
        basic.weights,
        llama_shapes,
        f"{len(basic.config)} bytes",
        "limit of 100 bytes",
        status=413,
        limits=limits,
    )
    assert err.code == "adapter_too_large"


def test_rejects_file_over_cap(basic: Saved, llama_shapes: dict[str, ModuleShape]) -> None:
    limits = ValidationLimits(max_file_bytes=1000)
    reject(
        basic.config,
        basic.weights,
        llama_shapes,
        "adapter_model.safetensors",
        f"{len(basic.weights)} bytes",
        "limit of 1000 bytes",
        status=413,
        limits=limits,
    )


def test_rejects_header_over_cap_before_parsing(
    basic: Saved, llama_shapes: dict[str, ModuleShape], monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args: object) -> None:
        raise AssertionError("header must be checked before parsing")

    monkeypatch.setattr(safetensors.torch, "load", never)
    weights = (2**21).to_bytes(8, "little") + b"{}"
    reject(
        basic.config, weights, llama_shapes, "header is 2097152 bytes", "limit of 1048576 bytes", status=413
    )
    small = ValidationLimits(max_header_bytes=64)
    header_len = int.from_bytes(basic.weights[:8], "little")
    reject(
        basic.config,
        basic.weights,
        llama_shapes,
        f"header is {header_len} bytes",
        "limit of 64 bytes",
        status=413,
        limits=small,
    )


@pytest.mark.parametrize(
    ("weights", "fragments"),
    [
        (b"\x01\x02", ["shorter than the 8-byte header length"]),
        ((100).to_bytes(8, "little") + b"{}", ["header length 100 runs past the end of the 10-byte file"]),
        ((7).to_bytes(8, "little") + b"garbage", ["header is not valid JSON"]),
        ((2).to_bytes(8, "little") + b"[]", ["header is not a JSON object"]),
    ],
)
def test_rejects_malformed_safetensors(
    basic: Saved, llama_shapes: dict[str, ModuleShape], weights: bytes, fragments: list[str]
) -> None:
    reject(basic.config, weights, llama_shapes, "adapter_model.safetensors is", *fragments)


def test_rejects_truncated_safetensors(basic: Saved, llama_shapes: dict[str, ModuleShape]) -> None:
    reject(basic.config, basic.weights[:-10], llama_shapes, "adapter_model.safetensors is malformed")


def test_rejects_pickle_weights(basic: Saved, llama_shapes: dict[str, ModuleShape]) -> None:
    for legacy in (False, True):
        buf = io.BytesIO()
        torch.save(_tensors(basic), buf, _use_new_zipfile_serialization=not legacy)
        err = reject(basic.config, buf.getvalue(), llama_shapes, "pickle", "never loaded")
        assert err.code == "pickle_not_allowed"


def test_header_length_starting_like_pickle_is_fine(
    basic: Saved, llama_shapes: dict[str, ModuleShape]
) -> None:
    """A header length whose low byte is 0x80 (pickle's first opcode) must not be mistaken for pickle."""
    tensors = _tensors(basic)
    for pad in range(0, 512, 8):
        weights = safetensors.torch.save(tensors, metadata={"pad": "x" * pad})
        if weights[0] == 0x80:
            break
    assert weights[0] == 0x80
    adapter = parse(basic.config, weights, llama_shapes)
    assert_matches_peft(adapter, basic)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.float8_e4m3fn])
def test_rejects_other_dtypes(basic: Saved, llama_shapes: dict[str, ModuleShape], dtype: torch.dtype) -> None:
    tensors = _tensors(basic)
    tensors[_key(Q0, "A")] = tensors[_key(Q0, "A")].to(dtype)
    name = {torch.float64: "'F64'", torch.int32: "'I32'", torch.float8_e4m3fn: "'F8_E4M3'"}[dtype]
    reject(*edit(basic, tensors=tensors), llama_shapes, _key(Q0, "A"), f"dtype {name}", "F16, BF16, F32")


@pytest.mark.parametrize(("ab", "value"), [("A", float("nan")), ("B", float("inf")), ("B", float("-inf"))])
def test_rejects_non_finite(
    basic: Saved, llama_shapes: dict[str, ModuleShape], ab: str, value: float
) -> None:
    tensors = _tensors(basic)
    tensors[_key(V0, ab)][0, 0] = value
    tensors[_key(V0, ab)][1, 0] = value
    total = tensors[_key(V0, ab)].numel()
    reject(*edit(basic, tensors=tensors), llama_shapes, _key(V0, ab), f"2 NaN/Inf values out of {total}")


def test_rejects_unknown_module(basic: Saved, llama_shapes: dict[str, ModuleShape]) -> None:
    tensors = {k.replace("layers.1.", "layers.7."): v for k, v in _tensors(basic).items()}
    err = reject(
        *edit(basic, tensors=tensors),
        llama_shapes,
        "model.layers.7.self_attn.",
        "not a LoRA-targetable",
        status=422,
    )
    assert err.code == "adapter_incompatible"


def test_rejects_unexpected_key(basic: Saved, llama_shapes: dict[str, ModuleShape]) -> None:
    for extra in (
        f"{PREFIX}model.embed_tokens.lora_embedding_A",
        f"{PREFIX}{Q0}.lora_magnitude_vector.weight",
        f"{PREFIX}{Q0}.lora_B.bias",
        f"{PREFIX}lm_head.modules_to_save.default.weight",
    ):
        tensors = _tensors(basic) | {extra: torch.zeros(8, 4)}
        reject(*edit(basic, tensors=tensors), llama_shapes, f"unexpected tensor '{extra}'")


def test_rejects_duplicate_adapter_names(basic: Saved, llama_shapes: dict[str, ModuleShape]) -> None:
    tensors = _tensors(basic)
    tensors[f"{PREFIX}{Q0}.lora_A.other.weight"] = tensors[_key(Q0, "A")].clone()
    reject(*edit(basic, tensors=tensors), llama_shapes, f"module {Q0} has two lora_A tensors")


@pytest.mark.parametrize(
    ("module", "ab", "shape", "fragments"),
    [
        (K0, "B", (64, 8), [f"lora_B for {K0} has shape [64, 8], expected [32, 8] (d_out x r)"]),  # q's d_out
        (V0, "B", (8, 32), [f"lora_B for {V0} has shape [8, 32]", "(looks transposed)"]),
        (
            Q0,
            "A",
            (64, 8),
            [f"lora_A for {Q0} has shape [64, 8], expected [8, 64] (r x d_in)", "(looks transposed)"],
        ),
        (K0, "A", (8, 32), [f"lora_A for {K0} has shape [8, 32], expected [8, 64] (r x d_in)"]),
        (Q0, "A", (8, 64, 1), [f"lora_A for {Q0} has shape [8, 64, 1], expected a 2-d matrix"]),
    ],
)
def test_rejects_shapes_that_do_not_fit(
    basic: Saved,
    llama_shapes: dict[str, ModuleShape],
    module: str,
    ab: str,
    shape: tuple[int, ...],
    fragments: list[str],
) -> None:
    tensors = _tensors(basic)
    tensors[_key(module, ab)] = torch.randn(shape)
    status = 400 if len(shape) != 2 else 422
    reject(*edit(basic, tensors=tensors), llama_shapes, *fragments, status=status)


def test_rejects_transposed_pair(basic: Saved, llama_shapes: dict[str, ModuleShape]) -> None:
    tensors = _tensors(basic)
    a, b = tensors[_key(K0, "A")], tensors[_key(K0, "B")]
    tensors[_key(K0, "A")], tensors[_key(K0, "B")] = b.T.contiguous(), a.T.contiguous()  # [8, 32], [64, 8]
    reject(*edit(basic, tensors=tensors), llama_shapes, f"lora_A for {K0} has shape [8, 32]", status=422)


def test_rejects_rank_mismatch_between_a_and_b(basic: Saved, llama_shapes: dict[str, ModuleShape]) -> None:
    tensors = _tensors(basic)
    tensors[_key(Q0, "B")] = torch.randn(64, 4)
    reject(
        *edit(basic, tensors=tensors), llama_shapes, f"module {Q0}: lora_A has rank 8", "lora_B has rank 4"
    )


def test_rejects_tensor_rank_over_max(basic: Saved, llama_shapes: dict[str, ModuleShape]) -> None:
    tensors = _tensors(basic)
    tensors[_key(Q0, "A")], tensors[_key(Q0, "B")] = torch.randn(80, 64), torch.randn(64, 80)
    reject(*edit(basic, tensors=tensors), llama_shapes, f"module {Q0} has rank 80", "max rank 64", status=422)
    small = ValidationLimits(max_rank=4)
    reject(
        *edit(basic, cfg={"r": 4, "rank_pattern": {"q_proj": 8}}),
        llama_shapes,
        "rank_pattern['q_proj']=8",
        "max rank 4",
        status=422,
        limits=small,
    )


@pytest.mark.parametrize("missing", ["A", "B"])
def test_rejects_half_pairs(basic: Saved, llama_shapes: dict[str, ModuleShape], missing: str) -> None:
    tensors = _tensors(basic)
    del tensors[_key(V0, missing)]
    have = "B" if missing == "A" else "A"
    reject(
        *edit(basic, tensors=tensors), llama_shapes, f"module {V0} has lora_{have}", f"but no lora_{missing}"
    )


def test_rejects_empty_adapter(basic: Saved, llama_shapes: dict[str, ModuleShape]) -> None:
    reject(*edit(basic, tensors={}), llama_shapes, "holds no LoRA tensors")


def test_error_contract() -> None:
    err = AdapterValidationError("boom")
    assert (err.message, err.status, err.code, str(err)) == ("boom", 400, "invalid_adapter", "boom")
    err = AdapterValidationError("big", status=413, code="adapter_too_large")
    assert (err.status, err.code) == (413, "adapter_too_large")
