"""Running one HTTP generation request on the engine: submit, merge the outputs, stream or collect them.

An HTTP request holds one GenerationRequest per prompt (each with `n` samples); choice `i * n + j` is sample
`j` of prompt `i`, as in OpenAI's API. Submission errors (invalid request, overload, unknown adapter) raise
before any output, so they become plain error responses. A client that goes away cancels every request.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from adapters_store.errors import ServingError
from adapters_store.store import AdapterRecord
from server.api.errors import APIError, error_body, to_api_error
from server.api.logging import access_record
from server.engine import Engine
from server.engine_types import GenerationRequest, SeqOutput, TokenLogprob, WeightedAdapter
from server.sampling import SamplingParams
from server.services import Services

REPLICA_HEADER = "X-Loramux-Replica"
MIN_LOGPROB = -9999.0  # stands for -inf in JSON, as vLLM reports it
_FINISH = {"stop": "stop", "length": "length", "cancelled": "abort", "error": "error"}


@dataclass
class Choice:
    """Accumulated output of one choice (one sample of one prompt)."""

    index: int
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0


@dataclass
class Job:
    """A validated generation request: prompts as token ids, sampling, adapter (None: base model)."""

    prompts: list[tuple[int, ...]]
    params: SamplingParams
    adapter: AdapterRecord | None
    model: str  # the name the client used, echoed in responses
    want_logprobs: bool
    mix: tuple[WeightedAdapter, ...] = ()  # a composition of adapters (then `adapter` is None)
    virtual: AdapterRecord | None = None  # a prompt or prefix tuning adapter

    @property
    def adapter_label(self) -> str | None:
        """The adapter as the access log names it: its key, or each key of a composition with its weight, and
        the key of its virtual tokens' adapter."""
        parts = [f"{m.record.key}*{m.weight:g}" for m in self.mix] or ([self.adapter.key] if self.adapter else [])
        parts += [self.virtual.key] if self.virtual is not None else []
        return "+".join(parts) or None


class GenerationRun:
    """The engine requests of one HTTP request and their interleaved outputs."""

    def __init__(self, engine: Engine, job: Job, tenant: str | None, streamed: bool = True):
        prefix = uuid.uuid4().hex
        self.engine = engine
        self.n = job.params.n
        self.requests = [
            GenerationRequest(request_id=f"{prefix}-{i}", prompt_ids=p, params=job.params, adapter=job.adapter,
                              tenant=tenant, mix=job.mix, virtual=job.virtual, streamed=streamed)
            for i, p in enumerate(job.prompts)
        ]
        self.prompt_tokens = sum(len(p) for p in job.prompts)
        self._iterators: list[AsyncIterator[SeqOutput]] = []
        self._open = [self.n] * len(self.requests)  # samples not finished, per request
        self._tasks: list[asyncio.Task] = []

    def validate(self) -> None:
        """InvalidRequest naming the numbers (context length, vocabulary, ...) before anything is queued."""
        for req in self.requests:
            self.engine.validate(req)

    async def submit(self) -> None:
        """Queue every request; on any failure cancel the ones already queued and raise."""
        try:
            for req in self.requests:
                self._iterators.append(await self.engine.generate(req))
        except BaseException:
            self.close()
            raise

    @property
    def headers(self) -> dict[str, str]:
        """`X-Loramux-Replica`: in a cluster, the engine replicas that run the request's prompts."""
        names = sorted({name for it in self._iterators if (name := getattr(it, "replica", None))})
        return {REPLICA_HEADER: ",".join(names)} if names else {}

    async def outputs(self) -> AsyncIterator[tuple[int, SeqOutput]]:
        """(choice index, output) as the engine produces them, every request interleaved."""
        if len(self._iterators) == 1:
            async for out in self._iterators[0]:
                yield self._mark(0, out)
            return
        queue: asyncio.Queue[tuple[int, SeqOutput | None]] = asyncio.Queue()

        async def pump(i: int, it: AsyncIterator[SeqOutput]) -> None:
            try:
                async for out in it:
                    queue.put_nowait((i, out))
            finally:
                queue.put_nowait((i, None))

        self._tasks = [asyncio.ensure_future(pump(i, it)) for i, it in enumerate(self._iterators)]
        remaining = len(self._tasks)
        while remaining:
            i, out = await queue.get()
            if out is None:
                remaining -= 1
            else:
                yield self._mark(i, out)

    def _mark(self, i: int, out: SeqOutput) -> tuple[int, SeqOutput]:
        if out.finish_reason is not None:
            self._open[i] -= 1
        return i * self.n + out.index, out

    def close(self) -> None:
        """Cancel whatever has not finished (synchronous, idempotent: safe in a cancelled task's cleanup)."""
        for task in self._tasks:
            task.cancel()
        for req, still_open in zip(self.requests, self._open, strict=True):
            if still_open:
                self.engine.cancel(req.request_id)
        self._open = [0] * len(self.requests)


