"""The step context: everything one forward pass needs, built once per step, read by every layer.

The model runner builds a ``StepContext`` (attention metadata and the LoRA plan) and binds it to its
model's ``ForwardContext`` for the duration of the forward; the packed attention and the LoRA projections
of that model both read it from there, the same way. Nothing of a step outlives it.

Every tensor field has a fixed meaning and shape (see ``AttnMeta`` and ``LoraPlan``): a compiled forward
can take them as inputs, with the token count padded to a bucket.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
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
    _shared: dict[int, tuple[torch.Tensor, Any]] = field(default_factory=dict, repr=False)

    def shared(self, key: int, x: torch.Tensor, compute: Callable[[], T]) -> T:
        """compute() once per key and input tensor this step.

        The projections of one LoRA group read the very same input tensor (q/k/v, gate/up): the first
        one computes the shrink x·A, the others reuse it. A different tensor recomputes.
        """
        hit = self._shared.get(key)
        if hit is not None and hit[0] is x:
            return hit[1]
        value = compute()
        self._shared[key] = (x, value)
        return value


class ForwardContext:
    """The step context of the forward in progress on one model (None between forwards)."""

    def __init__(self) -> None:
        self.current: StepContext | None = None

    @contextmanager
    def bind(self, ctx: StepContext) -> Iterator[StepContext]:
        self.current = ctx
        try:
            yield ctx
        finally:
            self.current = None


@dataclass
class Running:
    """A model whose forward may be in progress on a thread: its forward context and its LoRA projections by
    index. The packed attention and the compiled graph's opaque ops (server/compiled.py) find them here, so
    that models of one architecture share one attention implementation and one graph."""

    context: ForwardContext
    projections: Sequence[Any]  # LoraProjection by its index
    opaque_calls: int = 0  # projections run as the compiled graph's opaque op (0: never compiled)


class _Thread(threading.local):
    running: Running | None = None


_THREAD = _Thread()


def running() -> Running:
    """The model whose forward is in progress on this thread."""
    if _THREAD.running is None:
        raise RuntimeError("no loramux forward in progress on this thread")
    return _THREAD.running


@contextmanager
def in_progress(model: Running) -> Iterator[Running]:
    saved, _THREAD.running = _THREAD.running, model
    try:
        yield model
    finally:
        _THREAD.running = saved
