"""POST /v1/completions and POST /v1/chat/completions (OpenAI-compatible; `model` = adapter id or base name;
`adapters` = a weighted composition of adapters on the base model)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import Response

from adapters_store.store import AdapterRecord
from server.api.auth import PrincipalDep, find_adapter, scope_namespace
from server.api.deps import ServicesDep
from server.api.errors import APIError, error_responses
from server.api.generation import (
    Choice,
    Job,
    ResponseShape,
    chat_logprobs,
    finish_reason,
    legacy_logprobs,
    serve_generation,
)
from server.api.keys import Principal
from server.api.limits import check_sampling_limits
from server.api.schemas import ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse
from server.engine_types import SeqOutput, WeightedAdapter
from server.sampling import SamplingParams
from server.services import Services
from server.settings import Settings
from server.validation import KIND_NAMES, VIRTUAL_KINDS

router = APIRouter(tags=["generation"], responses=error_responses(400, 401, 403, 404, 413, 422, 429, 500, 503))
_SSE = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
              "description": "JSON, or server-sent events when `stream` is true"}}


def resolve_model(services: Services, principal: Principal, name: str, tenant: str | None) -> AdapterRecord | None:
    """None for the base model's served name, else the caller's adapter (own first, then shared); 404 if none."""
    scope_namespace(principal, tenant)  # 403 for a user's ?tenant=
    if name == services.served_model_name:
        return None
    record = find_adapter(services.store, principal, name, tenant)
    if record is None:
        raise APIError(404, f"the model '{name}' does not exist (neither the base model "
                       f"'{services.served_model_name}' nor an adapter you can use)", "model_not_found",
                       param="model")
    return record


@dataclass(frozen=True)
class AdapterChoice:
    """What a request runs on: one adapter or a composition (or neither: the base model), and virtual tokens."""

    adapter: AdapterRecord | None = None
    mix: tuple[WeightedAdapter, ...] = ()
    virtual: AdapterRecord | None = None  # a prompt or prefix tuning adapter

    @property
    def virtual_tokens(self) -> int:
        return 0 if self.virtual is None else self.virtual.virtual_tokens


def resolve_adapters(services: Services, principal: Principal, body: CompletionRequest | ChatCompletionRequest,
                     tenant: str | None) -> AdapterChoice:
    """The request's adapter, or its composition (`adapters`), and its prompt or prefix tuning adapter (named by
    `model`, or once in `adapters` at weight 1); 404 for an adapter the caller cannot use."""
    record = resolve_model(services, principal, body.model, tenant)
    if body.adapters is None:
        virtual = record is not None and record.kind in VIRTUAL_KINDS
        return AdapterChoice(virtual=record) if virtual else AdapterChoice(adapter=record)
    if record is not None:
        raise APIError(400, f"with `adapters`, `model` must name the base model '{services.served_model_name}', "
                       f"not the adapter '{body.model}'", param="model")
    mix, virtual = [], None
    for i, item in enumerate(body.adapters):
        found = find_adapter(services.store, principal, item.id, tenant)
        if found is None:
            raise APIError(404, f"adapters[{i}]: the adapter '{item.id}' does not exist (or you cannot use it)",
                           "model_not_found", param=f"adapters[{i}].id")
        if found.kind not in VIRTUAL_KINDS:
            mix.append(WeightedAdapter(found, item.weight))
            continue
        if virtual is not None:
            raise APIError(400, f"adapters[{i}]: '{item.id}' is a second adapter of virtual tokens (the request "
                           f"already has '{virtual.id}'); at most one prompt or prefix tuning adapter per request",
                           param=f"adapters[{i}].id")
        if item.weight != 1.0:
            raise APIError(400, f"adapters[{i}]: '{item.id}' is {KIND_NAMES[found.kind]} adapter: its virtual tokens "
                           f"take no weight (got {item.weight:g}, only 1)", param=f"adapters[{i}].weight")
        virtual = found
    if len(mix) == 1 and mix[0].weight == 1.0:  # one adapter at its own scale: a plain request
        return AdapterChoice(mix[0].record, (), virtual)
    return AdapterChoice(None, tuple(mix), virtual)


def sampling_params(body: CompletionRequest | ChatCompletionRequest, settings: Settings, max_tokens: int,
                    logprobs: int | None) -> SamplingParams:
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) not in (None, 0):
            raise APIError(400, f"{name}={getattr(body, name)} is not supported (only 0)", param=name)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    check_sampling_limits(n=body.n, stop=stop, max_n=min(settings.max_n, settings.max_waiting),
                          max_stop=settings.max_stop)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        seed=body.seed,
        min_tokens=body.min_tokens,
        ignore_eos=body.ignore_eos,
        stop=tuple(stop),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        logprobs=logprobs,
        n=body.n,
    )


def _tokenize_prompts(tokenizer, prompt: str | list) -> list[tuple[int, ...]]:
    """Text, texts, token ids or lists of token ids -> one tuple of token ids per prompt."""
    items = [prompt] if isinstance(prompt, str) else prompt
    if not items or all(isinstance(t, int) for t in items):
        return [tuple(items)]
    return [tuple(tokenizer(p).input_ids) if isinstance(p, str) else tuple(p) for p in items]


def _chat_prompt(tokenizer, messages: list[dict]) -> tuple[int, ...]:
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "the base model's tokenizer has no chat template; use /v1/completions")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # jinja errors raised by the template itself (e.g. unsupported role order)
        raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from None
    return tuple(tokenizer(text, add_special_tokens=False).input_ids)


def completion_shape(want_logprobs: bool) -> ResponseShape:
    def choice(c: Choice) -> dict:
        return {"index": c.index, "text": "".join(c.text),
                "logprobs": legacy_logprobs(c.logprobs, 0) if want_logprobs else None,
                "finish_reason": c.finish_reason}

    def chunk_choice(index: int, out: SeqOutput, c: Choice) -> dict:
        logprobs = None
        if want_logprobs:
            new = list(out.logprobs or ())
            offset = sum(len(e.token) for e in c.logprobs[: len(c.logprobs) - len(new)])
            logprobs = legacy_logprobs(new, offset)
        return {"index": index, "text": out.text, "logprobs": logprobs, "finish_reason": finish_reason(out)}

    return ResponseShape("text_completion", "text_completion", "cmpl-", choice, chunk_choice)


def chat_shape(want_logprobs: bool) -> ResponseShape:
    def choice(c: Choice) -> dict:
        return {"index": c.index, "message": {"role": "assistant", "content": "".join(c.text)},
                "logprobs": chat_logprobs(c.logprobs) if want_logprobs else None, "finish_reason": c.finish_reason}

    def chunk_choice(index: int, out: SeqOutput, c: Choice) -> dict:
        return {"index": index, "delta": {"content": out.text} if out.text else {},
                "logprobs": chat_logprobs(out.logprobs or ()) if want_logprobs else None,
                "finish_reason": finish_reason(out)}

    def opening(index: int) -> dict:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    return ResponseShape("chat.completion", "chat.completion.chunk", "chatcmpl-", choice, chunk_choice, opening)


@router.post("/v1/completions", response_model=CompletionResponse, responses=_SSE)
async def create_completion(body: CompletionRequest, request: Request, services: ServicesDep,
                            principal: PrincipalDep, tenant: str | None = None) -> Response:
    """OpenAI completions; `prompt` is text, texts, token ids or lists of token ids."""
    if body.echo:
        raise APIError(400, "echo=true is not supported", param="echo")
    choice = resolve_adapters(services, principal, body, tenant)
    params = sampling_params(body, services.settings, body.max_tokens or 16, body.logprobs)

    async def prepare() -> Job:
        prompts = await asyncio.to_thread(_tokenize_prompts, services.model.tokenizer, body.prompt)
        return Job(prompts, params, choice.adapter, body.model, want_logprobs=body.logprobs is not None,
                   mix=choice.mix, virtual=choice.virtual)

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await serve_generation(request, services, principal.tenant, prepare, body.stream, include_usage,
                                  lambda job: completion_shape(job.want_logprobs))


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_SSE)
async def create_chat_completion(body: ChatCompletionRequest, request: Request, services: ServicesDep,
                                 principal: PrincipalDep, tenant: str | None = None) -> Response:
    """OpenAI chat completions through the base model's chat template."""
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    choice = resolve_adapters(services, principal, body, tenant)
    messages = [{"role": m.role, "content": m.text()} | ({"name": m.name} if m.name else {}) for m in body.messages]

    async def prepare() -> Job:
        prompt = await asyncio.to_thread(_chat_prompt, services.model.tokenizer, messages)
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:
            max_tokens = max(1, services.engine.max_model_len - choice.virtual_tokens - len(prompt))
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = sampling_params(body, services.settings, max_tokens, logprobs)
        return Job([prompt], params, choice.adapter, body.model, want_logprobs=body.logprobs, mix=choice.mix,
                   virtual=choice.virtual)

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await serve_generation(request, services, principal.tenant, prepare, body.stream, include_usage,
                                  lambda job: chat_shape(job.want_logprobs))
