"""PEFT LoRA adapter format: data types, parsing and validation.

An adapter is exactly what PEFT's ``save_pretrained`` writes: ``adapter_config.json``
and ``adapter_model.safetensors`` with keys such as
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` (A: [r, d_in])
and ``...lora_B.weight`` (B: [d_out, r]). Pickle files are never loaded.

Module selection (``target_modules``, ``exclude_modules``, ``layers_to_transform``,
``layers_pattern``) and per-module rank/alpha (``rank_pattern``, ``alpha_pattern``)
mirror peft 0.21 (``check_target_module_exists`` and ``get_pattern_key``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from adapters_store.errors import AdapterValidationError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
ALLOWED_DTYPES = ("F16", "BF16", "F32")

# PEFT keys: [base_model.model.]<module>.lora_{A,B}[.<adapter name>].weight
_KEY_RE = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?P<ab>[AB])(?:\.(?P<name>[^.]+))?\.weight$"
)

MAX_PATTERN_CHARS = 512
# a group containing * + or {n,} and itself followed by * + or {: (a+)+, (.*x)*, (\w+\.){2,}
_NESTED_QUANTIFIER_RE = re.compile(r"\((?:[^()\\]|\\.)*(?:[*+]|\{\d*,)(?:[^()\\]|\\.)*\)(?:[*+]|\{\d*,)")

# Config fields whose non-default value changes what the weights mean; loramux serves plain LoRA only.
_UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA",
    "lora_bias": "a bias on lora_B",
    "use_qalora": "QALoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "monteclora_config": "MonteCLoRA",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable tokens",
    "target_parameters": "target_parameters (LoRA on nn.Parameter)",
}


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


@dataclass(frozen=True)
class ValidationLimits:
    max_rank: int = 64
    max_file_bytes: int = 256 * 2**20
    max_header_bytes: int = 1 * 2**20  # safetensors JSON header cap
    max_config_bytes: int = 64 * 2**10


def adapter_sha256(config_bytes: bytes, weights_bytes: bytes) -> str:
    """Content identity: sha256 of the ASCII text ``hex(sha256(config)) + hex(sha256(weights))``.

    From a shell: ``printf %s%s $(sha256sum c | cut -c1-64) $(sha256sum w | cut -c1-64) | sha256sum``.
    """
    parts = hashlib.sha256(config_bytes).hexdigest() + hashlib.sha256(weights_bytes).hexdigest()
    return hashlib.sha256(parts.encode("ascii")).hexdigest()


def read_adapter_dir(path: str | Path, limits: ValidationLimits | None = None) -> tuple[bytes, bytes]:
    """Read ``(adapter_config.json, adapter_model.safetensors)`` bytes of a PEFT directory.

    A directory with only pickle weights (``adapter_model.bin``, ``*.pt``, ...) is rejected; pickle is never
    opened. With ``limits``, oversized files are rejected from their size on disk, before reading.
    """
    root = Path(path)
    name = root.name
    if not root.is_dir():
        raise AdapterValidationError(f"adapter '{name}': {root} is not a directory")
    config_path, weights_path = root / CONFIG_FILE, root / WEIGHTS_FILE
    if not weights_path.is_file():
        pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise AdapterValidationError(
                f"adapter '{name}': {root} holds only pickle weights ({', '.join(pickles)}), which are never "
                f"loaded; save the adapter as {WEIGHTS_FILE} (PEFT save_pretrained(safe_serialization=True))",
                code="pickle_not_allowed",
            )
        raise AdapterValidationError(f"adapter '{name}': {root} has no {WEIGHTS_FILE}")
    if not config_path.is_file():
        raise AdapterValidationError(f"adapter '{name}': {root} has no {CONFIG_FILE}")
    if limits is not None:
        _check_size(name, CONFIG_FILE, config_path.stat().st_size, limits.max_config_bytes)
        _check_size(name, WEIGHTS_FILE, weights_path.stat().st_size, limits.max_file_bytes)
    return config_path.read_bytes(), weights_path.read_bytes()


def parse_adapter(
    adapter_id: str,
    config_bytes: bytes,
    weights_bytes: bytes,
    target_shapes: Mapping[str, ModuleShape],
    limits: ValidationLimits,
) -> LoraAdapter:
    """Validate a PEFT LoRA adapter against the base model's targetable modules and return its weights.

    Raises AdapterValidationError (400; 413 for size caps; 422 when it does not fit the base model) whose
    message names the adapter, the offending key or module and the numbers.
    """
    config = _LoraConfig.parse(adapter_id, config_bytes, limits)
    tensors = _load_safetensors(adapter_id, weights_bytes, limits)
    pairs = _pair_tensors(adapter_id, tensors)
    weights = {
        module: _check_module(adapter_id, module, pair, target_shapes, config, limits)
        for module, pair in sorted(pairs.items())
    }
    return LoraAdapter(
        id=adapter_id,
        sha256=adapter_sha256(config_bytes, weights_bytes),
        rank=max(w.A.shape[0] for w in weights.values()),
        alpha=float(config.alpha),
        use_rslora=config.use_rslora,
        target_modules=tuple(sorted({m.rsplit(".", 1)[-1] for m in weights})),
        weights=types.MappingProxyType(weights),
        size_bytes=len(weights_bytes),
    )


def _fail(adapter_id: str, message: str, **kwargs: Any) -> AdapterValidationError:
    return AdapterValidationError(f"adapter '{adapter_id}': {message}", **kwargs)


def _check_size(adapter_id: str, what: str, size: int, cap: int) -> None:
    if size > cap:
        raise _fail(
            adapter_id,
            f"{what} is {size} bytes, over the limit of {cap} bytes",
            status=413,
            code="adapter_too_large",
        )


@dataclass(frozen=True)
class _Pair:
    a_key: str | None
    A: torch.Tensor | None
    b_key: str | None
    B: torch.Tensor | None


@dataclass(frozen=True)
class _LoraConfig:
    """The parts of a PEFT LoraConfig that decide which modules are adapted and how they are scaled."""

    r: int
    alpha: float
    use_rslora: bool
    target_modules: str | tuple[str, ...]
    exclude_modules: str | tuple[str, ...] | None
    layers_to_transform: int | tuple[int, ...] | None
    layers_pattern: tuple[str, ...] | None
    rank_pattern: Mapping[str, int]
    alpha_pattern: Mapping[str, float]

    @classmethod
    def parse(cls, adapter_id: str, data: bytes, limits: ValidationLimits) -> _LoraConfig:
        _check_size(adapter_id, CONFIG_FILE, len(data), limits.max_config_bytes)
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, ValueError) as e:
            raise _fail(adapter_id, f"{CONFIG_FILE} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise _fail(adapter_id, f"{CONFIG_FILE} must be a JSON object, got {type(raw).__name__}")
        return cls._from_dict(adapter_id, raw, limits)

    @classmethod
    def _from_dict(cls, adapter_id: str, raw: dict[str, Any], limits: ValidationLimits) -> _LoraConfig:
        def bad(msg: str, **kwargs: Any) -> AdapterValidationError:
            return _fail(adapter_id, f"{CONFIG_FILE}: {msg}", **kwargs)

        peft_type = raw.get("peft_type")
        if peft_type != "LORA":
            raise bad(f"peft_type is {peft_type!r}; only 'LORA' adapters are supported")
        for field, what in _UNSUPPORTED_FIELDS.items():
            if raw.get(field) not in (None, False, [], {}):
                raise bad(f"{field}={raw[field]!r} ({what}) is not supported; only plain LoRA is served")
        if raw.get("modules_to_save"):
            raise bad(
                f"modules_to_save={raw['modules_to_save']!r} is not supported: fully trained modules "
                "would replace base weights for every tenant"
            )
        if raw.get("bias", "none") != "none":
            raise bad(f"bias={raw['bias']!r} is not supported (only 'none'): trained biases change the base")

        r = raw.get("r", 8)
        if not _is_int(r) or r <= 0:
            raise bad(f"r must be a positive integer, got {r!r}")
        if r > limits.max_rank:
            raise bad(f"r={r} is above the server's max rank {limits.max_rank}", status=422)
        alpha = raw.get("lora_alpha", 8)
        if not _is_number(alpha):
            raise bad(f"lora_alpha must be a number, got {alpha!r}")
        use_rslora = raw.get("use_rslora", False)
        if not isinstance(use_rslora, bool):
            raise bad(f"use_rslora must be true or false, got {use_rslora!r}")

        rank_pattern = _patterns(bad, "rank_pattern", raw.get("rank_pattern"), _is_int)
        for key, rank in rank_pattern.items():
            if rank <= 0:
                raise bad(f"rank_pattern['{key}']={rank} must be positive")
            if rank > limits.max_rank:
                raise bad(
                    f"rank_pattern['{key}']={rank} is above the server's max rank {limits.max_rank}",
                    status=422,
                )
        alpha_pattern = _patterns(bad, "alpha_pattern", raw.get("alpha_pattern"), _is_number)

        target_modules = _names(bad, "target_modules", raw.get("target_modules"))
        if target_modules is None:
            raise bad("target_modules is missing")
        exclude_modules = _names(bad, "exclude_modules", raw.get("exclude_modules"))

        layers = raw.get("layers_to_transform")
        if isinstance(layers, list) and all(_is_int(i) for i in layers):
            layers = tuple(layers)
        elif layers is not None and not _is_int(layers):
            raise bad(f"layers_to_transform must be an integer or a list of integers, got {layers!r}")
        layers_pattern = raw.get("layers_pattern")
        if isinstance(layers_pattern, str):
            layers_pattern = (layers_pattern,) if layers_pattern else None
        elif isinstance(layers_pattern, list) and all(isinstance(p, str) for p in layers_pattern):
            layers_pattern = tuple(layers_pattern)
        elif layers_pattern is not None:
            raise bad(f"layers_pattern must be a string or a list of strings, got {layers_pattern!r}")
        for p in layers_pattern or ():
            _compile(bad, "layers_pattern", p)

        return cls(
            r=r,
            alpha=alpha,
            use_rslora=use_rslora,
            target_modules=target_modules,
            exclude_modules=exclude_modules,
            layers_to_transform=layers,
            layers_pattern=layers_pattern,
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
        )

    def selects(self, key: str) -> bool:
        """peft.tuners.tuners_utils.check_target_module_exists for a config without modules_to_save."""
        ex = self.exclude_modules
        if ex:
            if isinstance(ex, str):
                if re.fullmatch(ex, key):
                    return False
            elif key in ex or any(key.endswith(f".{e}") for e in ex):
                return False
        targets = self.target_modules
        if isinstance(targets, str):
            return re.fullmatch(targets, key) is not None
        if key in targets:
            return True
        if not any(key.endswith(f".{t}") for t in targets):
            return False
        layers = self.layers_to_transform
        if layers is None or layers == ():
            return True
        if not self.layers_pattern:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            match = None
            for pattern in self.layers_pattern:
                match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
                if match is not None:
                    break
        if match is None:
            return False
        index = int(match.group("idx"))
        return index == layers if isinstance(layers, int) else index in layers

    def rank_for(self, key: str) -> tuple[int, str]:
        """(r, where it came from) for a module, as peft's get_pattern_key resolves rank_pattern."""
        pattern = _pattern_key(self.rank_pattern, key)
        if pattern is None:
            return self.r, "r"
        return self.rank_pattern[pattern], f"rank_pattern['{pattern}']"

    def scale_for(self, key: str, r: int) -> float:
        pattern = _pattern_key(self.alpha_pattern, key)
        alpha = self.alpha if pattern is None else self.alpha_pattern[pattern]
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _compile(bad: Any, field: str, pattern: str) -> None:
    """Reject invalid regexes and nested quantifiers (``(a+)+``), whose matching can take exponential time."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise bad(f"{field} entry is {len(pattern)} characters, over the limit of {MAX_PATTERN_CHARS}")
    if _NESTED_QUANTIFIER_RE.search(pattern):
        raise bad(
            f"{field} entry {pattern!r} repeats a group that itself repeats (catastrophic backtracking)"
        )
    try:
        re.compile(pattern)
    except re.error as e:
        raise bad(f"{field} entry {pattern!r} is not a valid regular expression: {e}") from None


def _patterns(bad: Any, field: str, value: Any, check: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and check(v) for k, v in value.items()):
        raise bad(f"{field} must map module patterns to numbers, got {value!r}")
    for key in value:
        _compile(bad, field, key)
    return dict(value)


def _names(bad: Any, field: str, value: Any) -> str | tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        _compile(bad, field, value)
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise bad(f"{field} must be a list of module names or a regex string, got {value!r}")


def _pattern_key(patterns: Mapping[str, Any], key: str) -> str | None:
    """peft.utils.other.get_pattern_key: the first pattern p with re.match(rf"(.*\\.)?({p})$", key)."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return None


