"""The compiled step (`--compile`): the backbone's forward under torch.compile (inductor, dynamic shapes).

What a step's plan decides stays opaque to the compiler, as two custom ops that run the eager code:
- `loramux::projection`: a base projection (oneDNN's prepacked GEMM on CPU) plus its LoRA side paths, which
  read the step's LoRA plan (rank buckets, runs, slot ranges: Python structures that change every step);
- `loramux::attention`: the packed attention, which writes the KV arena and reads the step's attention metadata.
Inductor fuses what lies between them (norms, rotary embeddings, activations, residual adds: dozens of small
ops per layer, slow in eager bf16 on CPU) into a few kernels. One graph serves every token count (the token
dimension is dynamic; a single token is its own graph), so a step never waits for a compile once both graphs
are built at start-up (`ModelRunner.warm_up`). Numerics are the eager model's up to reduction order.

The ops find the model in progress through `step_context.running()`: an op's arguments are only tensors, a
projection's index and output size, a layer's index, so models of one architecture and size share their graphs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from server.attention import attend
from server.step_context import running

MAX_GRAPHS = 256  # of the compiled frame, all models of the process together


@torch.library.custom_op("loramux::projection", mutates_args=())
def projection(x: torch.Tensor, index: int, d_out: int) -> torch.Tensor:
    """x: [..., d_in] -> [..., d_out]: projection `index` of the running model, side paths included (a member of
    a stacked GEMM returns its columns, copied here into the contiguous layout the fake promises). `d_out` is
    an argument so that the graph holds (and dynamo guards) each projection's output size: models of one
    architecture but other sizes must not share a graph."""
    context = running()
    context.opaque_calls += 1
    return context.projections[index].project(x).contiguous()  # the graph takes the fake's layout: contiguous


@projection.register_fake
def _(x: torch.Tensor, index: int, d_out: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], d_out)


@torch.library.custom_op("loramux::attention", mutates_args=())
def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int,
              scaling: float) -> torch.Tensor:
    """query: [1, H, N, D]; key/value: [1, Hkv, N, D] -> [N, H, D] (writes the keys and values into the arena)."""
    return attend(running().current.attn, layer, query, key, value, scaling)


@attention.register_fake
def _(query, key, value, layer, scaling):
    return query.new_empty(query.shape[2], query.shape[1], query.shape[3])


def compile_backbone(eager: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable:
    """`eager(embeds [1, N, d], positions [1, N]) -> hidden [1, N, d]` under torch.compile, N dynamic.

    Graphs are keyed by the model's configuration and by the calling thread's torch thread count (dynamo
    guards it): build them on a thread with the engine's count. Dynamo runs a frame eagerly once it holds
    `recompile_limit` graphs (8, a per-thread setting), so each calling thread raises it for processes
    that hold many models (tests, benchmarks); a server's one model needs two."""
    compiled = torch.compile(eager, dynamic=True)

    def run(embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if torch._dynamo.config.recompile_limit < MAX_GRAPHS:
            torch._dynamo.config.recompile_limit = MAX_GRAPHS
        return compiled(embeds, positions)

    return run
