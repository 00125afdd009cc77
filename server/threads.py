"""CPU threading policy: one OpenMP team in the process, the engine thread's.

torch's CPU ops run on libgomp, which keeps a team of worker threads for every thread that starts a
parallel region. Once the process holds more OpenMP threads than cores (say the engine's team plus one
left behind by model loading in the main thread), libgomp cuts every worker's spin-wait to about 100
iterations, so each of the thousands of small ops of a forward pass pays futex wake-ups: the engine's
forward passes ran 2.3x slower with two threads than with one on a 2-core machine. So:

- the engine thread runs with all cores (`engine_threads`);
- every other thread that touches torch (the event loop, upload parsing, adapter reads) runs it
  single-threaded (`single_threaded`, `single_threaded_executor`);
- heavy start-up work (model loading, buffer allocation) runs with all cores in a thread that exits
  afterwards, which releases its team (`in_fresh_thread`).

Every thread sets its count through `use_threads`. `torch.set_num_threads` also stores the count in a
process-wide default, and a thread's first parallel op re-applies whatever that default is then: an
engine thread that set 2 and then waited, while an I/O thread set 1, ran every forward on one core.
`use_threads` makes the thread take its count before setting it, so the setting sticks to the thread.
That is not enough in a server process under torch 2.13: the engine thread's count still fell to 1 once the
I/O threads had set theirs (its every forward then ran on one core, 0.6-0.7x the throughput), so the engine
takes its count back before each forward where it drifted (`hold_threads`), and reports it
(`loramux_engine_threads`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def engine_threads(configured: int | None) -> int:
    """Intra-op threads of the engine's forward passes: `configured`, else every core."""
    return configured or cpu_cores()


def use_threads(n: int) -> None:
    """Run this thread's torch ops on n threads, whatever other threads set later."""
    torch.get_num_threads()  # the thread's one-time lazy init, which reads the process-wide default
    torch.set_num_threads(n)


def hold_threads(n: int) -> int:
    """Take this thread's count back to n where another thread's setting reached it; returns the count now."""
    if torch.get_num_threads() != n:
        use_threads(n)
    return torch.get_num_threads()


def single_threaded() -> None:
    """Run this thread's torch ops on one thread (it then never starts an OpenMP team)."""
    use_threads(1)


def single_threaded_executor(name: str, workers: int | None = None) -> ThreadPoolExecutor:
    """A thread pool for blocking work off the event loop whose threads run torch single-threaded."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name, initializer=single_threaded)


def on_fresh_thread(fn: Callable[[], T], threads: int | None = None) -> T:
    """Run fn with all cores (or `threads`) in a new thread that ends afterwards, and wait for it."""

    def run() -> T:
        use_threads(engine_threads(threads))
        return fn()

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="loramux-startup") as pool:
        return pool.submit(run).result()


async def in_fresh_thread(fn: Callable[[], T], threads: int | None = None) -> T:
    """Run fn with all cores (or `threads`) in a new thread that ends afterwards, releasing its team."""
    return await asyncio.to_thread(on_fresh_thread, fn, threads)
