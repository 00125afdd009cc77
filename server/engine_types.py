"""What callers hand the engine and what they get back (no tensors cross this boundary)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

from adapters_store.store import AdapterRecord
from server.sampling import SamplingParams

FinishReason = Literal["stop", "length", "cancelled", "error"]
Mode = Literal["auto", "batched", "merged"]


class EngineOverloaded(Exception):
    """The waiting queue is full (HTTP 503 with Retry-After)."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class EngineStopped(Exception):
    """The engine is shutting down or died; no new requests are taken (HTTP 503)."""


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    adapter: AdapterRecord | None = None  # None = the base model
    tenant: str | None = None
    arrival: float = field(default_factory=time.monotonic)


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
    error: str | None = None
    error_status: int | None = None  # HTTP status that fits the error (e.g. 404: adapter purged while queued)
    queue_seconds: float | None = None  # on a sample's first token: arrival to admission into the batch


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    mode: Mode
    merged_adapter: str | None  # key of the adapter folded into the weights
    steps: int
    swaps: int
    step_seconds: dict[str, float]  # execution kind ("batched", "merged", "hybrid") -> seconds spent
    kv_rows_used: int
    kv_rows: int
