"""The threading policy: helper threads run torch single-threaded; start-up work runs in a thread that ends."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable

import torch

from server.threads import (
    engine_threads,
    in_fresh_thread,
    single_threaded,
    single_threaded_executor,
    use_threads,
)


def test_helper_threads_run_torch_single_threaded() -> None:
    with single_threaded_executor("test-io", workers=2) as pool:
        counts = list(pool.map(lambda _: torch.get_num_threads(), range(4)))
    assert counts == [1, 1, 1, 1]


def test_start_up_work_runs_in_a_thread_that_ends() -> None:
    seen: dict[str, object] = {}

    def work() -> int:
        seen["thread"] = threading.current_thread()
        seen["threads"] = torch.get_num_threads()
        return 7

    assert asyncio.run(in_fresh_thread(work, threads=2)) == 7
    assert seen["threads"] == 2 and seen["thread"] is not threading.current_thread()
    assert not seen["thread"].is_alive()  # its OpenMP team went with it


def test_engine_threads_default_to_every_core() -> None:
    assert engine_threads(3) == 3
    assert engine_threads(None) == len(os.sched_getaffinity(0))


def _count_after_other_thread_sets(mine: Callable[[], None], other: Callable[[], None]) -> int:
    """A thread's torch thread count after: it sets its own, another thread sets a different one, then
    it runs its first parallel op (torch's lazy per-thread init used to take the other's count)."""
    ready, go, seen = threading.Event(), threading.Event(), []

    def worker() -> None:
        mine()
        ready.set()
        go.wait()
        torch.randn(256, 256) @ torch.randn(256, 256)
        seen.append(torch.get_num_threads())

    t = threading.Thread(target=worker)
    t.start()
    ready.wait()
    o = threading.Thread(target=other)
    o.start()
    o.join()
    go.set()
    t.join()
    return seen[0]


def test_a_threads_count_is_not_overwritten_by_another_thread() -> None:
    assert _count_after_other_thread_sets(lambda: use_threads(2), single_threaded) == 2
    assert _count_after_other_thread_sets(single_threaded, lambda: use_threads(2)) == 1
