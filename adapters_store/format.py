"""PEFT LoRA adapter format: data types, parsing and validation.

An adapter is exactly what PEFT's ``save_pretrained`` writes: ``adapter_config.json``
and ``adapter_model.safetensors`` with keys such as
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` (A: [r, d_in])
and ``...lora_B.weight`` (B: [d_out, r]); a DoRA adapter (``use_dora``) adds
``...lora_magnitude_vector`` (m: [d_out]) for each module. Pickle files are never loaded.

The config's rules (which modules, which rank and scale) live in ``config.py``.
"""

from __future__ import annotations

import hashlib
import re
import time
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch

from adapters_store.config import (
    CONFIG_FILE,
    INCOMPATIBLE,
    AdapterConfig,
    ValidationLimits,
    check_deadline,
    check_size,
    invalid,
    load_json,
    read_config,
)
from adapters_store.edges import EDGES, edge_modules, without_base_copies
from adapters_store.ia3 import parse_ia3
from adapters_store.lora_checks import check_magnitude, check_shapes, dora_magnitude, show
from adapters_store.prompt import PROMPT_TYPES, ModelGeometry, VirtualTokens, parse_prompt
from adapters_store.replaced import Replacements, take_replacements

WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
ALLOWED_DTYPES = ("F16", "BF16", "F32")

# PEFT keys: [base_model.model.]<module>.lora_{A,B}[.<adapter name>].weight, and for DoRA
# [base_model.model.]<module>.lora_magnitude_vector[.<adapter name>][.weight]
_KEY_RE = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?:(?P<ab>[AB])(?:\.(?P<name>[^.]+))?\.weight"
    r"|embedding_(?P<eab>[AB])(?:\.(?P<ename>[^.]+))?"
    r"|(?P<m>magnitude_vector)(?:\.(?P<mname>[^.]+?))??(?:\.weight)?)$"
)


@dataclass(frozen=True)
class ModuleShape:
    """A LoRA-targetable projection of the base model: y = W x with W [d_out, d_in]."""

    d_in: int
    d_out: int
    fan_in_fan_out: bool = False  # GPT-2 Conv1D: weight stored [d_in, d_out]


@dataclass(frozen=True, eq=False)
class LoraWeights:
    """One module's update: delta_W = scale * B @ A."""

    A: torch.Tensor  # [r, d_in], CPU, dtype as in the file
    B: torch.Tensor  # [d_out, r]
    scale: float  # lora_alpha / r, or lora_alpha / sqrt(r) for rsLoRA (rank/alpha patterns honoured)
    magnitude: torch.Tensor | None = None  # DoRA: [d_out]; the module computes m / ||W + scale·B·A||_row ⊙ (W + ...)x
    ia3: torch.Tensor | None = None  # IA3 (then A and B have rank 0): [d_out] output scales, or [d_in] input ones
    ia3_input: bool = False  # IA3 on a feed-forward module: x ⊙ l enters the projection


@dataclass(frozen=True, eq=False)
class LoraAdapter:
    """A validated adapter, bound to the base model it was checked against."""

    id: str
    sha256: str  # adapter_sha256(config_bytes, weights_bytes)
    rank: int  # max r over modules
    alpha: float  # config lora_alpha
    use_rslora: bool
    target_modules: tuple[str, ...]  # short names present, sorted, e.g. ("k_proj", "q_proj")
    weights: Mapping[str, LoraWeights]  # base-model module name -> weights, sorted by name
    size_bytes: int  # weights file size
    use_dora: bool = False  # every module has a magnitude vector
    peft_type: str = "LORA"  # or "IA3", "PROMPT_TUNING", "PREFIX_TUNING"
    virtual: VirtualTokens | None = None  # prompt or prefix tuning (then `weights` is empty)
    # LoRA on the input embedding ("embed": A [r, vocab], B [hidden, r]) and the output head ("head": A [r, hidden],
    # B [vocab, r]); such an adapter is never merged
    edges: Mapping[str, LoraWeights] = field(default_factory=lambda: types.MappingProxyType({}))
    replaces: Replacements | None = None  # modules_to_save copies and trainable tokens of the embedding and head

    @property
    def composable(self) -> bool:
        """Its effect is a delta that may be weighted: plain LoRA (on any module), nothing replaced."""
        return self.kind == "lora" and self.replaces is None

    @property
    def kind(self) -> str:
        """lora, dora, ia3, prompt (prompt tuning) or prefix (prefix tuning)."""
        if self.virtual is not None:
            return self.virtual.kind
        return "ia3" if self.peft_type == "IA3" else "dora" if self.use_dora else "lora"


