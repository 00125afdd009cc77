"""PEFT's ``adapter_config.json``: validated, and the module selection and scaling it implies.

Module selection (``target_modules``, ``exclude_modules``, ``layers_to_transform``, ``layers_pattern``)
and per-module rank/alpha (``rank_pattern``, ``alpha_pattern``) mirror peft 0.21
(``check_target_module_exists`` and ``get_pattern_key``).

Patterns come from uploads, so they run on RE2 (the ``google-re2`` package), whose matching takes time
linear in the text whatever the pattern: a pattern such as ``(.|.)*x`` that makes Python's backtracking
``re`` run for minutes on one module name is harmless here. Syntax RE2 does not have (lookaround,
backreferences) is refused with a 400. At most ``MAX_PATTERNS`` patterns of ``MAX_PATTERN_CHARS`` each.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import re2
import torch

from adapters_store.errors import AdapterValidationError

CONFIG_FILE = "adapter_config.json"
MAX_PATTERN_CHARS = 512
MAX_PATTERNS = 256  # per field
INCOMPATIBLE = {"status": 422, "code": "adapter_incompatible"}  # what does not fit the base model
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False

# Config fields whose non-default value changes what the weights mean; loramux serves plain LoRA only.
_UNSUPPORTED_FIELDS = {
    "lora_bias": "a bias on lora_B",
    "use_qalora": "QALoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "monteclora_config": "MonteCLoRA",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "layer_replication": "layer replication",
    "target_parameters": "target_parameters (LoRA on nn.Parameter)",
}


@dataclass(frozen=True)
class ValidationLimits:
    max_rank: int = 64
    max_file_bytes: int = 256 * 2**20
    max_header_bytes: int = 1 * 2**20  # safetensors JSON header cap
    max_config_bytes: int = 64 * 2**10
    # Magnitudes no trained adapter has (the demo adapters: scale 2, largest delta entry 0.04-0.07, against base
    # weights up to 9): an adapter past them would only make its own rows' values overflow.
    max_scale: float = 1024.0  # |lora_alpha / r| (or / sqrt(r)) of any module
    max_delta: float = 16.0  # largest |entry| of scale * B @ A of any module
    max_seconds: float = 10.0  # wall-clock bound on validating one adapter


def invalid(adapter_id: str, message: str, **kwargs: Any) -> AdapterValidationError:
    return AdapterValidationError(f"adapter '{adapter_id}': {message}", **kwargs)


def config_error(adapter_id: str) -> Bad:
    def bad(msg: str, **kwargs: Any) -> AdapterValidationError:
        return invalid(adapter_id, f"{CONFIG_FILE}: {msg}", **kwargs)

    return bad


def read_config(adapter_id: str, data: bytes, limits: ValidationLimits) -> dict[str, Any]:
    """adapter_config.json as a JSON object (size-capped; 400 for anything else)."""
    check_size(adapter_id, CONFIG_FILE, len(data), limits.max_config_bytes)
    raw = load_json(adapter_id, CONFIG_FILE, data)
    if not isinstance(raw, dict):
        raise invalid(adapter_id, f"{CONFIG_FILE} must be a JSON object, got {type(raw).__name__}")
    return raw


def names_field(adapter_id: str, field: str, value: Any) -> str | tuple[str, ...] | None:
    """A list of module names or an RE2-checked regex string (None when absent)."""
    return _names(config_error(adapter_id), field, value)


def fullmatch(pattern: str, key: str) -> bool:
    """RE2 full match of a pattern already checked by a config parser."""
    return _regex(pattern).fullmatch(key) is not None


def check_entries(adapter_id: str, key: str, t: torch.Tensor, limit: float, what: str) -> None:
    """No NaN/Inf in tensor `key`, and no |entry| above `limit` (400 naming the tensor and the numbers)."""
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise invalid(adapter_id, f"tensor '{key}' has {bad} NaN/Inf values out of {t.numel()}")
    peak = t.float().abs().max().item()
    if peak > limit:
        raise invalid(adapter_id, f"{what}: the largest |entry| is {peak:.4g}, above the limit of {limit:g}")


def check_deadline(adapter_id: str, deadline: float, limits: ValidationLimits, done: int, total: int) -> None:
    """422 once validating one adapter has taken longer than `limits.max_seconds`."""
    if time.monotonic() > deadline:
        raise invalid(adapter_id, f"validation took longer than {limits.max_seconds:g} s ({done} of {total} modules "
                      "checked)", status=422, code="validation_timeout")


def check_size(adapter_id: str, what: str, size: int, cap: int) -> None:
    if size > cap:
        raise invalid(adapter_id, f"{what} is {size} bytes, over the limit of {cap} bytes", status=413,
                      code="adapter_too_large")


def load_json(adapter_id: str, what: str, data: bytes) -> Any:
    """json.loads with every failure (deep nesting included) as a 400 naming the file."""
    try:
        return json.loads(data)
    except RecursionError:
        raise invalid(adapter_id, f"{what} is not valid JSON: nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise invalid(adapter_id, f"{what} is not valid JSON: {e}") from None


Bad = Callable[..., AdapterValidationError]  # message -> the error to raise, naming the adapter and the file


@dataclass(frozen=True)
class AdapterConfig:
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
    use_dora: bool = False  # each module also has a magnitude vector (weight-decomposed LoRA)

    @classmethod
    def parse(cls, adapter_id: str, data: bytes, limits: ValidationLimits) -> AdapterConfig:
        return cls.from_raw(adapter_id, read_config(adapter_id, data, limits), limits)

    @classmethod
    def from_raw(cls, adapter_id: str, raw: dict[str, Any], limits: ValidationLimits) -> AdapterConfig:
        bad = config_error(adapter_id)
        _check_kind(bad, raw)
        r, alpha, use_rslora = _rank_and_alpha(bad, raw, limits)
        use_dora = raw.get("use_dora", False)
        if not isinstance(use_dora, bool):
            raise bad(f"use_dora must be true or false, got {use_dora!r}")
        return replace(cls.selection(adapter_id, raw), r=r, alpha=alpha, use_rslora=use_rslora,
                       rank_pattern=_rank_pattern(bad, raw, limits),
                       alpha_pattern=_patterns(bad, "alpha_pattern", raw.get("alpha_pattern"), _is_number),
                       use_dora=use_dora)

    @classmethod
    def selection(cls, adapter_id: str, raw: dict[str, Any]) -> AdapterConfig:
        """Only which modules a config selects (target and exclude modules, layers): the part every PEFT type
        shares; rank 1, scale 1."""
        bad = config_error(adapter_id)
        target_modules = _names(bad, "target_modules", raw.get("target_modules"))
        if target_modules is None:
            raise bad("target_modules is missing")
        layers, layers_pattern = _layers(bad, raw)
        return cls(r=1, alpha=1.0, use_rslora=False, target_modules=target_modules,
                   exclude_modules=_names(bad, "exclude_modules", raw.get("exclude_modules")),
                   layers_to_transform=layers, layers_pattern=layers_pattern, rank_pattern={}, alpha_pattern={})

    def selects(self, key: str) -> bool:
        """peft.tuners.tuners_utils.check_target_module_exists for a config without modules_to_save."""
        ex = self.exclude_modules
        if ex:
            if isinstance(ex, str):
                if _regex(ex).fullmatch(key):
                    return False
            elif key in ex or any(key.endswith(f".{e}") for e in ex):
                return False
        targets = self.target_modules
        if isinstance(targets, str):
            return _regex(targets).fullmatch(key) is not None
        if key in targets:
            return True
        if not any(key.endswith(f".{t}") for t in targets):
            return False
        layers = self.layers_to_transform
        if layers is None or layers == ():
            return True
        index = self._layer_index(key)
        if index is None:
            return False
        return index == layers if isinstance(layers, int) else index in layers

    def _layer_index(self, key: str) -> int | None:
        patterns = [_layers_regex(p) for p in self.layers_pattern or ()] or [r".*?\.[^.]*\.(\d+)\."]
        for pattern in patterns:
            regex = _regex(pattern)
            match = regex.match(key)
            if match is not None:
                return int(match.group(regex.groups))
        return None

    def rank_for(self, key: str) -> tuple[int, str]:
        """(r, where it came from) for a module, as peft's get_pattern_key resolves rank_pattern."""
        pattern = pattern_key(self.rank_pattern, key)
        if pattern is None:
            return self.r, "r"
        return self.rank_pattern[pattern], f"rank_pattern['{pattern}']"

    def scale_for(self, key: str, r: int) -> float:
        pattern = pattern_key(self.alpha_pattern, key)
        alpha = self.alpha if pattern is None else self.alpha_pattern[pattern]
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _check_kind(bad: Bad, raw: dict[str, Any]) -> None:
    """LoRA (and DoRA) here (IA3 has its own parser): other PEFT types and fields that change what the weights
    mean are refused."""
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise bad(f"peft_type is {peft_type!r}; only 'LORA' (with or without use_dora), 'IA3', 'PROMPT_TUNING' "
                  "and 'PREFIX_TUNING' adapters are supported")
    for field, what in _UNSUPPORTED_FIELDS.items():
        if raw.get(field) not in (None, False, [], {}):
            raise bad(f"{field}={raw[field]!r} ({what}) is not supported; only plain LoRA is served")
    if raw.get("bias", "none") != "none":
        raise bad(f"bias={raw['bias']!r} is not supported (only 'none'): trained biases change the base")


