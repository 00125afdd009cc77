"""The step context: everything one forward pass needs, built once per step, read by every layer.

The model runner builds a ``StepContext`` (attention metadata and the LoRA plan) and binds it to its
model's ``ForwardContext`` for the duration of the forward; the packed attention and the LoRA projections
of that model both read it from there, the same way. Nothing of a step outlives it.

Under ``--compile`` the step context stays outside the graph: the opaque ops that read it find the bound
``ForwardContext`` through ``running()`` (server/compiled.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch

if TYPE_CHECKING:
    from server.attention import AttnMeta
    from server.lora.plan import LoraPlan

T = TypeVar("T")


@dataclass
class StepContext:
    attn: AttnMeta
    lora: LoraPlan
    _shared: dict[Hashable, tuple[torch.Tensor, Any]] = field(default_factory=dict, repr=False)

    def shared(self, key: Hashable, x: torch.Tensor, compute: Callable[[], T]) -> T:
        """compute() once per key and input tensor this step.

        The projections of one LoRA group read the very same input tensor (q/k/v, gate/up): the first
        one computes their stacked base GEMM and the shrink x·A, the others reuse them. A different tensor
        recomputes.
        """
        hit = self._shared.get(key)
        if hit is not None and hit[0] is x:
            return hit[1]
        value = compute()
        self._shared[key] = (x, value)
        return value


class ForwardContext:
    """The step context of the forward in progress on one model (None between forwards), and the model's LoRA
    projections by index.

    While bound, it is also this thread's `running()` context: the packed attention and the compiled graph's
    opaque ops (server/compiled.py) find it there rather than holding it, so that models of one architecture
    share one attention implementation and one graph."""

    def __init__(self) -> None:
        self.current: StepContext | None = None
        self.projections: Sequence[Any] = ()  # LoraProjection by its index (the LoRA runtime's)
        self.opaque_calls = 0  # projections run as the compiled graph's opaque op (0: never compiled)

    @contextmanager
    def bind(self, ctx: StepContext) -> Iterator[StepContext]:
        saved, _THREAD.running = _THREAD.running, self
        self.current = ctx
        try:
            yield ctx
        finally:
            self.current = None
            _THREAD.running = saved


class _Thread(threading.local):
    running: ForwardContext | None = None


_THREAD = _Thread()


def running() -> ForwardContext:
    """The forward context bound on this thread (the model whose forward is in progress)."""
    if _THREAD.running is None:
        raise RuntimeError("no loramux forward in progress on this thread")
    return _THREAD.running