def _ia3_weights(shape: ModuleShape, vector: torch.Tensor, is_input: bool) -> LoraWeights:
    """An IA3 module as weights of rank 0 (no side path) plus its vector."""
    return LoraWeights(A=torch.zeros(0, shape.d_in), B=torch.zeros(shape.d_out, 0), scale=1.0, ia3=vector,
                       ia3_input=is_input)


def adapter_sha256(config_bytes: bytes, weights_bytes: bytes) -> str:
    """Content identity: sha256 of the ASCII text ``hex(sha256(config)) + hex(sha256(weights))``.

    From a shell: ``printf %s%s $(sha256sum c | cut -c1-64) $(sha256sum w | cut -c1-64) | sha256sum``.
    """
    parts = hashlib.sha256(config_bytes).hexdigest() + hashlib.sha256(weights_bytes).hexdigest()
    return hashlib.sha256(parts.encode("ascii")).hexdigest()


def read_adapter_dir(path: str | Path, limits: ValidationLimits | None = None) -> tuple[bytes, bytes]:
    """Read ``(adapter_config.json, adapter_model.safetensors)`` bytes of a PEFT directory.

    A directory with only pickle weights (``adapter_model.bin``, ``*.pt``, ...) is rejected; pickle is never
    opened. With ``limits``, oversized files are rejected from their size on disk, before reading. A path that
    cannot be read is a 400 naming the OS's reason.
    """
    root = Path(path)
    try:
        return _read_dir(root, limits)
    except OSError as e:
        raise invalid(root.name[:64], f"cannot read the adapter directory: {e.strerror or e}") from None


def _read_dir(root: Path, limits: ValidationLimits | None) -> tuple[bytes, bytes]:
    name = root.name
    if not root.is_dir():
        raise invalid(name, f"{root} is not a directory")
    config_path, weights_path = root / CONFIG_FILE, root / WEIGHTS_FILE
    if not weights_path.is_file():
        pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise invalid(
                name,
                f"{root} holds only pickle weights ({', '.join(pickles)}), which are never "
                f"loaded; save the adapter as {WEIGHTS_FILE} (PEFT save_pretrained(safe_serialization=True))",
                code="pickle_not_allowed",
            )
        raise invalid(name, f"{root} has no {WEIGHTS_FILE}")
    if not config_path.is_file():
        raise invalid(name, f"{root} has no {CONFIG_FILE}")
    if limits is not None:
        check_size(name, CONFIG_FILE, config_path.stat().st_size, limits.max_config_bytes)
        check_size(name, WEIGHTS_FILE, weights_path.stat().st_size, limits.max_file_bytes)
    return config_path.read_bytes(), weights_path.read_bytes()


def parse_adapter(
    adapter_id: str,
    config_bytes: bytes,
    weights_bytes: bytes,
    target_shapes: Mapping[str, ModuleShape],
    limits: ValidationLimits,
    geometry: ModelGeometry | None = None,
) -> LoraAdapter:
    """Validate a PEFT adapter against the base model's targetable modules (and, for prompt and prefix tuning,
    its `geometry`) and return its weights.

    Raises AdapterValidationError (400; 413 for size caps; 422 when it does not fit the base model) whose
    message names the adapter, the offending key or module and the numbers. Bounded in time: every pattern
    runs on RE2 (linear time), and validation stops with a 422 after `limits.max_seconds`.
    """
    deadline = time.monotonic() + limits.max_seconds
    raw = read_config(adapter_id, config_bytes, limits)
    if raw.get("peft_type") in PROMPT_TYPES:
        virtual = parse_prompt(adapter_id, raw, load_safetensors(adapter_id, weights_bytes, limits), geometry)
        return LoraAdapter(id=adapter_id, sha256=adapter_sha256(config_bytes, weights_bytes), rank=0, alpha=0.0,
                           use_rslora=False, target_modules=(), weights=types.MappingProxyType({}),
                           size_bytes=len(weights_bytes), peft_type=raw["peft_type"], virtual=virtual)
    if raw.get("peft_type") == "IA3":
        vectors = parse_ia3(adapter_id, raw, load_safetensors(adapter_id, weights_bytes, limits), target_shapes,
                            limits, deadline)
        weights = {m: _ia3_weights(target_shapes[m], v, is_input) for m, (v, is_input) in vectors.items()}
        return LoraAdapter(id=adapter_id, sha256=adapter_sha256(config_bytes, weights_bytes), rank=0, alpha=0.0,
                           use_rslora=False, target_modules=tuple(sorted({m.rsplit(".", 1)[-1] for m in weights})),
                           weights=types.MappingProxyType(weights), size_bytes=len(weights_bytes), peft_type="IA3")
    config = AdapterConfig.from_raw(adapter_id, raw, limits)
    tensors = without_base_copies(adapter_id, load_safetensors(adapter_id, weights_bytes, limits), geometry)
    replaces = take_replacements(adapter_id, raw, tensors, geometry)
    pairs = _pair_tensors(adapter_id, tensors)
    edges = edge_modules(geometry)
    shapes = dict(target_shapes) | _edge_shapes(geometry)
    weights = {}
    for module, pair in sorted(pairs.items()):
        check_deadline(adapter_id, deadline, limits, len(weights), len(pairs))
        _check_edge_keys(adapter_id, module, pair, edges.get(module) == "embed", config)
        weights[module] = _check_module(adapter_id, module, pair, shapes, config, limits)
    edge_weights = {edges[m]: weights.pop(m) for m in list(weights) if m in edges}
    _check_one_per_edge(adapter_id, edge_weights, replaces)
    return LoraAdapter(
        id=adapter_id,
        sha256=adapter_sha256(config_bytes, weights_bytes),
        rank=max(w.A.shape[0] for w in (*weights.values(), *edge_weights.values())),
        alpha=float(config.alpha),
        use_rslora=config.use_rslora,
        target_modules=tuple(sorted({m.rsplit(".", 1)[-1] for m in pairs})),
        weights=types.MappingProxyType(weights),
        size_bytes=len(weights_bytes),
        use_dora=config.use_dora,
        edges=types.MappingProxyType(edge_weights),
        replaces=replaces if replaces.copies or replaces.tokens else None,
    )


