"""The base model's GEMMs on CPU through oneDNN, with each weight reordered once into oneDNN's blocked layout.

torch's default CPU matmul for these skinny shapes (64-512 rows against 576x1536 weights, a 576x49152 head)
runs at 110-160 GFLOP/s on this machine's two cores in fp32; oneDNN's inner product over a pre-reordered
weight runs at 190-220 (the head of a 64-row decode step: 42 ms -> 19 ms), with the same fp32 accuracy.
The plain weight stays the source of truth: whoever changes it (the merged hot swap) calls ``repack``.
"""

from __future__ import annotations

import torch
from torch import nn


def prepack_supported(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available())


class PackedLinear:
    """y = x W^T + b of an nn.Linear, or x W + b of a GPT-2 Conv1D, over a oneDNN-reordered copy of W."""

    def __init__(self, module: nn.Module, rows_hint: int = 64):
        self.module = module
        self.conv1d = not isinstance(module, nn.Linear)  # Conv1D stores W as [d_in, d_out]
        self.rows_hint = rows_hint  # the row count oneDNN tunes the layout for; any count works
        self.packed = self._pack()

    def _pack(self) -> torch.Tensor:
        w = self.module.weight.detach()
        w = w.t().contiguous() if self.conv1d else w  # [d_out, d_in]
        return torch.ops.mkldnn._reorder_linear_weight(w, self.rows_hint)

    def repack(self) -> None:
        """Take the module's weight again (after it was changed in place)."""
        self.packed = self._pack()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.module.bias
        x2 = x.reshape(-1, x.shape[-1])  # [N, d_in]
        y = torch.ops.mkldnn._linear_pointwise(x2, self.packed, bias, "none", [], "")  # [N, d_out]
        return y.view(*x.shape[:-1], y.shape[-1])