def _load_safetensors(adapter_id: str, data: bytes, limits: ValidationLimits) -> dict[str, torch.Tensor]:
    """Check size, header length (read before any parsing) and dtypes, then load with safetensors."""
    _check_size(adapter_id, WEIGHTS_FILE, len(data), limits.max_file_bytes)
    looks_like_safetensors = data[8:9] == b"{"  # u64 header length, then the JSON header
    if not looks_like_safetensors and (data[:4] == b"PK\x03\x04" or data[:1] == b"\x80"):
        raise _fail(
            adapter_id,
            f"{WEIGHTS_FILE} is a pickle / torch.save file, which is never loaded; "
            f"upload the safetensors file PEFT writes ({WEIGHTS_FILE})",
            code="pickle_not_allowed",
        )
    if len(data) < 8:
        raise _fail(
            adapter_id,
            f"{WEIGHTS_FILE} is not a safetensors file: {len(data)} bytes, "
            "shorter than the 8-byte header length",
        )
    header_len = int.from_bytes(data[:8], "little")
    if header_len > limits.max_header_bytes:
        raise _fail(
            adapter_id,
            f"{WEIGHTS_FILE} header is {header_len} bytes, over the limit of {limits.max_header_bytes} bytes",
            status=413,
            code="adapter_too_large",
        )
    if 8 + header_len > len(data):
        raise _fail(
            adapter_id,
            f"{WEIGHTS_FILE} is malformed: header length {header_len} "
            f"runs past the end of the {len(data)}-byte file",
        )
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, ValueError) as e:
        raise _fail(adapter_id, f"{WEIGHTS_FILE} is malformed: header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise _fail(adapter_id, f"{WEIGHTS_FILE} is malformed: header is not a JSON object")
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = info.get("dtype") if isinstance(info, dict) else None
        if dtype not in ALLOWED_DTYPES:
            raise _fail(
                adapter_id,
                f"tensor '{key}' has dtype {dtype!r}; only {', '.join(ALLOWED_DTYPES)} are accepted",
            )
    try:
        return safetensors.torch.load(bytes(data))
    except Exception as e:  # safetensors raises SafetensorError and friends for malformed files
        raise _fail(adapter_id, f"{WEIGHTS_FILE} is malformed: {e}") from None


def _pair_tensors(adapter_id: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, _Pair]:
    """Group ``<module>.lora_A/B[.name].weight`` keys by base-model module name."""
    found: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        match = _KEY_RE.match(key)
        if match is None:
            raise _fail(
                adapter_id,
                f"unexpected tensor '{key}': expected '<module>.lora_A.weight' or "
                "'<module>.lora_B.weight' (embedding LoRA, DoRA magnitudes, LoRA biases and "
                "modules_to_save are not supported)",
            )
        module, ab = match.group("module"), match.group("ab")
        slot = found.setdefault(module, {})
        if ab in slot:
            raise _fail(adapter_id, f"module {module} has two lora_{ab} tensors: '{slot[ab][0]}' and '{key}'")
        slot[ab] = (key, tensor)
    if not found:
        raise _fail(adapter_id, f"{WEIGHTS_FILE} holds no LoRA tensors")
    pairs = {}
    for module, slot in found.items():
        a_key, a = slot.get("A", (None, None))
        b_key, b = slot.get("B", (None, None))
        pairs[module] = _Pair(a_key, a, b_key, b)
    return pairs


def _check_module(
    adapter_id: str,
    module: str,
    pair: _Pair,
    target_shapes: Mapping[str, ModuleShape],
    config: _LoraConfig,
    limits: ValidationLimits,
) -> LoraWeights:
    any_key = pair.a_key or pair.b_key
    incompatible = {"status": 422, "code": "adapter_incompatible"}
    shape = target_shapes.get(module)
    if shape is None:
        raise _fail(
            adapter_id,
            f"tensor '{any_key}' is for module '{module}', "
            "which is not a LoRA-targetable module of the base model",
            **incompatible,
        )
    if not config.selects(module):
        raise _fail(
            adapter_id,
            f"tensor '{any_key}' is for module '{module}', which the config does not "
            f"select (target_modules={_show(config.target_modules)}, "
            f"exclude_modules={_show(config.exclude_modules)}, "
            f"layers_to_transform={_show(config.layers_to_transform)})",
        )
    if pair.A is None or pair.B is None:
        have, missing = ("lora_A", "lora_B") if pair.B is None else ("lora_B", "lora_A")
        raise _fail(adapter_id, f"module {module} has {have} ('{any_key}') but no {missing}")
    A, B = pair.A, pair.B  # A: [r, d_in], B: [d_out, r]
    r_cfg, r_source = config.rank_for(module)
    for name, t in (("lora_A", A), ("lora_B", B)):
        if t.ndim != 2:
            raise _fail(adapter_id, f"{name} for {module} has shape {list(t.shape)}, expected a 2-d matrix")
    if A.shape[1] != shape.d_in:
        hint = " (looks transposed)" if A.shape[0] == shape.d_in else ""
        raise _fail(
            adapter_id,
            f"lora_A for {module} has shape {list(A.shape)}, "
            f"expected [{r_cfg}, {shape.d_in}] (r x d_in){hint}",
            **incompatible,
        )
    if B.shape[0] != shape.d_out:
        hint = " (looks transposed)" if B.shape[1] == shape.d_out else ""
        raise _fail(
            adapter_id,
            f"lora_B for {module} has shape {list(B.shape)}, "
            f"expected [{shape.d_out}, {r_cfg}] (d_out x r){hint}",
            **incompatible,
        )
    r = A.shape[0]
    if B.shape[1] != r:
        raise _fail(
            adapter_id,
            f"module {module}: lora_A has rank {r} (shape {list(A.shape)}) "
            f"but lora_B has rank {B.shape[1]} (shape {list(B.shape)})",
        )
    if r > limits.max_rank:
        raise _fail(
            adapter_id,
            f"module {module} has rank {r}, above the server's max rank {limits.max_rank}",
            status=422,
        )
    if r != r_cfg:
        raise _fail(adapter_id, f"module {module} has tensor rank {r} but the config says {r_source}={r_cfg}")
    for key, t in ((pair.a_key, A), (pair.b_key, B)):
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise _fail(adapter_id, f"tensor '{key}' has {bad} NaN/Inf values out of {t.numel()}")
    return LoraWeights(A=A, B=B, scale=config.scale_for(module, r))


def _show(value: Any) -> str:
    return repr(list(value)) if isinstance(value, tuple) else repr(value)
