"""What callers hand the engine and what they get back (no tensors cross this boundary)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

from adapters_store.errors import ServingError
from adapters_store.store import AdapterRecord
from server.sampling import SamplingParams

FinishReason = Literal["stop", "length", "cancelled", "error"]
Mode = Literal["auto", "batched", "merged"]
MAX_ADAPTER_WEIGHT = 8.0  # |weight| of an adapter in a composed request


@dataclass(frozen=True)
class WeightedAdapter:
    """One adapter of a composed request: its delta enters the request's rows times `weight`."""

    record: AdapterRecord
    weight: float


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    adapter: AdapterRecord | None = None  # None = the base model (or the composition in `mix`)
    tenant: str | None = None
    arrival: float = field(default_factory=time.monotonic)
    # several adapters with weights (or one at a weight other than 1), on top of the base model; `adapter` is None
    mix: tuple[WeightedAdapter, ...] = ()
    # a prompt or prefix tuning adapter: its virtual tokens precede the prompt (alone, or beside `adapter` or `mix`)
    virtual: AdapterRecord | None = None
    streamed: bool = True  # False: the caller wants the whole response, outputs may come in large chunks


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...]  # (token id, token text, logprob), most likely first


@dataclass(frozen=True)
class SeqOutput:
    """New output of one sample (index < n) of a request since its previous SeqOutput."""

    request_id: str
    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None
    finish_reason: FinishReason | None  # set on the sample's last output
    prompt_tokens: int
    completion_tokens: int  # generated so far by this sample
    error: ServingError | None = None  # with finish_reason "error": why (typed, carries its HTTP status)
    queue_seconds: float | None = None  # on a sample's first token: arrival to admission into the batch


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    mode: Mode
    merged_adapter: str | None  # identity of the adapter folded into the weights
    steps: int
    swaps: int
    step_seconds: dict[str, float]  # execution kind ("batched", "merged", "hybrid") -> seconds spent
    kv_tokens_used: int  # tokens of KV arena held by running sequences' blocks
    kv_tokens: int