def _check_one_per_edge(adapter_id: str, lora: Mapping[str, LoraWeights], replaces: Replacements) -> None:
    """An edge takes LoRA, a trained copy or trained rows, not two of them."""
    tokens = replaces.tokens
    for edge in EDGES:
        held = [what for what, has in (("LoRA", edge in lora), ("modules_to_save", edge in replaces.copies),
                                       ("trainable_token_indices", tokens is not None and (
                                           edge == "embed" or tokens.tied_head))) if has]
        if len(held) > 1:
            raise invalid(adapter_id, f"the {edge} takes one of LoRA, modules_to_save and trainable_token_indices; "
                          f"this adapter gives it {' and '.join(held)}")


def _edge_shapes(geometry: ModelGeometry | None) -> dict[str, ModuleShape]:
    """The embedding as a projection vocab -> hidden (its A is [r, vocab]), the head as hidden -> vocab."""
    shape = {"embed": lambda g: ModuleShape(g.vocab, g.hidden), "head": lambda g: ModuleShape(g.hidden, g.vocab)}
    return {name: shape[edge](geometry) for name, edge in edge_modules(geometry).items()}


def _check_edge_keys(adapter_id: str, module: str, pair: _Pair, is_embedding: bool, config: AdapterConfig) -> None:
    """lora_embedding_A/B on the embedding, and only there; no DoRA on it."""
    for key in (pair.a_key, pair.b_key):
        if key is not None and ("lora_embedding_" in key) != is_embedding:
            want = "lora_embedding_A/B" if is_embedding else "lora_A/B.weight"
            raise invalid(adapter_id, f"tensor '{key}': module {module} takes {want}")
    if is_embedding and config.use_dora:
        raise invalid(adapter_id, f"module {module}: DoRA on the embedding is not supported")


@dataclass(frozen=True)
class _Pair:
    a_key: str | None
    A: torch.Tensor | None
    b_key: str | None
    B: torch.Tensor | None
    m_key: str | None = None
    m: torch.Tensor | None = None


