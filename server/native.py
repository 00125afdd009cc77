"""loramux's C++ CPU kernels (server/csrc), each source built once by torch.utils.cpp_extension and loaded as ops.

A source builds (ninja, the C++ compiler that --compile needs too) into TORCH_EXTENSIONS_DIR (default
~/.cache/torch_extensions), once per source and instruction set: about 15 s the first time, a load afterwards.
Where one cannot be built its callers take their plain-torch path (a warning says why), as they do on CUDA.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
V4 = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
V3 = {"avx2", "fma", "bmi2", "f16c", "movbe"}


def cpu_level() -> str:
    """The x86-64 micro-architecture level this CPU runs ('v4': AVX-512, 'v3': AVX2), '' if none or not x86."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return ""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    flags = set(line.partition(":")[2].split())
    return "v4" if V4 <= flags else "v3" if V3 <= flags else ""


@functools.cache
def build(source: str, namespace: str, op: str, fallback: str) -> bool:
    """Build (once) and load csrc/`source`, which registers torch.ops.`namespace`.`op`; False (with a warning
    that the caller does `fallback` instead) where it cannot be built."""
    from torch.utils import cpp_extension

    _ninja_on_path()
    level = cpu_level()
    flags = ["-O3", "-std=c++20", "-fopenmp"] + ([f"-march=x86-64-{level}"] if level else [])
    try:
        cpp_extension.load(name=f"loramux_{Path(source).stem}_{level or 'generic'}", sources=[str(CSRC / source)],
                           extra_cflags=flags, extra_ldflags=["-fopenmp"], extra_include_paths=[str(CSRC)],
                           is_python_module=False)
    except Exception as e:  # no compiler, no ninja, a failed build: the torch path serves
        log.warning("loramux's CPU kernels of %s could not be built (%s: %s); %s", source, type(e).__name__,
                    str(e)[:300], fallback)
        return False
    return hasattr(getattr(torch.ops, namespace), op)


def _ninja_on_path() -> None:
    """cpp_extension runs `ninja`: the ninja package's, also where the virtual environment is not activated."""
    try:
        import ninja
    except ImportError:
        return
    path = os.environ.get("PATH", "")
    if ninja.BIN_DIR not in path.split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, path]) if path else ninja.BIN_DIR
