"""The engine: one thread owns the model, the KV cache, the running batch and the adapter slots.

Callers (the HTTP handlers' event loop) ``generate``: the request's adapter is leased in host memory off
the engine thread, then its `n` sequences are queued. The engine thread loops: run queued commands
(cancel, adapter load/evict, mode change), let the scheduler admit sequences and pick the merged adapter,
pack one step (``step.py``), run the forward, sample, and turn each token into output (``output.py``)
streamed back to its request's event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from adapters_store.errors import ServingError
from adapters_store.host_cache import HostCache, HostCopy
from server.detokenize import IncrementalDetokenizer, StopStringMatcher
from server.engine_types import (
    EngineStats,
    FinishReason,
    GenerationRequest,
    Mode,
    SeqOutput,
    TokenLogprob,
)
from server.errors import EngineStopped, GenerationFailed
from server.metrics import Metrics
from server.model_runner import ModelRunner
from server.output import UNSTREAMED_INTERVAL, OutputProcessor
from server.sampling import make_generator
from server.scheduler import Scheduler, SchedulerConfig
from server.sequence import MixPart, RequestStream, Sequence
from server.step import StepPlan, build_step, sample_step
from server.threads import engine_threads, hold_threads, single_threaded_executor, use_threads
from server.validation import RequestLimits, check_request

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class EngineConfig:
    mode: Mode = "auto"
    max_batch_size: int = 64  # running sequences
    max_model_len: int = 2048
    kv_cache_tokens: int = 32768  # the KV arena, shared by the running sequences in blocks
    max_tokens_per_step: int = 256  # packed tokens per forward (prefill chunk budget)
    max_waiting: int = 256
    merge_share: float = 0.75
    unmerge_share: float = 0.5
    max_turn_s: float = 2.0
    queue_timeout: float | None = 120.0  # seconds a sequence may wait for admission before a 503
    threads: int | None = None  # CPU intra-op threads of the engine thread (None: every core)
    max_adapters_per_request: int = 4  # adapters one composed request may name
    stream_interval: int = 1  # tokens per streamed chunk of a sample (its first and last go out at once)

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(self.mode, self.max_batch_size, self.max_waiting, self.merge_share,
                               self.unmerge_share, self.max_turn_s, self.queue_timeout)


class Engine:
    def __init__(self, runner: ModelRunner, tokenizer, host: HostCache, config: EngineConfig,
                 metrics: Metrics | None = None, waiting_cap: Callable[[str | None], int | None] | None = None):
        self.runner = runner
        self.tokenizer = tokenizer
        self.host = host
        self.config = config
        self.metrics = metrics or Metrics()
        self.max_model_len = min(config.max_model_len, runner.max_model_len)
        self.eos_ids = eos_ids(runner.model, tokenizer)
        self.scheduler = Scheduler(config.scheduler_config(), runner.cache, runner.slots, host, self.metrics,
                                   waiting_cap or (lambda tenant: None))
        self.output = OutputProcessor(self.max_model_len)
        blocks = runner.cache.blocks
        self.metrics.watch(lambda: len(self.scheduler.running), lambda: self.scheduler.waiting,
                           lambda: blocks.used_units * blocks.unit)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._threads: int | None = None  # the engine thread's torch thread count (CPU), set by its loop
        self._accepting = True
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
        """Stop taking requests, let running and waiting ones finish up to the timeout, then end them."""
        self._accepting = False
        deadline = time.monotonic() + drain_timeout
        while self.alive and time.monotonic() < deadline and not self.scheduler.idle:
            time.sleep(0.02)
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._io.shutdown(wait=False)

    # caller API ---------------------------------------------------------------------------------
    @property
    def limits(self) -> RequestLimits:
        cfg = self.config
        return RequestLimits(max_model_len=self.max_model_len, vocab_size=self.runner.vocab_size,
                             max_composed=min(cfg.max_adapters_per_request, self.runner.slots.stats.slots),
                             max_batch_size=cfg.max_batch_size, max_waiting=cfg.max_waiting)

    def validate(self, req: GenerationRequest) -> None:
        """Raise InvalidRequest (naming the numbers) for a request that can never be served."""
        check_request(req, self.limits)

    async def generate(self, req: GenerationRequest) -> AsyncIterator[SeqOutput]:
        """Lease the adapter's host copy, queue the request and stream its outputs; closing the iterator
        early cancels it. Raises (before any output) for an invalid request, a full queue or an adapter
        that cannot be read."""
        if not self._accepting or not self.alive:
            raise EngineStopped("the engine is not accepting requests (shutting down or stopped)")
        self.validate(req)
        loop = asyncio.get_running_loop()
        n = req.params.n
        records = [r for r in (req.adapter, *(m.record for m in req.mix), req.virtual) if r is not None]
        hosts: list[HostCopy] = []
        try:
            for record in records:  # disk -> host off the engine thread, held until the request ends
                hosts.append(await loop.run_in_executor(self._io, self.host.lease, record, n))
            interval = self.config.stream_interval if req.streamed else UNSTREAMED_INTERVAL
            stream = RequestStream(req, loop, interval)
            self.scheduler.submit([self._new_sequence(req, i, stream, hosts) for i in range(n)])
        except BaseException:
            for host in hosts:
                self.host.release(host, n)
            raise
        self._wake.set()
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
        self._command(lambda: self._cancel(request_id))

    async def call(self, fn: Callable[[], T]) -> T:
        """Run fn in the engine thread at the next step boundary."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._command(fn, fut)
        return await asyncio.wrap_future(fut)

    def set_mode(self, mode: Mode) -> None:
        self._command(lambda: self.scheduler.router.set_mode(mode))

    def stats(self) -> EngineStats:
        merged = self.scheduler.merged_adapter()
        running = len(self.scheduler.running)
        return EngineStats(
            running=running, waiting=self.scheduler.waiting, mode=self.scheduler.router.mode,
            merged_adapter=None if merged is None else str(merged), steps=int(self.metrics.total("loramux_steps")),
            swaps=int(self.metrics.total("loramux_mode_switches")), step_seconds=self.metrics.step_seconds_by_kind(),
            kv_tokens_used=self.runner.cache.blocks.used_units * self.runner.cache.unit,
            kv_tokens=self.runner.cache.tokens,
        )

    # engine thread ------------------------------------------------------------------------------
    def _command(self, fn: Callable[[], object], fut: concurrent.futures.Future | None = None) -> None:
        self._commands.put((fn, fut))
        self._wake.set()

    def _new_sequence(self, req: GenerationRequest, index: int, stream: RequestStream,
                      hosts: list[HostCopy]) -> Sequence:
        """hosts: the host copy of the request's adapter, or of each adapter of its composition (in order), then
        of its virtual tokens' adapter."""
        p = req.params
        stop_ids = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.eos_ids)
        virtual = hosts[-1] if req.virtual is not None else None
        weights = hosts[:-1] if virtual is not None else hosts
        mix = [MixPart(m.record.identity, m.weight, host) for m, host in zip(req.mix, weights if req.mix else [],
                                                                            strict=True)]
        return Sequence(
            req=req, index=index, stream=stream, generator=make_generator(p.seed, self.runner.device, index),
            detok=IncrementalDetokenizer(self.tokenizer, req.prompt_ids), stopper=StopStringMatcher(p.stop),
            stop_ids=stop_ids, host=None if req.mix or not weights else weights[0], mix=mix, virtual_host=virtual,
        )

    def _loop(self) -> None:
        self._threads = engine_threads(self.config.threads) if self.runner.device.type == "cpu" else None
        if self._threads is not None:
            use_threads(self._threads)
        try:
            while not self._stopping:
                self._run_commands()
                if self.scheduler.idle:
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                try:
                    self._step()
                except Exception as exc:  # a failed step fails the requests it ran, never the engine
                    log.exception("engine step failed; failing its requests")
                    self._fail_running(GenerationFailed(f"internal error in the engine step: {exc}"))
        except BaseException as exc:  # the engine must never die silently
            self._crashed = exc
            log.exception("engine loop crashed")
        finally:
            stopped = EngineStopped("the engine stopped before the request finished")
            for seq in list(self.scheduler.running) + self.scheduler.take_waiting():
                self._end(seq, "error", stopped)

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

    def _fail_running(self, error: ServingError) -> None:
        for seq in list(self.scheduler.running):
            try:
                self._end(seq, "error", error)
            except Exception:  # its resources could not be given back: drop it from the batch all the same
                log.exception("could not release a failed sequence")
                self.scheduler.forget(seq)

    def _cancel(self, request_id: str) -> None:
        for seq in [s for s in self.scheduler.running if s.req.request_id == request_id]:
            self._end(seq, "cancelled")
        for seq in self.scheduler.take_waiting(request_id):
            self._end(seq, "cancelled")

    def _step(self) -> None:
        for seq, error in self.scheduler.schedule():
            self._end(seq, "error", error)
        running = self.scheduler.running
        if not running:
            self._wake.wait(0.01)
            self._wake.clear()
            return
        budget = max(self.config.max_tokens_per_step, self.config.max_batch_size)
        slots = self.runner.slots
        plan: StepPlan = build_step(running, slots.merged_slot, budget, slots.ranks())
        kind = self._step_kind()
        if self._threads is not None:  # other threads' settings can reach this thread's count (server/threads.py)
            self.metrics.engine_threads.set(hold_threads(self._threads))
        t0 = time.perf_counter()
        logits = self.runner.forward(plan.step)
        for seq, n, prefill in plan.fed:
            seq.fed += n
            if prefill:
                self.metrics.prompt_tokens.labels(seq.label).inc(n)
        logits, seqs = self._finite_rows(logits, plan.sampled)
        sampled = sample_step(logits, seqs, self.eos_ids, self.tokenizer)
        self.metrics.steps.labels(kind).inc()
        self.metrics.step_seconds.labels(kind).inc(time.perf_counter() - t0)
        now = time.monotonic()
        for seq, token, logprob in sampled:
            self._emit(seq, token, logprob, now)

    def _finite_rows(self, logits, seqs: list[Sequence]):
        """Fail the sequences whose logits are not finite (their adapter broke them); the others go on."""
        finite = torch.isfinite(logits).all(dim=-1)
        if bool(finite.all()):
            return logits, seqs
        keep = finite.nonzero().flatten()
        for seq, ok in zip(seqs, finite.tolist(), strict=True):
            if not ok:
                self._end(seq, "error", GenerationFailed(f"{seq.describe} produced non-finite logits (NaN/Inf)",
                                                         code="non_finite_logits"))
        return logits.index_select(0, keep), [seqs[i] for i in keep.tolist()]

    def _step_kind(self) -> str:
        keys = {s.adapter for s in self.scheduler.running}
        merged = self.scheduler.merged_adapter()
        if merged is not None:
            return "merged" if keys == {merged} else "hybrid"
        return "base" if keys == {None} else "batched"

    def _emit(self, seq: Sequence, token: int, logprob: TokenLogprob | None, now: float) -> None:
        gap = seq.mark_token(now)
        if gap is None:
            self.metrics.ttft.labels(seq.label).observe(now - seq.req.arrival)
        else:
            self.metrics.itl.observe(gap)
        self.metrics.tokens.labels(seq.label).inc()
        queued = seq.t_admitted - seq.req.arrival if gap is None else None
        out = self.output.on_token(seq, token, logprob, queued)
        if out.finish_reason is not None:  # resources back before the caller learns it is done
            self._finished(seq, out.finish_reason)
        seq.stream.put(out)

    def _end(self, seq: Sequence, reason: FinishReason, error: ServingError | None = None) -> None:
        """End a sequence without a sampled token (cancelled, failed, engine stopped)."""
        if seq.finished is not None:
            return
        out = self.output.on_end(seq, reason, error)
        if reason == "cancelled":
            self.metrics.cancelled.inc()
        self._finished(seq, reason)
        seq.stream.put(out)

    def _finished(self, seq: Sequence, reason: FinishReason) -> None:
        seq.finished = reason
        self.metrics.requests.labels(seq.label, reason).inc()
        if seq.t_last is not None:
            self.metrics.e2e.labels(seq.label).observe(seq.t_last - seq.req.arrival)
        self.scheduler.release(seq)


def eos_ids(model, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list | tuple):
            ids.update(int(e) for e in eos)
    return frozenset(ids)