def load_safetensors(adapter_id: str, data: bytes, limits: ValidationLimits) -> dict[str, torch.Tensor]:
    """Check size, header length (read before any parsing) and dtypes, then load with safetensors."""
    check_size(adapter_id, WEIGHTS_FILE, len(data), limits.max_file_bytes)
    looks_like_safetensors = data[8:9] == b"{"  # u64 header length, then the JSON header
    if not looks_like_safetensors and (data[:4] == b"PK\x03\x04" or data[:1] == b"\x80"):
        raise invalid(
            adapter_id,
            f"{WEIGHTS_FILE} is a pickle / torch.save file, which is never loaded; "
            f"upload the safetensors file PEFT writes ({WEIGHTS_FILE})",
            code="pickle_not_allowed",
        )
    if len(data) < 8:
        raise invalid(
            adapter_id,
            f"{WEIGHTS_FILE} is not a safetensors file: {len(data)} bytes, "
            "shorter than the 8-byte header length",
        )
    header_len = int.from_bytes(data[:8], "little")
    if header_len > limits.max_header_bytes:
        raise invalid(
            adapter_id,
            f"{WEIGHTS_FILE} header is {header_len} bytes, over the limit of {limits.max_header_bytes} bytes",
            status=413,
            code="adapter_too_large",
        )
    if 8 + header_len > len(data):
        raise invalid(
            adapter_id,
            f"{WEIGHTS_FILE} is malformed: header length {header_len} "
            f"runs past the end of the {len(data)}-byte file",
        )
    header = load_json(adapter_id, f"{WEIGHTS_FILE} is malformed: header", data[8 : 8 + header_len])
    if not isinstance(header, dict):
        raise invalid(adapter_id, f"{WEIGHTS_FILE} is malformed: header is not a JSON object")
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = info.get("dtype") if isinstance(info, dict) else None
        if dtype not in ALLOWED_DTYPES:
            raise invalid(
                adapter_id,
                f"tensor '{key}' has dtype {dtype!r}; only {', '.join(ALLOWED_DTYPES)} are accepted",
            )
    try:
        return safetensors.torch.load(bytes(data))
    except Exception as e:  # safetensors raises SafetensorError and friends for malformed files
        raise invalid(adapter_id, f"{WEIGHTS_FILE} is malformed: {e}") from None


def _pair_tensors(adapter_id: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, _Pair]:
    """Group ``<module>.lora_A/B[.name].weight`` keys by base-model module name."""
    found: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        match = _KEY_RE.match(key)
        if match is None:
            raise invalid(
                adapter_id,
                f"unexpected tensor '{key}': expected '<module>.lora_A.weight', '<module>.lora_B.weight' or "
                "(DoRA) '<module>.lora_magnitude_vector', or on the embedding '<module>.lora_embedding_A' "
                "(LoRA biases and modules_to_save are not supported)",
            )
        module, ab = match.group("module"), match.group("ab") or match.group("eab") or "m"
        slot = found.setdefault(module, {})
        if ab in slot:
            raise invalid(adapter_id, f"module {module} has two lora_{ab} tensors: '{slot[ab][0]}' and '{key}'")
        slot[ab] = (key, tensor)
    if not found:
        raise invalid(adapter_id, f"{WEIGHTS_FILE} holds no LoRA tensors")
    pairs = {}
    for module, slot in found.items():
        a_key, a = slot.get("A", (None, None))
        b_key, b = slot.get("B", (None, None))
        m_key, m = slot.get("m", (None, None))
        pairs[module] = _Pair(a_key, a, b_key, b, m_key, m)
    return pairs


def _check_module(
    adapter_id: str,
    module: str,
    pair: _Pair,
    target_shapes: Mapping[str, ModuleShape],
    config: AdapterConfig,
    limits: ValidationLimits,
) -> LoraWeights:
    any_key = pair.a_key or pair.b_key or pair.m_key
    shape = target_shapes.get(module)
    if shape is None:
        raise invalid(adapter_id, f"tensor '{any_key}' is for module '{module}', "
                      "which is not a LoRA-targetable module of the base model", **INCOMPATIBLE)
    if not config.selects(module):
        raise invalid(adapter_id, f"tensor '{any_key}' is for module '{module}', which the config does not "
                      f"select (target_modules={show(config.target_modules)}, "
                      f"exclude_modules={show(config.exclude_modules)}, "
                      f"layers_to_transform={show(config.layers_to_transform)})")
    if pair.A is None or pair.B is None:
        tensors = (("lora_A", pair.A), ("lora_B", pair.B), ("lora_magnitude_vector", pair.m))
        have = " and ".join(name for name, t in tensors if t is not None)
        missing = " and ".join(name for name, t in tensors[:2] if t is None)
        raise invalid(adapter_id, f"module {module} has {have} ('{any_key}') but no {missing}")
    r = check_shapes(adapter_id, module, pair.A, pair.B, shape, config, limits)
    for key, t in ((pair.a_key, pair.A), (pair.b_key, pair.B)):
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise invalid(adapter_id, f"tensor '{key}' has {bad} NaN/Inf values out of {t.numel()}")
    scale = config.scale_for(module, r)
    check_magnitude(adapter_id, module, pair.A, pair.B, scale, limits)
    magnitude = dora_magnitude(adapter_id, module, pair.m_key, pair.m, shape, config.use_dora)
    return LoraWeights(A=pair.A, B=pair.B, scale=scale, magnitude=magnitude)
