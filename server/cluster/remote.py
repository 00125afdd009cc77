"""The ingress's view of the engine replicas: an engine and a residency for the same HTTP routes.

``RemoteEngine.generate`` sends a request through the replicas' deployment handle with its adapter's
identity as the multiplexed model id (the affinity router picks the replica) and streams the outputs back.
A replica that dies before any output is retried once on another; one that dies mid-stream ends the
request's open samples with a 503 naming what happened. ``ClusterResidency`` answers residency from the
replicas' reports and carries evictions to every replica through the cluster state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace

from ray.exceptions import RayError

from adapters_store.errors import ServingError
from adapters_store.identity import AdapterIdentity
from adapters_store.store import AdapterRecord
from server.cluster.replica import Accepted, Refused
from server.cluster.state import SYNC_S, ModelFacts, ReplicaReport
from server.engine_types import EngineStats, GenerationRequest, SeqOutput
from server.errors import EngineStopped
from server.residency import ReplicaResidency, ResidencyInfo
from server.validation import RequestLimits, check_request

log = logging.getLogger("loramux.cluster")
EVICT_WAIT_S = 5.0  # how long an eviction waits for every live replica to apply it
_TIERS = {"disk": 0, "host": 1, "device": 2}
_SUMMED = ("running", "waiting", "steps", "swaps", "kv_tokens_used", "kv_tokens")


def model_id(record: AdapterRecord | None, affinity: bool) -> str:
    """Ray's multiplexed model id of a request's adapter: its identity (none for the base, compositions,
    and with --routing random)."""
    return "" if record is None or not affinity else str(record.identity)


class ReplicaView:
    """The replicas' latest reports, refreshed from the cluster state in the background."""

    def __init__(self, state):
        self.state = state
        self.reports: list[ReplicaReport] = []
        self._task: asyncio.Task | None = None

    async def refresh(self) -> list[ReplicaReport]:
        self.reports = await self.state.reports.remote()
        return self.reports

    async def facts(self, timeout: float) -> ModelFacts:
        """The base model's facts, once some replica has loaded it and reported."""
        deadline = time.monotonic() + timeout
        while not await self.refresh() or (facts := await self.state.facts.remote()) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no engine replica reported within {timeout:.0f} s")
            await asyncio.sleep(SYNC_S)
        return facts

    def start(self) -> None:
        async def loop() -> None:
            while True:
                try:
                    await self.refresh()
                except RayError:
                    log.exception("could not read the cluster state")
                await asyncio.sleep(SYNC_S * 2)

        self._task = asyncio.ensure_future(loop())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


