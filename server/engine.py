"""The engine: one thread owns the model, the KV cache, the running batch and the adapter slots.

Each step: run queued commands (cancel, adapter load/evict, mode change), admit waiting sequences
into free KV rows (continuous batching), let the router pick the merged adapter, pack one decode
token per running sequence plus prefill chunks up to the token budget, run one forward, sample,
and stream the new text back to each request's event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from adapters_store.residency import Residency
from server.detokenize import IncrementalDetokenizer, StopStringMatcher
from server.engine_types import (
    EngineOverloaded,
    EngineStats,
    EngineStopped,
    FinishReason,
    GenerationRequest,
    Mode,
    SeqOutput,
)
from server.metrics import Metrics
from server.model_runner import ModelRunner
from server.router import Router, RouterConfig
from server.sampling import make_generator
from server.sequence import RequestStream, Sequence
from server.step import StepPlan, build_step, sample_step
from server.threads import engine_threads, single_threaded_executor, use_threads

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class EngineConfig:
    mode: Mode = "auto"
    max_batch_size: int = 32  # running sequences (one KV row each)
    max_model_len: int = 2048
    max_tokens_per_step: int = 256  # packed tokens per forward (prefill chunk budget)
    max_waiting: int = 256
    merge_share: float = 0.75
    unmerge_share: float = 0.5
    max_turn_s: float = 2.0
    threads: int | None = None  # CPU intra-op threads of the engine thread (None: every core)


class Engine:
    def __init__(self, runner: ModelRunner, tokenizer, residency: Residency, config: EngineConfig,
                 metrics: Metrics | None = None):
        self.runner = runner
        self.tokenizer = tokenizer
        self.residency = residency
        self.config = config
        self.metrics = metrics or Metrics()
        self.max_model_len = min(config.max_model_len, runner.max_model_len)
        self.router = Router(RouterConfig(config.mode, config.merge_share, config.unmerge_share,
                                          max_turn_s=config.max_turn_s))
        self.eos_ids = _eos_ids(runner.model, tokenizer)
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._free_rows = list(range(min(config.max_batch_size, runner.cache.rows)))
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()  # guards _waiting against submitters
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._accepting = True
        self._merged_record = None  # AdapterRecord held (acquired) while merged
        self._merged_key: str | None = None
        self._merged_slot: int | None = None
        self._steps = 0
        self._swaps = 0
        self._step_seconds: dict[str, float] = {"batched": 0.0, "merged": 0.0, "hybrid": 0.0, "base": 0.0}
        self._crashed: BaseException | None = None
        self._io = single_threaded_executor("loramux-adapter-io", workers=2)  # disk -> host reads

    # lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="loramux-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._crashed is None

    def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Stop taking requests, let running and waiting ones finish up to the timeout, then cancel."""
        self._accepting = False
        deadline = time.monotonic() + drain_timeout
        while self.alive and time.monotonic() < deadline and (self._running or self._waiting):
            time.sleep(0.02)
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._io.shutdown(wait=False)

    # caller API ---------------------------------------------------------------------------------
    def validate(self, req: GenerationRequest) -> None:
        """Raise ValueError (naming the numbers) for a request that can never be served."""
        req.params.validate()
        n_prompt = len(req.prompt_ids)
        if n_prompt == 0:
            raise ValueError("the prompt is empty: at least one token is needed")
        total = n_prompt + req.params.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({n_prompt} tokens) + max_tokens ({req.params.max_tokens}) = {total} exceeds the "
                f"context length of {self.max_model_len} tokens"
            )
        vocab = self.runner.vocab_size
        bad = [t for t in req.prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got {bad[:5]}")
        if req.params.n > min(self.config.max_batch_size, self.config.max_waiting):
            raise ValueError(f"n={req.params.n} exceeds what the server can hold at once "
                             f"(batch size {self.config.max_batch_size}, queue {self.config.max_waiting})")

    def submit(self, req: GenerationRequest, loop: asyncio.AbstractEventLoop) -> RequestStream:
        if not self._accepting or not self.alive:
            raise EngineStopped("the engine is not accepting requests (shutting down or stopped)")
        self.validate(req)
        stream = RequestStream(req, loop)
        seqs = [self._new_sequence(req, i, stream) for i in range(req.params.n)]
        with self._lock:
            if len(self._waiting) + len(seqs) > self.config.max_waiting:
                self.metrics.rejections.labels("queue_full").inc()
                raise EngineOverloaded(
                    f"the waiting queue is full ({len(self._waiting)} of {self.config.max_waiting} sequences)",
                    retry_after=1.0,
                )
            self._waiting.extend(seqs)
        self._wake.set()
        return stream

    async def generate(self, req: GenerationRequest) -> AsyncIterator[SeqOutput]:
        """Submit and stream the request's outputs; closing the iterator early cancels it."""
        if req.adapter is not None:  # disk -> host off the engine thread, so admission only copies to a slot
            await asyncio.get_running_loop().run_in_executor(self._io, self.residency.ensure_host, req.adapter)
        stream = self.submit(req, asyncio.get_running_loop())
        return self._iterate(stream)

    async def _iterate(self, stream: RequestStream) -> AsyncIterator[SeqOutput]:
        done = False
        try:
            while (item := await stream.queue.get()) is not None:
                yield item
            done = True
        finally:
            if not done:
                self.cancel(stream.req.request_id)

    def cancel(self, request_id: str) -> None:
        self._commands.put((lambda: self._cancel(request_id), None))
        self._wake.set()

    async def call(self, fn: Callable[[], T]) -> T:
        """Run fn in the engine thread at the next step boundary."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fn, fut))
        self._wake.set()
        return await asyncio.wrap_future(fut)

    def set_mode(self, mode: Mode) -> None:
        self._commands.put((lambda: self.router.set_mode(mode), None))
        self._wake.set()

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self._running), waiting=len(self._waiting), mode=self.router.mode,
            merged_adapter=self._merged_key, steps=self._steps, swaps=self._swaps,
            step_seconds=dict(self._step_seconds), kv_rows_used=len(self._running),
            kv_rows=self.config.max_batch_size,
        )

    # engine thread ------------------------------------------------------------------------------
    def _new_sequence(self, req: GenerationRequest, index: int, stream: RequestStream) -> Sequence:
        p = req.params
        return Sequence(
            req=req, index=index, stream=stream,
            generator=make_generator(p.seed, self.runner.device, index),
            detok=IncrementalDetokenizer(self.tokenizer, req.prompt_ids),
            stopper=StopStringMatcher(p.stop),
        )

    def _loop(self) -> None:
        if self.runner.device.type == "cpu":
            use_threads(engine_threads(self.config.threads))
        try:
            while not self._stopping:
                self._run_commands()
                if not self._running and not self._waiting:
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                self._step()
        except BaseException as exc:  # the engine must never die silently
            self._crashed = exc
            log.exception("engine loop crashed")
        finally:
            for seq in list(self._running) + list(self._waiting):
                self._finish(seq, "error" if self._crashed else "cancelled", error="the engine stopped")

    def _run_commands(self) -> None:
        while True:
            try:
                fn, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                result = fn()
            except Exception as exc:
                if fut is None:
                    log.exception("engine command failed")
                else:
                    fut.set_exception(exc)
            else:
                if fut is not None:
                    fut.set_result(result)

    def _cancel(self, request_id: str) -> None:
        for seq in [s for s in self._running if s.req.request_id == request_id]:
            self._finish(seq, "cancelled")
        with self._lock:
            dropped = [s for s in self._waiting if s.req.request_id == request_id]
            for seq in dropped:
                self._waiting.remove(seq)
        for seq in dropped:
            self._finish(seq, "cancelled")

    def _admit(self) -> None:
        now = time.monotonic()
        with self._lock:
            waiting = [(s.adapter_key, s.req.arrival) for s in self._waiting]
        self.router.begin_step((s.adapter_key for s in self._running), waiting, now)
        with self._lock:
            candidates = list(self._waiting)
        for seq in candidates:
            if not self._free_rows or len(self._running) >= self.config.max_batch_size:
                return
            if not self.router.may_admit(seq.adapter_key):
                continue
            if seq.req.adapter is not None:
                try:
                    seq.slot = self.residency.acquire(seq.req.adapter)
                except Exception as exc:  # no free slot: wait; anything else fails the request
                    if getattr(exc, "status", None) == 503:
                        continue
                    with self._lock:
                        self._waiting.remove(seq)
                    self._finish(seq, "error", error=getattr(exc, "message", str(exc)),
                                 status=getattr(exc, "status", None))
                    continue
            with self._lock:
                self._waiting.remove(seq)
            seq.row = self._free_rows.pop(0)
            seq.t_admitted = now
            self.metrics.queue_time.observe(now - seq.req.arrival)
            self._running.append(seq)

    def _apply_router(self) -> None:
        keys = [s.adapter_key for s in self._running]
        target = self.router.merged_key(keys, self._merged_key)
        if target == self._merged_key:
            return
        record = next((s.req.adapter for s in self._running if s.adapter_key == target), None)
        if target is not None and record is None:
            with self._lock:
                record = next((s.req.adapter for s in self._waiting if s.adapter_key == target), None)
        if target is not None and record is None:
            return
        t0 = time.perf_counter()
        slot = None
        if record is not None:
            slot = self.residency.acquire(record)  # held while merged
        self.runner.merged.merge(slot)
        if self._merged_record is not None:
            self.residency.release(self._merged_record, self._merged_slot)
        self._merged_record, self._merged_key, self._merged_slot = record, target, slot
        dt = time.perf_counter() - t0
        self._swaps += 1
        self.metrics.mode_switches.inc()
        self.metrics.swap_seconds.observe(dt)
        log.debug("merged adapter -> %s in %.1f ms", target, dt * 1e3)

    def _step(self) -> None:
        self._admit()
        if not self._running:
            self._wake.wait(0.01)
            self._wake.clear()
            return
        self._apply_router()
        budget = max(self.config.max_tokens_per_step, self.config.max_batch_size)
        plan: StepPlan = build_step(self._running, self.runner.merged.slot, budget, self.runner.lora.slot_ranks)
        t0 = time.perf_counter()
        try:
            logits = self.runner.forward(plan.step)
        except Exception as exc:
            log.exception("forward failed; failing the running batch")
            for seq in list(self._running):
                self._finish(seq, "error", error=f"internal error in the forward pass: {exc}")
            return
        for seq, n in plan.prefill_counts:
            seq.prefilled += n
            self.metrics.prompt_tokens.labels(_label(seq)).inc(n)
        sampled = sample_step(logits, plan.sampled, self.eos_ids, self.tokenizer)
        dt = time.perf_counter() - t0
        kind = self._step_kind()
        self._steps += 1
        self._step_seconds[kind] += dt
        self.metrics.steps.labels(kind).inc()
        self.metrics.step_seconds.labels(kind).inc(dt)
        now = time.monotonic()
        for seq, token, logprob in sampled:
            self._append(seq, token, logprob, now)
        self.metrics.requests_running.set(len(self._running))
        self.metrics.requests_waiting.set(len(self._waiting))
        self.metrics.kv_rows_used.set(len(self._running))

    def _step_kind(self) -> str:
        keys = {s.adapter_key for s in self._running}
        if self._merged_key is not None:
            return "merged" if keys == {self._merged_key} else "hybrid"
        return "base" if keys == {None} else "batched"

    def _append(self, seq: Sequence, token: int, logprob: Any, now: float) -> None:
        p = seq.req.params
        seq.output_ids.append(token)
        gap = seq.mark_token(now)
        adapter = _label(seq)
        if gap is None:
            self.metrics.ttft.labels(adapter).observe(now - seq.req.arrival)
        else:
            self.metrics.itl.observe(gap)
        self.metrics.tokens.labels(adapter).inc()
        n_out = len(seq.output_ids)
        reason: FinishReason | None = None
        is_eos = token in self.eos_ids and not p.ignore_eos
        if (is_eos or token in p.stop_token_ids) and n_out >= p.min_tokens:
            reason = "stop"
            text = ""
        else:
            text, stopped = seq.stopper.push(seq.detok.add(token))
            if stopped:
                reason = "stop"
        if reason is None and (n_out >= p.max_tokens or seq.length >= self.max_model_len):
            reason = "length"
        if reason == "length" or (reason == "stop" and not seq.stopper.stopped):
            tail, _ = seq.stopper.push(seq.detok.flush())
            text += tail + seq.stopper.flush() if not seq.stopper.stopped else tail
        seq.stream.put(SeqOutput(
            request_id=seq.req.request_id, index=seq.index, text=text, token_ids=(token,),
            logprobs=(logprob,) if logprob is not None else None, finish_reason=reason,
            prompt_tokens=seq.prompt_len, completion_tokens=n_out,
            queue_seconds=seq.t_admitted - seq.req.arrival if gap is None else None,
        ))
        if reason is not None:
            self._release(seq, reason)

    def _finish(self, seq: Sequence, reason: FinishReason, error: str | None = None,
                status: int | None = None) -> None:
        """End a sequence that is not finishing through a sampled token (cancel, error)."""
        if seq.finished is not None:
            return
        seq.stream.put(SeqOutput(
            request_id=seq.req.request_id, index=seq.index, text="", token_ids=(), logprobs=None,
            finish_reason=reason, prompt_tokens=seq.prompt_len, completion_tokens=len(seq.output_ids), error=error,
            error_status=status,
        ))
        if reason == "cancelled":
            self.metrics.cancelled.inc()
        self._release(seq, reason)

    def _release(self, seq: Sequence, reason: FinishReason) -> None:
        seq.finished = reason
        adapter = _label(seq)
        self.metrics.requests.labels(adapter, reason).inc()
        if seq.t_last is not None:
            self.metrics.e2e.labels(adapter).observe(seq.t_last - seq.req.arrival)
        if seq in self._running:
            self._running.remove(seq)
            self._free_rows.append(seq.row)
            self._free_rows.sort()
            if seq.req.adapter is not None:
                self.residency.release(seq.req.adapter, seq.slot)
        seq.row = None
        self.metrics.requests_running.set(len(self._running))
        self.metrics.kv_rows_used.set(len(self._running))


def _label(seq: Sequence) -> str:
    """Metric label of a sequence's adapter: its namespaced key ('' for the base model)."""
    return seq.req.adapter.key if seq.req.adapter is not None else ""


def _eos_ids(model, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list | tuple):
            ids.update(int(e) for e in eos)
    return frozenset(ids)