def _rank_and_alpha(bad: Bad, raw: dict[str, Any], limits: ValidationLimits) -> tuple[int, float, bool]:
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
    return r, alpha, use_rslora


def _rank_pattern(bad: Bad, raw: dict[str, Any], limits: ValidationLimits) -> dict[str, int]:
    rank_pattern = _patterns(bad, "rank_pattern", raw.get("rank_pattern"), _is_int)
    for key, rank in rank_pattern.items():
        if rank <= 0:
            raise bad(f"rank_pattern['{key}']={rank} must be positive")
        if rank > limits.max_rank:
            raise bad(f"rank_pattern['{key}']={rank} is above the server's max rank {limits.max_rank}", status=422)
    return rank_pattern


def _layers(bad: Bad, raw: dict[str, Any]) -> tuple[int | tuple[int, ...] | None, tuple[str, ...] | None]:
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
    return layers, layers_pattern


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


@functools.lru_cache(maxsize=4096)
def _regex(pattern: str) -> re2._Regexp:
    """The RE2 program of a pattern (compiled once); raises re2.error for syntax RE2 does not have."""
    return re2.compile(pattern, options=_RE2_OPTIONS)


def _layers_regex(pattern: str) -> str:
    """The layer index is the last group (the user's pattern may hold groups of its own)."""
    return rf"(?:^|.*?\.)(?:{pattern})\.(\d+)\."