class RemoteEngine:
    """`EngineAPI` over the replicas (see ``server.services``)."""

    def __init__(self, handle, view: ReplicaView, limits: RequestLimits, affinity: bool = True):
        self.handle = handle
        self.view = view
        self.affinity = affinity
        self.limits = limits
        self.max_model_len = limits.max_model_len
        self._streams: dict[str, object] = {}  # request id -> its replica stream (a DeploymentResponseGenerator)

    @property
    def alive(self) -> bool:
        return bool(self.view.reports)

    def validate(self, req: GenerationRequest) -> None:
        check_request(req, self.limits)

    async def generate(self, req: GenerationRequest) -> AsyncIterator[SeqOutput]:
        """Queue `req` on a replica (raising its typed error before any output) and stream its outputs."""
        self.validate(req)
        replica, stream = await self._submit(req, retry=True)
        return ReplicaStream(self, req, replica, stream)

    async def _submit(self, req: GenerationRequest, retry: bool) -> tuple[str, object]:
        mid = model_id(req.adapter, self.affinity)
        stream = self.handle.options(stream=True, multiplexed_model_id=mid).generate.remote(req)
        try:
            first = await stream.__anext__()
        except RayError as e:
            if retry:
                log.warning("request %s: replica failed before taking it (%s); retrying", req.request_id, e)
                return await self._submit(req, retry=False)
            raise EngineStopped(f"no engine replica could take the request: {type(e).__name__}") from None
        if isinstance(first, Refused):
            raise first.error
        assert isinstance(first, Accepted)
        self._streams[req.request_id] = stream
        return first.replica, stream

    def cancel(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.cancel()

    def stats(self) -> EngineStats:
        """The replicas' stats summed (mode and merged adapter of the first replica)."""
        reports = self.view.reports
        if not reports:
            return EngineStats(0, 0, "auto", None, 0, 0, {}, 0, 0)
        total = reports[0].stats
        for r in reports[1:]:
            s = r.stats
            sums = {k: getattr(total, k) + getattr(s, k) for k in _SUMMED}
            seconds = {k: v + s.step_seconds.get(k, 0.0) for k, v in total.step_seconds.items()}
            total = replace(total, step_seconds=seconds, **sums)
        return total


class ReplicaStream:
    """The outputs of one request from the replica that runs it; `replica` names that replica."""

    def __init__(self, engine: RemoteEngine, req: GenerationRequest, replica: str, stream):
        self.engine, self.req, self.replica, self._stream = engine, req, replica, stream

    def __aiter__(self) -> AsyncIterator[SeqOutput]:
        return self._outputs()

    async def _outputs(self) -> AsyncIterator[SeqOutput]:
        req = self.req
        done: set[int] = set()
        tokens: dict[int, int] = {}
        produced = False
        try:
            while True:
                try:
                    out = await self._stream.__anext__()
                except StopAsyncIteration:
                    return
                except RayError as e:
                    error = EngineStopped(f"the engine replica {self.replica} serving this request stopped "
                                          f"({type(e).__name__}); retry the request")
                    if not produced:
                        log.warning("request %s: replica %s failed before any output (%s); retrying",
                                    req.request_id, self.replica, e)
                        try:
                            self.replica, self._stream = await self.engine._submit(req, retry=False)
                            continue
                        except ServingError as again:
                            error = again
                    for out in self._failed(error, done, tokens):
                        yield out
                    return
                produced = True
                tokens[out.index] = out.completion_tokens
                if out.finish_reason is not None:
                    done.add(out.index)
                yield out
        finally:
            self.engine.cancel(req.request_id)

    def _failed(self, error: ServingError, done: set[int], tokens: dict[int, int]) -> list[SeqOutput]:
        """The last output of every sample still open: finished with `error`."""
        req = self.req
        return [SeqOutput(req.request_id, i, "", (), None, "error", len(req.prompt_ids), tokens.get(i, 0), error=error)
                for i in range(req.params.n) if i not in done]


class ClusterResidency:
    """`ResidencyAPI` over the replicas (see ``server.services``)."""

    def __init__(self, handle, view: ReplicaView, affinity: bool = True):
        self.handle, self.view, self.affinity = handle, view, affinity

    async def infos(self, records: list[AdapterRecord]) -> list[ResidencyInfo]:
        reports = await self.view.refresh()
        return [merge_residency(r.identity, reports) for r in records]

    async def load(self, record: AdapterRecord, pin: bool | None, pin_cap: int | None = None) -> int:
        """Make resident on the replica the router picks for it (one that holds it, if any)."""
        mid = model_id(record, self.affinity)
        try:
            result = await self.handle.options(multiplexed_model_id=mid).load.remote(record, pin, pin_cap)
        except RayError as e:
            raise EngineStopped(f"the engine replica loading adapter '{record.id}' stopped "
                                f"({type(e).__name__}); retry") from None
        if isinstance(result, Refused):
            raise result.error
        return result[1]

    async def evict(self, record: AdapterRecord) -> None:
        """Evict on every replica; returns once each live replica has applied it (or after EVICT_WAIT_S)."""
        state = self.view.state
        seq = await state.evict.remote(record.identity)
        deadline = time.monotonic() + EVICT_WAIT_S
        while behind := await state.behind.remote(seq):
            if time.monotonic() > deadline:
                log.warning("eviction of %s not yet applied by replicas %s", record.identity, behind)
                return
            await asyncio.sleep(SYNC_S / 2)


def merge_residency(ident: AdapterIdentity, reports: list[ReplicaReport]) -> ResidencyInfo:
    """One version's residency over the replicas: the best tier, pinned anywhere, counts summed."""
    held = [(r.replica, r.held[ident]) for r in reports if ident in r.held]
    if not held:
        return ResidencyInfo("disk", None, False, 0, 0, None)
    best = max(held, key=lambda h: _TIERS[h[1].tier])[1]
    used = [i.last_used for _, i in held if i.last_used is not None]
    return ResidencyInfo(
        tier=best.tier, slot=best.slot, pinned=any(i.pinned for _, i in held),
        in_flight=sum(i.in_flight for _, i in held), served=sum(i.served for _, i in held),
        last_used=max(used) if used else None,
        replicas=tuple(ReplicaResidency(name, i.tier, i.slot, i.pinned, i.in_flight) for name, i in held))