def finite(x: float) -> float:
    return x if math.isfinite(x) else MIN_LOGPROB


def finish_reason(out: SeqOutput) -> str | None:
    return None if out.finish_reason is None else _FINISH[out.finish_reason]


def output_error(out: SeqOutput) -> APIError | None:
    """The error a sample ended with, if any, as the engine or the store typed it."""
    return None if out.error is None else to_api_error(out.error)


Formatter = Callable[[Choice], dict]
ChunkFormatter = Callable[[int, SeqOutput, Choice], dict]


@dataclass
class ResponseShape:
    """How one endpoint renders choices: the full response and the streamed chunks."""

    object: str  # "text_completion" / "chat.completion"
    chunk_object: str
    id_prefix: str
    choice: Formatter  # accumulated choice -> response choice
    chunk_choice: ChunkFormatter  # (choice index, new output, accumulated choice) -> chunk choice
    opening_chunk: Callable[[int], dict] | None = None  # choice index -> first chunk choice (chat's role)


async def serve_generation(request: Request, services: Services, tenant: str | None,
                           prepare: Callable[[], Awaitable[Job]], stream: bool, include_usage: bool,
                           shape_of: Callable[[Job], ResponseShape]) -> Response:
    """Take one of the tenant's request places (before `prepare` tokenizes: that work counts too), validate,
    submit, then stream SSE chunks or return the whole response; the place is held until the response ends."""
    tenants = services.tenants
    tenants.acquire(tenant)
    release = _Once(lambda: tenants.release(tenant))
    try:
        job = await prepare()
        run = GenerationRun(services.engine, job, tenant, streamed=stream)
        run.validate()
        _check_sequences(job, tenants.quota(tenant).max_waiting)
    except BaseException:
        release()
        raise
    shape = shape_of(job)
    record = access_record(request)
    if record is not None:
        record.adapter = job.adapter_label
        record.prompt_tokens = run.prompt_tokens
    cleanup = _Cleanup(run, release)
    try:
        await run.submit()
    except ServingError as e:
        cleanup()
        raise to_api_error(e) from None
    except BaseException:
        cleanup()
        raise
    response_id = f"{shape.id_prefix}{uuid.uuid4().hex}"
    created = int(time.time())
    if stream:
        events = _sse(run, job, shape, response_id, created, include_usage, request)
        return _ClosingStreamingResponse(events, cleanup, media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                                  **run.headers})
    try:
        choices = await _until_disconnect(request, _collect(run, job, request))
    finally:
        cleanup()
    if choices is None:
        return Response(status_code=499)
    usage = _usage(run, choices)
    body = {"id": response_id, "object": shape.object, "created": created, "model": job.model,
            "choices": [shape.choice(c) for c in choices], "usage": usage}
    return JSONResponse(body, headers=run.headers)


def _check_sequences(job: Job, cap: int | None) -> None:
    """One request may not ask for more sequences (n x prompts) than its tenant may queue."""
    total = job.params.n * len(job.prompts)
    if cap is not None and total > cap:
        raise APIError(400, f"the request asks for {total} sequences (n={job.params.n} x {len(job.prompts)} "
                       f"prompts); a tenant may queue {cap} (--max-waiting-per-tenant)", param="n",
                       reason="invalid_request")


class _Once:
    """Calls `fn` the first time it is called, never again."""

    def __init__(self, fn: Callable[[], None]):
        self._fn: Callable[[], None] | None = fn

    def __call__(self) -> None:
        fn, self._fn = self._fn, None
        if fn is not None:
            fn()


class _Cleanup:
    """Runs once: cancel the run's unfinished engine requests and free the tenant slot."""

    def __init__(self, run: GenerationRun, release: Callable[[], None]):
        self._run, self._release, self._done = run, release, False

    def __call__(self) -> None:
        if not self._done:
            self._done = True
            self._run.close()
            self._release()


