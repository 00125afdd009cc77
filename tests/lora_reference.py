"""The oracle of the LoRA side paths: a per-token plain loop in float64."""

from __future__ import annotations

import torch

from server.lora.plan import NO_ADAPTER


def lora_reference(
    x: torch.Tensor,
    token_slots: list[int],
    A: torch.Tensor,
    B: torch.Tensor,
    member: int,
    merged_slot: int | None = None,
    weighted: list[tuple[int, int, int, float]] = (),
) -> torch.Tensor:
    """x: [N, d_in], A: [S, r, M, d_in], B: [S, r, d_out] -> delta [N, d_out] (float64).

    weighted: (start, end, slot, weight) runs: those tokens also add weight times the slot's delta."""
    out = torch.zeros(x.shape[0], B.shape[2], dtype=torch.float64)
    for t, slot in enumerate(token_slots):
        xt = x[t].double()
        if slot != NO_ADAPTER and slot != merged_slot:
            out[t] += (A[slot, :, member].double() @ xt) @ B[slot].double()
        if merged_slot is not None and slot != merged_slot:
            out[t] -= (A[merged_slot, :, member].double() @ xt) @ B[merged_slot].double()
        for start, end, wslot, weight in weighted:
            if start <= t < end:
                out[t] += weight * ((A[wslot, :, member].double() @ xt) @ B[wslot].double())
    return out
