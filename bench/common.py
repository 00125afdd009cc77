"""Shared pieces of the benchmarks: the default model, PEFT-made adapters, timing, JSON output."""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters_store.format import LoraAdapter, ValidationLimits, parse_adapter  # noqa: E402
from server.model_loader import LoadedModel, load_base_model  # noqa: E402
from server.settings import Settings  # noqa: E402

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def load_default(dtype: str) -> LoadedModel:
    return load_base_model("default", cache_dir=Settings().cache_dir, device="cpu", dtype=DTYPES.get(dtype, dtype))


def make_peft(base: torch.nn.Module, specs: dict[str, dict], seed: int = 0) -> PeftModel:
    """A PeftModel (on a copy of `base`) holding one randomly initialised adapter per spec."""
    model: PeftModel | None = None
    for i, (name, spec) in enumerate(specs.items()):
        torch.manual_seed(seed + i)
        cfg = LoraConfig(init_lora_weights=False, **spec)
        if model is None:
            model = get_peft_model(copy.deepcopy(base), cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
        with torch.no_grad():  # small B: the adapted model stays a sane language model
            for n, p in model.named_parameters():
                if f"lora_B.{name}." in n or f"lora_embedding_B.{name}" in n:
                    p.normal_(0, 0.02)
    return model.eval()


def adapter_files(model: PeftModel, name: str, save_embedding_layers: bool | str = "auto") -> tuple[bytes, bytes]:
    """(adapter_config.json, adapter_model.safetensors) bytes exactly as save_pretrained would write."""
    state = get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=save_embedding_layers)
    cfg = model.peft_config[name].to_dict()
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    return json.dumps(cfg).encode(), save({k: v.contiguous() for k, v in state.items()})


def parsed(model: PeftModel, name: str, target_shapes, max_rank: int = 64) -> LoraAdapter:
    config, weights = adapter_files(model, name)
    return parse_adapter(name, config, weights, target_shapes, ValidationLimits(max_rank=max_rank))


def median_time(fn: Callable[[], object], reps: int = 7, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rotated_times(fns: list[Callable[[], object]], reps: int = 7, inner: int = 3) -> list[float]:
    """Median time of each fn, measured in rotation (each rep: every fn's median of `inner` calls in
    turn), so that machine drift hits every side of their ratios alike."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times, strict=True):
            ts.append(median_time(fn, inner, warmup=1))
    return [statistics.median(ts) for ts in times]


def emit(results: dict, json_path: str | None) -> None:
    """Print one figure per line and write them all as JSON."""
    for key, value in results.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}", flush=True)
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2))