def _key_regex(pattern: str) -> str:
    return rf"(.*\.)?({pattern})$"


_AS_USED = {"layers_pattern": _layers_regex, "rank_pattern": _key_regex, "alpha_pattern": _key_regex}


def _compile(bad: Bad, field: str, pattern: str) -> None:
    """Reject patterns that are too long or not valid RE2 syntax, alone and as they are used."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise bad(f"{field} entry is {len(pattern)} characters, over the limit of {MAX_PATTERN_CHARS}")
    try:
        _regex(pattern)
        if field in _AS_USED:
            _regex(_AS_USED[field](pattern))
    except re2.error as e:
        reason = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise bad(f"{field} entry {pattern!r} is not a valid regular expression (RE2 syntax, no lookaround or "
                  f"backreferences): {reason}") from None


def _patterns(bad: Bad, field: str, value: Any, check: Callable[[Any], bool]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and check(v) for k, v in value.items()):
        raise bad(f"{field} must map module patterns to numbers, got {brief(value)}")
    if len(value) > MAX_PATTERNS:
        raise bad(f"{field} has {len(value)} patterns, over the limit of {MAX_PATTERNS}")
    for key in value:
        _compile(bad, field, key)
    return dict(value)


def _names(bad: Bad, field: str, value: Any) -> str | tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        _compile(bad, field, value)
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        if len(value) > MAX_PATTERNS:
            raise bad(f"{field} has {len(value)} names, over the limit of {MAX_PATTERNS}")
        return tuple(value)
    raise bad(f"{field} must be a list of module names or a regex string, got {brief(value)}")


def brief(value: Any, limit: int = 200) -> str:
    """repr(value), cut at `limit` characters (with the full length) for error messages."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def pattern_key(patterns: Mapping[str, Any], key: str) -> str | None:
    """peft.utils.other.get_pattern_key: the first pattern p with re.match(rf"(.*\\.)?({p})$", key)."""
    for pattern in patterns:
        if _regex(_key_regex(pattern)).match(key):
            return pattern
    return None