class _ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that runs `cleanup` however it ends (finished, failed, client gone, cancelled)."""

    def __init__(self, content: AsyncIterator[str], cleanup: Callable[[], None], **kwargs):
        super().__init__(content, **kwargs)
        self._cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._cleanup()


def _choices(job: Job, n: int) -> list[Choice]:
    return [Choice(index=i) for i in range(len(job.prompts) * n)]


def _accumulate(choice: Choice, out: SeqOutput) -> None:
    choice.text.append(out.text)
    if out.logprobs:
        choice.logprobs.extend(out.logprobs)
    choice.completion_tokens = max(choice.completion_tokens, out.completion_tokens)
    choice.finish_reason = finish_reason(out) or choice.finish_reason


def _usage(run: GenerationRun, choices: list[Choice]) -> dict:
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": run.prompt_tokens, "completion_tokens": completion,
            "total_tokens": run.prompt_tokens + completion}


async def _collect(run: GenerationRun, job: Job, request: Request) -> list[Choice]:
    choices = _choices(job, run.n)
    start = time.perf_counter()
    record = access_record(request)
    async for index, out in run.outputs():
        error = output_error(out)
        if error is not None:
            raise error
        if record is not None and record.ttft_s is None and out.token_ids:
            record.ttft_s = time.perf_counter() - start
            record.queue_s = out.queue_seconds
        _accumulate(choices[index], out)
    if record is not None:
        record.completion_tokens = sum(c.completion_tokens for c in choices)
    return choices


async def _until_disconnect(request: Request, work) -> list[Choice] | None:
    """Await `work`; if the client disconnects first, cancel it and return None."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        record = access_record(request)
        if record is not None:
            record.disconnected = True
        return None
    finally:
        watcher.cancel()
        task.cancel()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _event(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return f"data: {data}\n\n"


async def _sse(run: GenerationRun, job: Job, shape: ResponseShape, response_id: str, created: int,
               include_usage: bool, request: Request) -> AsyncIterator[str]:
    """Server-sent events: one chunk per output, then usage (if asked) and `data: [DONE]`."""
    choices = _choices(job, run.n)
    record = access_record(request)
    start = time.perf_counter()

    def chunk(choice_list: list[dict], usage: dict | None = None) -> str:
        body = {"id": response_id, "object": shape.chunk_object, "created": created, "model": job.model,
                "choices": choice_list}
        if include_usage:
            body["usage"] = usage
        return _event(body)

    finished = False
    try:
        if shape.opening_chunk is not None:
            for c in choices:
                yield chunk([shape.opening_chunk(c.index)])
        async for index, out in run.outputs():
            error = output_error(out)
            if error is not None:
                if record is not None:
                    record.error = error.message
                yield _event(error_body(error.status, error.message, error.code))
                break
            if record is not None and record.ttft_s is None and out.token_ids:
                record.ttft_s = time.perf_counter() - start
                record.queue_s = out.queue_seconds
            choice = choices[index]
            _accumulate(choice, out)
            if out.text or out.finish_reason is not None or out.logprobs:
                yield chunk([shape.chunk_choice(index, out, choice)])
        else:
            if include_usage:
                yield chunk([], _usage(run, choices))
        yield _event("[DONE]")
        finished = True
    finally:
        if record is not None:
            record.completion_tokens = sum(c.completion_tokens for c in choices)
            record.disconnected = not finished


def legacy_logprobs(entries: Sequence[TokenLogprob], offset: int) -> dict:
    """OpenAI completions `logprobs`: tokens, token_logprobs, top_logprobs, text_offset (from `offset`)."""
    tokens, token_logprobs, top, text_offset = [], [], [], []
    for e in entries:
        tokens.append(e.token)
        token_logprobs.append(finite(e.logprob))
        top.append({text: finite(lp) for _, text, lp in e.top})
        text_offset.append(offset)
        offset += len(e.token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": text_offset}


def chat_logprobs(entries: Sequence[TokenLogprob]) -> dict:
    """OpenAI chat `logprobs.content`: token, logprob, bytes and top_logprobs per token."""
    return {"content": [
        {"token": e.token, "logprob": finite(e.logprob), "bytes": list(e.token.encode("utf-8")),
         "top_logprobs": [{"token": t, "logprob": finite(lp), "bytes": list(t.encode("utf-8"))}
                          for _, t, lp in e.top]}
        for e in entries
    ]}
