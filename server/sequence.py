"""State of one sample of a request while the engine owns it."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import torch

from adapters_store.host_cache import HostCopy
from adapters_store.identity import AdapterIdentity
from adapters_store.prompt import VirtualTokens
from server.detokenize import IncrementalDetokenizer, StopStringMatcher
from server.engine_types import FinishReason, GenerationRequest, SeqOutput
from server.kv_blocks import Block
from server.output import Coalescer


class RequestStream:
    """Carries a request's SeqOutputs from the engine thread to the caller's event loop, in chunks of
    `interval` tokens per sample (see `Coalescer`)."""

    def __init__(self, req: GenerationRequest, loop: asyncio.AbstractEventLoop, interval: int = 1):
        self.req = req
        self.loop = loop
        self.queue: asyncio.Queue[SeqOutput | None] = asyncio.Queue()
        self.open_samples = req.params.n
        self._chunks = Coalescer(interval)

    def put(self, out: SeqOutput) -> None:
        """Engine thread only; closes the stream after the last sample's last output."""
        if out.finish_reason is not None:
            self.open_samples -= 1
        out = self._chunks.push(out)
        if out is None:
            return
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, out)
            if self.open_samples == 0:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, None)
        except RuntimeError:  # the caller's event loop is gone: nobody is listening
            pass


MixKey = tuple[tuple[AdapterIdentity, float], ...]  # a composed request's adapters and weights


@dataclass(eq=False)
class MixPart:
    """One adapter of a composed sequence: its host copy (leased from acceptance to the end) and, while the
    sequence is admitted, its device slot."""

    identity: AdapterIdentity
    weight: float
    host: HostCopy | None
    slot: int = -1


@dataclass(eq=False)
class Sequence:
    req: GenerationRequest
    index: int  # sample index in 0..n-1
    stream: RequestStream
    generator: torch.Generator | None
    detok: IncrementalDetokenizer
    stopper: StopStringMatcher
    stop_ids: frozenset[int]  # token ids that end the sequence (EOS unless ignored, and stop_token_ids)
    host: HostCopy | None = None  # lease on the adapter's host copy, held from acceptance to the end
    output_ids: list[int] = field(default_factory=list)
    block: Block | None = None  # KV arena block while admitted
    slot: int = -1  # adapter slot while admitted (-1: base model, or a composition)
    mix: list[MixPart] = field(default_factory=list)  # a composed request's adapters (then `host` is None)
    virtual_host: HostCopy | None = None  # lease on a prompt or prefix tuning adapter's host copy (its request's)
    fed: int = 0  # positions written to its KV block
    prefill_to: int = 0  # positions to write by prefill before decoding: the prompt, or everything after preemption
    finished: FinishReason | None = None
    t_admitted: float | None = None
    t_first: float | None = None
    t_last: float | None = None

    @property
    def adapter(self) -> AdapterIdentity | MixKey | None:
        """What the sequence runs on, as the router groups sequences: an adapter identity, a composition's
        identities and weights, or None (the base model)."""
        if self.mix:
            return tuple((p.identity, p.weight) for p in self.mix)
        return None if self.req.adapter is None else self.req.adapter.identity

    @property
    def merge_key(self) -> AdapterIdentity | None:
        """The adapter that could be folded into the weights for this sequence (None: base or composition)."""
        return None if self.req.adapter is None else self.req.adapter.identity

    @property
    def label(self) -> str:
        """Metric label of the adapter: its name (namespace/id), '' for the base model, '(composed)' for a
        composition or an adapter with virtual tokens beside it (one label for all of them: label values stay
        bounded)."""
        virtual = self.req.virtual
        if self.mix or (virtual is not None and self.req.adapter is not None):
            return "(composed)"
        if virtual is not None:
            return virtual.key
        return "" if self.req.adapter is None else self.req.adapter.key

    @property
    def describe(self) -> str:
        if self.mix:
            what = "the composition of " + ", ".join(f"'{p.identity.id}'" for p in self.mix)
        else:
            what = "the base model" if self.req.adapter is None else f"adapter '{self.req.adapter.id}'"
        virtual = self.req.virtual
        return what if virtual is None else f"{what} with the virtual tokens of '{virtual.id}'"

    @property
    def prompt_len(self) -> int:
        return len(self.req.prompt_ids)

    @property
    def virtual(self) -> VirtualTokens | None:
        """The virtual tokens at its first positions (prompt or prefix tuning), or None."""
        return None if self.virtual_host is None else self.virtual_host.adapter.virtual

    @property
    def offset(self) -> int:
        """Positions before the prompt: its virtual tokens."""
        virtual = self.virtual
        return 0 if virtual is None else virtual.count

    def __post_init__(self) -> None:
        self.prefill_to = self.prefill_to or self.offset + self.prompt_len

    @property
    def in_prefill(self) -> bool:
        return self.fed < self.prefill_to

    def tokens(self, start: int, end: int) -> list[int]:
        """Its token ids at positions [start, end): virtual tokens (as id 0: their embeddings or keys come from
        the adapter), the prompt, then outputs."""
        virtual = max(0, min(end, self.offset) - start)
        start, end = max(start, self.offset) - self.offset, max(end, self.offset) - self.offset
        n = self.prompt_len
        head = list(self.req.prompt_ids[start : min(end, n)])
        return [0] * virtual + head + self.output_ids[max(start, n) - n : max(end, n) - n]

    def preempted(self) -> None:
        """Its KV block was taken back: every token (outputs too) is prefilled again when it is re-admitted."""
        self.block, self.slot, self.fed, self.prefill_to, self.t_admitted = None, -1, 0, self.length, None
        for part in self.mix:
            part.slot = -1

    @property
    def length(self) -> int:
        """Tokens this sequence holds in the cache once its last output token is fed back."""
        return self.offset + self.prompt_len + len(self.output_ids)

    def mark_token(self, now: float | None = None) -> float | None:
        """Record a token's time; returns the inter-token gap (None for the first token)."""
        now = time.monotonic() if now is None else now
        gap = None if self.t_last is None else now - self.t_last
        if self.t_first is None:
            self.t_first = now
        self.t_last = now
        return gap
