"""The threading policy: helper threads run torch single-threaded; start-up work runs in a thread that ends."""

from __future__ import annotations

import asyncio
import os
import threading

import torch

from server.threads import engine_threads, in_fresh_thread, single_threaded_executor


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
