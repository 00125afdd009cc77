"""Every adapter rejection: the right error, naming the problem and its numbers."""

from __future__ import annotations

import io
import json
import time

import pytest
import safetensors.torch
import torch
from adapter_format_helpers import (
    K0,
    PREFIX,
    Q0,
    V0,
    Saved,
    assert_matches_peft,
    edit,
    lora_key,
    parse,
    reject,
    saved_tensors,
)

from adapters_store.config import AdapterConfig
from adapters_store.errors import AdapterValidationError
from adapters_store.format import ModuleShape, ValidationLimits


@pytest.mark.parametrize(
    ("cfg", "status", "fragments"),
    [
        ({"peft_type": "IA3"}, 400, ["unexpected tensor", "in an IA3 adapter: expected '<module>.ia3_l'"]),
        ({"peft_type": "P_TUNING"}, 400, ["peft_type is 'P_TUNING'", "'IA3', 'PROMPT_TUNING' and 'PREFIX_TUNING'"]),
        ({"peft_type": None}, 400, ["peft_type is None"]),
        ({"use_dora": True}, 400, ["has no lora_magnitude_vector, which use_dora=true requires"]),
        ({"use_dora": "yes"}, 400, ["use_dora must be true or false"]),
        ({"modules_to_save": ["lm_head"]}, 400, ["modules_to_save entry 'lm_head'", "none here"]),
        ({"modules_to_save": ["norm"]}, 400, ["modules_to_save entry 'norm'"]),
        ({"trainable_token_indices": [3]}, 422, ["needs the base model's embedding"]),
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
        ({"target_modules": "(?=q)q_proj"}, 400, ["target_modules entry '(?=q)q_proj'", "RE2 syntax"]),
        ({"rank_pattern": {r"(q)\1": 8}}, 400, ["rank_pattern entry", "not a valid regular expression"]),
        ({"layers_pattern": "(?<=x)layers", "layers_to_transform": [0]}, 400, ["layers_pattern entry", "RE2"]),
        ({"rank_pattern": {f"p{i}": 8 for i in range(300)}}, 400, ["rank_pattern has 300 patterns", "limit of 256"]),
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
    reject(b"[" * 30_000 + b"]" * 30_000, basic.weights, llama_shapes, "not valid JSON", "nested too deeply")
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
        torch.save(saved_tensors(basic), buf, _use_new_zipfile_serialization=not legacy)
        err = reject(basic.config, buf.getvalue(), llama_shapes, "pickle", "never loaded")
        assert err.code == "pickle_not_allowed"


def test_header_length_starting_like_pickle_is_fine(
    basic: Saved, llama_shapes: dict[str, ModuleShape]
) -> None:
    """A header length whose low byte is 0x80 (pickle's first opcode) must not be mistaken for pickle."""
    tensors = saved_tensors(basic)
    for pad in range(0, 512, 8):
        weights = safetensors.torch.save(tensors, metadata={"pad": "x" * pad})
        if weights[0] == 0x80:
            break
    assert weights[0] == 0x80
    adapter = parse(basic.config, weights, llama_shapes)
    assert_matches_peft(adapter, basic)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.float8_e4m3fn])
def test_rejects_other_dtypes(basic: Saved, llama_shapes: dict[str, ModuleShape], dtype: torch.dtype) -> None:
    tensors = saved_tensors(basic)
    tensors[lora_key(Q0, "A")] = tensors[lora_key(Q0, "A")].to(dtype)
    name = {torch.float64: "'F64'", torch.int32: "'I32'", torch.float8_e4m3fn: "'F8_E4M3'"}[dtype]
    reject(*edit(basic, tensors=tensors), llama_shapes, lora_key(Q0, "A"), f"dtype {name}", "F16, BF16, F32")


@pytest.mark.parametrize(("ab", "value"), [("A", float("nan")), ("B", float("inf")), ("B", float("-inf"))])
def test_rejects_non_finite(
    basic: Saved, llama_shapes: dict[str, ModuleShape], ab: str, value: float
) -> None:
    tensors = saved_tensors(basic)
    tensors[lora_key(V0, ab)][0, 0] = value
    tensors[lora_key(V0, ab)][1, 0] = value
    total = tensors[lora_key(V0, ab)].numel()
    reject(*edit(basic, tensors=tensors), llama_shapes, lora_key(V0, ab), f"2 NaN/Inf values out of {total}")


def test_rejects_unknown_module(basic: Saved, llama_shapes: dict[str, ModuleShape]) -> None:
    tensors = {k.replace("layers.1.", "layers.7."): v for k, v in saved_tensors(basic).items()}
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
        f"{PREFIX}model.embed_tokens.lora_embedding_C",
        f"{PREFIX}{Q0}.lora_magnitude_vector.weight.extra",
        f"{PREFIX}{Q0}.lora_B.bias",
        f"{PREFIX}lm_head.modules_to_save.default.weight",
    ):
        tensors = saved_tensors(basic) | {extra: torch.zeros(8, 4)}
        reject(*edit(basic, tensors=tensors), llama_shapes, f"unexpected tensor '{extra}'")


def test_rejects_duplicate_adapter_names(basic: Saved, llama_shapes: dict[str, ModuleShape]) -> None:
    tensors = saved_tensors(basic)
    tensors[f"{PREFIX}{Q0}.lora_A.other.weight"] = tensors[lora_key(Q0, "A")].clone()
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
    tensors = saved_tensors(basic)
    tensors[lora_key(module, ab)] = torch.randn(shape)
    status = 400 if len(shape) != 2 else 422
    reject(*edit(basic, tensors=tensors), llama_shapes, *fragments, status=status)


