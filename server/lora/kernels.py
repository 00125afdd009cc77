"""loramux's CPU kernels of the LoRA side paths (server/csrc/sgmv.cpp), built once with the C++ compiler.

torch's batched matmuls pay a fixed cost per call (a few microseconds) and per view; a decode step with 16
adapters made ~2,000 of them, and the side paths cost more than half the base step. The kernels do a
projection group's shrink in one call and each member's expand in one, every run of tokens reading its own
slot's weights once, at its own rank (`sgmv_shrink`, `sgmv_expand`: the SGMV shape of punica and S-LoRA).

Both tile their work in registers (4 tokens by 4 rows of A; 4 tokens by 32 columns of B, over every rank)
and split a long run over the threads, so that prefill's runs of hundreds of tokens take them too.

The kernels are built on first use (server/native.py); where they cannot be, the side paths run through torch,
as they do on CUDA.
"""

from __future__ import annotations

import sys

import torch

from server import native

# Runs of up to this many tokens go to the kernels: every run, prefill's too. Over a recorded 64-request pass
# of 16 adapters the prefill steps took 0.66x (bf16) / 0.88x (fp32) the time with runs past 16 tokens on
# torch's batched GEMMs (which gather, pad and copy); only long bf16 runs of high rank (128 tokens at rank 64)
# are faster as one oneDNN bf16 GEMM each.
MAX_RUN = sys.maxsize


def load() -> bool:
    """Build (once) and load the kernels into torch.ops.loramux_cpu; False (with a warning) where they cannot be."""
    return native.build("sgmv.cpp", "loramux_cpu", "sgmv_shrink", "the LoRA side paths run through torch")


def shrink(x: torch.Tensor, A: torch.Tensor, runs: torch.Tensor, rows: int,
           member_ranks: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, d_in], A [S, R, M, d_in] -> xa [rows, R*M]: each run's tokens' x·A at its slot and rank.

    x and A are float32 or bfloat16 (not necessarily the same), xa float32. member_ranks [S, M] int64: the rank
    each slot holds for each member (0: not adapted); a run reads member m's rows only up to it (the rows past
    it in xa are left unset: expand with the same member_ranks)."""
    return torch.ops.loramux_cpu.sgmv_shrink(x, A, runs, rows, member_ranks)


def expand(y: torch.Tensor, xa: torch.Tensor, B: torch.Tensor, runs: torch.Tensor, weights: torch.Tensor,
           member: int, members: int, member_ranks: torch.Tensor | None = None) -> None:
    """y [N, d_out] += weight * (x·A of `member`) · B[slot] for each run, in place (up to the member's rank).

    B [S, R, d_out] and y are float32 or bfloat16, xa float32; a bfloat16 y takes each run's float32 sum rounded
    once (for disjoint runs, what adding a float32 buffer of the sums into y gives, bit for bit)."""
    torch.ops.loramux_cpu.sgmv_expand(y, xa, B, runs, weights, member_ranks, member, members)
