"""What makes a generation request servable at all, checked before anything is queued.

The engine checks every request against its own ``RequestLimits``; the cluster's ingress checks it against
the limits its replicas report, so that a bad request gets its 400 without a round trip to a replica.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from server.engine_types import MAX_ADAPTER_WEIGHT, GenerationRequest
from server.errors import InvalidRequest

KIND_NAMES = {"lora": "a LoRA", "dora": "a DoRA", "ia3": "an IA3", "prompt": "a prompt tuning",
              "prefix": "a prefix tuning"}
VIRTUAL_KINDS = frozenset({"prompt", "prefix"})  # adapters of virtual tokens, not of weights


@dataclass(frozen=True)
class RequestLimits:
    max_model_len: int  # prompt + max_tokens
    vocab_size: int  # prompt token ids lie in [0, vocab_size)
    max_composed: int  # adapters one composed request may name (flag and device slots)
    max_batch_size: int  # running sequences: n may not exceed it (nor max_waiting)
    max_waiting: int


def check_request(req: GenerationRequest, limits: RequestLimits) -> None:
    """Raise InvalidRequest (naming the numbers) for a request that can never be served."""
    try:
        req.params.validate()
    except ValueError as e:
        raise InvalidRequest(str(e)) from None
    n_prompt = len(req.prompt_ids)
    if n_prompt == 0:
        raise InvalidRequest("the prompt is empty: at least one token is needed")
    _check_kinds(req)
    n_virtual = 0 if req.virtual is None else req.virtual.virtual_tokens
    total = n_virtual + n_prompt + req.params.max_tokens
    if total > limits.max_model_len:
        virtual = f"virtual tokens of '{req.virtual.id}' ({n_virtual}) + " if n_virtual else ""
        raise InvalidRequest(f"{virtual}prompt ({n_prompt} tokens) + max_tokens ({req.params.max_tokens}) = "
                             f"{total} exceeds the context length of {limits.max_model_len} tokens")
    vocab = limits.vocab_size
    bad = [t for t in req.prompt_ids if not 0 <= t < vocab]
    if bad:
        raise InvalidRequest(f"prompt token ids must be in [0, {vocab}), got {bad[:5]}")
    if req.mix:
        _check_mix(req, limits.max_composed)
    if req.params.n > min(limits.max_batch_size, limits.max_waiting):
        raise InvalidRequest(f"n={req.params.n} exceeds what the server can hold at once "
                             f"(batch size {limits.max_batch_size}, queue {limits.max_waiting})")


def _check_kinds(req: GenerationRequest) -> None:
    """Virtual tokens come only from `virtual`, and `virtual` only from a prompt or prefix tuning adapter."""
    if req.adapter is not None and req.adapter.kind in VIRTUAL_KINDS:
        raise InvalidRequest(f"adapter '{req.adapter.id}' is {KIND_NAMES[req.adapter.kind]} adapter: it goes in "
                             "the request's virtual tokens, not its weights")
    if req.virtual is not None and req.virtual.kind not in VIRTUAL_KINDS:
        raise InvalidRequest(f"adapter '{req.virtual.id}' is {KIND_NAMES[req.virtual.kind]} adapter, not a prompt "
                             "or prefix tuning one: it has no virtual tokens")


def _check_mix(req: GenerationRequest, limit: int) -> None:
    if req.adapter is not None:
        raise InvalidRequest("a request names either one adapter or a composition of adapters, not both")
    if len(req.mix) > limit:
        raise InvalidRequest(f"the request composes {len(req.mix)} adapters; at most {limit} may be composed "
                             f"(--max-adapters-per-request, and no more than the device slots)")
    names = [m.record.key for m in req.mix]
    if len(set(names)) != len(names):
        raise InvalidRequest(f"the composition names an adapter twice: {names}")
    for m in req.mix:
        if m.record.kind != "lora":
            raise InvalidRequest(f"adapter '{m.record.id}' is {KIND_NAMES[m.record.kind]} adapter, which "
                                 "cannot be composed or scaled (its rescale is not linear in a delta)")
        if not m.record.composable:
            raise InvalidRequest(f"adapter '{m.record.id}' replaces rows or a copy of the embedding or the head "
                                 "(trainable_token_indices, modules_to_save), which cannot be composed or scaled")
        if not math.isfinite(m.weight) or abs(m.weight) > MAX_ADAPTER_WEIGHT:
            raise InvalidRequest(f"the weight of adapter '{m.record.id}' is {m.weight}; weights must be finite "
                                 f"and within [-{MAX_ADAPTER_WEIGHT:g}, {MAX_ADAPTER_WEIGHT:g}]")