def test_rejects_transposed_pair(basic: Saved, llama_shapes: dict[str, ModuleShape]) -> None:
    tensors = saved_tensors(basic)
    a, b = tensors[lora_key(K0, "A")], tensors[lora_key(K0, "B")]
    tensors[lora_key(K0, "A")], tensors[lora_key(K0, "B")] = b.T.contiguous(), a.T.contiguous()  # [8, 32], [64, 8]
    reject(*edit(basic, tensors=tensors), llama_shapes, f"lora_A for {K0} has shape [8, 32]", status=422)


def test_rejects_rank_mismatch_between_a_and_b(basic: Saved, llama_shapes: dict[str, ModuleShape]) -> None:
    tensors = saved_tensors(basic)
    tensors[lora_key(Q0, "B")] = torch.randn(64, 4)
    reject(
        *edit(basic, tensors=tensors), llama_shapes, f"module {Q0}: lora_A has rank 8", "lora_B has rank 4"
    )


def test_rejects_tensor_rank_over_max(basic: Saved, llama_shapes: dict[str, ModuleShape]) -> None:
    tensors = saved_tensors(basic)
    tensors[lora_key(Q0, "A")], tensors[lora_key(Q0, "B")] = torch.randn(80, 64), torch.randn(64, 80)
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
    tensors = saved_tensors(basic)
    del tensors[lora_key(V0, missing)]
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


def test_rejects_magnitudes_no_trained_adapter_has(basic: Saved, llama_shapes: dict[str, ModuleShape]) -> None:
    """lora_alpha 1e30 (the scale of every module) and one B blown up by 1e6 (its delta) are both refused."""
    reject(*edit(basic, cfg={"lora_alpha": 1e30}), llama_shapes, "its scale", "1.25e+29", "limit of 1024")
    reject(*edit(basic, cfg={"alpha_pattern": {"k_proj": 1e9}}), llama_shapes, K0, "its scale", "limit of 1024")
    tensors = saved_tensors(basic)
    tensors[lora_key(V0, "B")] = tensors[lora_key(V0, "B")] * 1e6
    err = reject(*edit(basic, tensors=tensors), llama_shapes, V0, "largest entry of scale * B @ A", "limit of 16")
    assert "e+" in err.message  # the number itself, not just the limit
    small = ValidationLimits(max_delta=1e-9)  # the bound is enforced on the exact product, not only its estimate
    reject(basic.config, basic.weights, llama_shapes, "largest entry of scale * B @ A", limits=small)


def test_pathological_patterns_validate_in_linear_time(basic: Saved, llama_shapes: dict[str, ModuleShape]) -> None:
    """Patterns that make Python's backtracking `re` run for minutes on one module name (nested quantifiers,
    ambiguous alternation) are plain RE2 programs here: validated at once, with PEFT's selection semantics."""
    for pattern in [r"(.|.)*(q|k|v|o)_proj", r"(.*)*(q|k|v|o)_proj", r"((\w+\.)+)+(q|k|v|o)_proj"]:
        start = time.perf_counter()
        adapter = parse(*edit(basic, cfg={"target_modules": pattern}), llama_shapes)
        assert time.perf_counter() - start < 2.0
        assert sorted(adapter.weights) == sorted(parse(basic.config, basic.weights, llama_shapes).weights)
    config = AdapterConfig.parse("x", json.dumps({"peft_type": "LORA", "target_modules": r"(.|.)*xq_proj"}).encode(),
                                 ValidationLimits())
    start = time.perf_counter()  # Python's re would take 2^420 steps on this name
    assert not config.selects("model." + "layers." * 60 + "q_proj")
    assert time.perf_counter() - start < 0.5


@pytest.fixture(scope="module")
def dora(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    from adapter_format_helpers import save_peft, tiny_llama

    return save_peft(tmp_path_factory.mktemp("dora"), tiny_llama(), r=4, lora_alpha=8, use_dora=True,
                     target_modules=["q_proj", "v_proj"])


MAG = f"{PREFIX}{Q0}.lora_magnitude_vector"


def test_dora_parses_with_its_magnitudes(dora: Saved, llama_shapes: dict[str, ModuleShape]) -> None:
    adapter = parse(dora.config, dora.weights, llama_shapes)
    assert adapter.use_dora and adapter.kind == "dora"
    layer = dict(dora.model.named_modules())[f"{PREFIX}{Q0}"]
    assert torch.equal(adapter.weights[Q0].magnitude, layer.lora_magnitude_vector["default"].weight.detach())


@pytest.mark.parametrize("change, status, fragment", [
    (lambda t: t | {MAG: torch.ones(32)}, 422, "has shape [32], expected [64] (d_out)"),
    (lambda t: t | {MAG: torch.full((64,), float("nan"))}, 400, "has 64 NaN/Inf values"),
    (lambda t: t | {MAG: torch.full((64,), 3e4)}, 400, "above the limit of 10000"),
    (lambda t: {k: v for k, v in t.items() if k != MAG}, 400, "no lora_magnitude_vector"),
    (lambda t: {k: v for k, v in t.items() if "q_proj.lora_" not in k or k == MAG}, 400,
     "has lora_magnitude_vector"),
])
def test_rejects_bad_dora(dora: Saved, llama_shapes: dict[str, ModuleShape], change, status, fragment) -> None:
    reject(*edit(dora, tensors=change(saved_tensors(dora))), llama_shapes, fragment, status=status)


def test_rejects_magnitudes_without_use_dora(dora: Saved, llama_shapes: dict[str, ModuleShape]) -> None:
    reject(*edit(dora, cfg={"use_dora": False}), llama_shapes, "does not set use_dora=true")
