"""loramux's CPU kernels of the LoRA side paths (csrc/sgmv.cpp), built once with the C++ compiler.

torch's batched matmuls pay a fixed cost per call (a few microseconds) and per view; a decode step with 16
adapters made ~2,000 of them, and the side paths cost more than half the base step. The kernels do a
projection group's shrink in one call and each member's expand in one, every run of tokens reading its own
slot's weights once, at its own rank (`sgmv_shrink`, `sgmv_expand`: the SGMV shape of punica and S-LoRA).

The library is built by torch.utils.cpp_extension (ninja, the C++ compiler that --compile needs too) into
TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions), once per source and instruction set: about 15 s the
first time, a load afterwards. Where it cannot be built the side paths run through torch (a warning says
why), as they do on CUDA.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "sgmv.cpp"
MAX_RUN = 16  # runs of up to this many tokens go to the kernels; longer ones (prefill) to torch's GEMMs
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
def load() -> bool:
    """Build (once) and load the kernels into torch.ops.loramux_cpu; False (with a warning) where they cannot be."""
    from torch.utils import cpp_extension

    _ninja_on_path()
    level = cpu_level()
    flags = ["-O3", "-std=c++20", "-fopenmp"] + ([f"-march=x86-64-{level}"] if level else [])
    try:
        cpp_extension.load(name=f"loramux_sgmv_{level or 'generic'}", sources=[str(SOURCE)], extra_cflags=flags,
                           extra_ldflags=["-fopenmp"], is_python_module=False)
    except Exception as e:  # no compiler, no ninja, a failed build: the torch path serves
        log.warning("the LoRA CPU kernels could not be built (%s: %s); the side paths run through torch",
                    type(e).__name__, str(e)[:300])
        return False
    return hasattr(torch.ops.loramux_cpu, "sgmv_shrink")


def shrink(x: torch.Tensor, A: torch.Tensor, runs: torch.Tensor, rows: int) -> torch.Tensor:
    """x [N, d_in], A [S, R, M, d_in] -> xa [rows, R*M]: each run's tokens' x·A at its slot and rank."""
    return torch.ops.loramux_cpu.sgmv_shrink(x, A, runs, rows)


def expand(y: torch.Tensor, xa: torch.Tensor, B: torch.Tensor, runs: torch.Tensor, weights: torch.Tensor,
           member: int, members: int) -> None:
    """y [N, d_out] += weight * (x·A of `member`) · B[slot] for each run, in place.

    y is float32 or bfloat16; a bfloat16 y takes each run's float32 sum rounded once (for disjoint runs, what
    adding a float32 buffer of the sums into y gives, bit for bit)."""
    torch.ops.loramux_cpu.sgmv_expand(y, xa, B, runs, weights, member, members)


def _ninja_on_path() -> None:
    """cpp_extension runs `ninja`: the ninja package's, also where the virtual environment is not activated."""
    try:
        import ninja
    except ImportError:
        return
    path = os.environ.get("PATH", "")
    if ninja.BIN_DIR not in path.split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, path]) if path else ninja.BIN_DIR
