"""HTTP benchmark: the engine benchmark's W1 and W5 sent through the server by concurrent streaming clients.

The requests of bench/engine.py (default model, 16 random PEFT adapters of ranks 4-64 on every linear layer,
chat prompts of 20-60 tokens, 32 new tokens, greedy, ignore_eos) go to `POST /v1/completions` of a
`python -m server` subprocess (mode batched, the engine benchmark's limits, the adapters written as PEFT
directories and imported with --seed-adapters), prompts as token ids, `stream: true`, from one asyncio
process with one httpx.AsyncClient (a connection per request in flight):
  W1  64 requests over the 16 adapters, all at once (64 concurrent clients)
  W5  W1 with Poisson arrivals at 70% of the capacity the in-process engine measured on W1 in this run
Figures as in bench/engine.py, measured at the client: output tokens/s (completion tokens of the final
usage chunk / time from the first send to the last chunk), mean and p99 time to first chunk, p99 gap
between chunks. The in-process engine of bench/engine.py runs the same requests in the same run and
dtype, never while the server works (engine W1, server W1, server W5, engine W5); `http_vs_engine` is
HTTP tok/s / engine tok/s (goal >= 0.9) and `http_ttft_added_ms` the difference of mean TTFT. Per run
also: engine steps and step seconds (the server's from /metrics), `chunks_per_token` (HTTP; below 1 when
a chunk carried several tokens) and `text_match_engine`, the share of requests whose streamed text equals
the engine's tokens decoded (fp32: expect 1). `--threads N` sets the engine threads of both processes
(default: every core; see server/threads.py); on a busy machine pass `--threads 1`. Prints each figure
and a markdown table (stdout); progress on stderr.

    python bench/serve.py --json bench/serve.json
    python bench/serve.py --quick --dtypes fp32 --threads 1   # smoke test: 8 requests x 8 tokens, 4 adapters
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
from common import ALL_LINEAR, DTYPES, adapter_files, load_default, make_peft
from engine import build_engine, run_benchmark, run_engine, warm_up
from peft import PeftModel
from server_process import Server, launch_server
from workloads import (
    POISSON_LOAD,
    RANKS,
    SEED,
    Req,
    Sizes,
    Trace,
    chat_prompts,
    log,
    make_workloads,
    median_summary,
    poisson,
    summarize,
)

from adapters_store.format import CONFIG_FILE, WEIGHTS_FILE
from server.model_loader import LoadedModel

WORKLOADS = ("W1", "W5")
SYSTEMS = ("engine", "http")
GOAL = 0.9
SERVER_FLAGS = {  # bench/engine.py build_engine's limits; no per-tenant cap in the way of 64 concurrent requests
    "mode": "batched", "max-batch-size": 64, "max-loras": 16, "max-cpu-loras": 64, "max-rank": 64,
    "max-model-len": 256, "max-tokens-per-step": 512, "max-waiting": 1024, "max-concurrent-per-tenant": 4096,
}


@dataclass
class Setup:
    """One dtype's model, PEFT adapters and requests, built exactly as bench/engine.py's bench_dtype does."""

    loaded: LoadedModel
    peft: PeftModel
    prompts: list[list[int]]
    w1: list[Req]


def prepare(dtype: str, sizes: Sizes) -> Setup:
    loaded = load_default(dtype)
    specs = {name: dict(r=r, lora_alpha=2 * r, target_modules=ALL_LINEAR) for name, r in
             zip(sizes.names, RANKS, strict=False)}
    peft = make_peft(loaded.model, specs, seed=SEED)
    rng = random.Random(SEED)
    prompts = chat_prompts(loaded.tokenizer, sizes.requests, rng)
    return Setup(loaded, peft, prompts, make_workloads(prompts, sizes.adapters, rng)["W1"])


def write_peft_dirs(peft, names: list[str], root: Path) -> Path:
    for name in names:
        config, weights = adapter_files(peft, name)
        (root / name).mkdir(parents=True)
        (root / name / CONFIG_FILE).write_bytes(config)
        (root / name / WEIGHTS_FILE).write_bytes(weights)
    return root


# the server -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def server(dtype: str, seed_dir: Path, work: Path, threads: int | None) -> Iterator[Server]:
    """Starts `python -m server` on the default model (not waiting for it: call wait_ready)."""
    flags = {"model": "default", "device": "cpu", "dtype": DTYPES[dtype], "adapters-dir": work / "store",
             "seed-adapters": seed_dir} | SERVER_FLAGS | ({"threads": threads} if threads else {})
    with launch_server(flags, work / "server.log") as srv:
        yield srv


# the clients ----------------------------------------------------------------------------------------


async def http_drive(url: str, names: list[str], reqs: list[Req], new_tokens: int) -> tuple[Trace, list[str]]:
    """Send every request (each at its offset) as a streamed completion; record each chunk's arrival.

    Returns the trace (one time per chunk; `tokens` holds as many placeholders as the usage's completion
    tokens, which is all summarize reads of them) and each request's text."""
    n = len(reqs)
    trace, texts, counts = Trace.empty(n), [""] * n, [0] * n
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600.0, trust_env=False) as client:

        async def one(i: int, start: float) -> None:
            delay = start + reqs[i].at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            body = {"model": names[reqs[i].adapter], "prompt": reqs[i].prompt, "max_tokens": new_tokens,
                    "temperature": 0, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            trace.submit[i] = time.perf_counter()
            async for now, chunk in sse_chunks(client, body, f"request {i}"):
                if chunk["choices"]:
                    trace.times[i].append(now)
                    texts[i] += chunk["choices"][0]["text"]
                if chunk.get("usage"):
                    counts[i] = chunk["usage"]["completion_tokens"]

        start = time.perf_counter()
        await asyncio.gather(*(one(i, start) for i in range(n)))
    if not all(counts):
        raise RuntimeError(f"{counts.count(0)} of {n} streams ended without a usage chunk")
    trace.tokens = [[0] * c for c in counts]
    return trace, texts


async def sse_chunks(client: httpx.AsyncClient, body: dict, what: str) -> AsyncIterator[tuple[float, dict]]:
    """(arrival time, chunk) of each JSON chunk of one streamed completion; RuntimeError for an HTTP error
    or an error event."""
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{what}: HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.perf_counter()
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"{what} failed: {chunk['error']}")
            yield now, chunk


def run_http(srv: Server, names: list[str], reqs: list[Req], new_tokens: int) -> tuple[dict[str, float], list[str]]:
    before = srv.engine_counters()
    trace, texts = asyncio.run(http_drive(srv.url, names, reqs, new_tokens))
    after = srv.engine_counters()
    chunks = sum(map(len, trace.times)) / sum(map(len, trace.tokens))
    return summarize(trace) | {k: after[k] - before[k] for k in after} | {"chunks_per_token": chunks}, texts


def warm_server(srv: Server, names: list[str], prompts: list[list[int]]) -> None:
    """Every adapter into a device slot and first-call overheads, as bench/engine.py's warm_up (batched part)."""
    every = [Req(prompts[a % len(prompts)], a) for a in range(len(names))]
    for _ in range(2):
        run_http(srv, names, every, 4)


# the engine -----------------------------------------------------------------------------------------


def run_in_process(engine, records, reqs: list[Req], new_tokens: int, tokenizer) -> tuple[dict[str, float], list[str]]:
    before = engine.stats()
    trace, _ = run_engine(engine, records, reqs, "batched", new_tokens)
    after = engine.stats()
    counters = {"steps": float(after.steps - before.steps),
                "step_s": sum(after.step_seconds.values()) - sum(before.step_seconds.values())}
    texts = [tokenizer.decode(t, skip_special_tokens=True, clean_up_tokenization_spaces=False) for t in trace.tokens]
    return summarize(trace) | counters, texts


# one dtype ------------------------------------------------------------------------------------------


def bench_dtype(dtype: str, args, sizes: Sizes) -> tuple[dict, dict]:
    """Returns (flat results with `dtype_` keys, table rows {(workload, system): summary})."""
    setup = prepare(dtype, sizes)
    tokenizer = setup.loaded.tokenizer
    table: dict = {}
    out: dict = {}
    texts: dict = {}

    def measure(w: str, runners: dict[str, Callable[[], tuple[dict[str, float], list[str]]]]) -> None:
        """Each rep runs every system in turn (so that drift hits both); then the median of each figure."""
        runs: dict[str, list[dict[str, float]]] = {system: [] for system in runners}
        for rep in range(args.reps):
            for system, fn in runners.items():
                summary, texts[(w, system)] = fn()
                runs[system].append(summary)
                log(f"[{dtype}] {w} {system} rep {rep + 1}/{args.reps}: {summary['tok_s']:.1f} tok/s")
        for system, summaries in runs.items():
            table[(w, system)] = median_summary(summaries)
            out.update({f"{dtype}_{w}_{system}_{k}": v for k, v in table[(w, system)].items()})

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        seed_dir = write_peft_dirs(setup.peft, sizes.names, work / "seed")
        with server(dtype, seed_dir, work, args.threads) as srv:  # loads while the engine is built and warmed
            (work / "engine").mkdir()
            engine, records = build_engine(setup.loaded.model, tokenizer, setup.peft, sizes.names, work / "engine",
                                           args.threads)
            try:
                log(f"[{dtype}] warm-up (engine, then server)")
                warm_up(engine, records, setup.prompts)
                srv.wait_ready()
                warm_server(srv, sizes.names, setup.prompts)
                in_process = partial(run_in_process, engine, records, new_tokens=sizes.new_tokens, tokenizer=tokenizer)
                over_http = partial(run_http, srv, sizes.names, new_tokens=sizes.new_tokens)
                measure("W1", {"engine": partial(in_process, setup.w1), "http": partial(over_http, setup.w1)})
                rate = POISSON_LOAD * table[("W1", "engine")]["tok_s"] / sizes.new_tokens
                out[f"{dtype}_W5_offered_req_s"] = rate
                w5 = poisson(setup.w1, rate, random.Random(SEED + 5))
                measure("W5", {"http": partial(over_http, w5), "engine": partial(in_process, w5)})
            except Exception:
                log(f"[{dtype}] server log (tail):\n{srv.log_tail()}")
                raise
            finally:
                engine.shutdown(drain_timeout=5)
    for w in WORKLOADS:
        http, eng = table[(w, "http")], table[(w, "engine")]
        out[f"{dtype}_{w}_http_vs_engine"] = http["tok_s"] / eng["tok_s"]
        out[f"{dtype}_{w}_http_ttft_added_ms"] = http["ttft_mean_ms"] - eng["ttft_mean_ms"]
        pairs = list(zip(texts[(w, "http")], texts[(w, "engine")], strict=True))
        out[f"{dtype}_{w}_http_text_match_engine"] = sum(a == b for a, b in pairs) / len(pairs)
    return out, table


# report ---------------------------------------------------------------------------------------------


def markdown(tables: dict[str, dict], results: dict) -> str:
    dtypes = list(tables)
    head = "| workload | system | " + " | ".join(
        f"{d} tok/s | {d} TTFT mean ms | {d} TTFT p99 ms | {d} ITL p99 ms | {d} step ms" for d in dtypes) + " |"
    lines = [head, "|" + "---|" * (2 + 5 * len(dtypes))]
    for w in WORKLOADS:
        for system in SYSTEMS:
            cells = []
            for d in dtypes:
                s = tables[d][(w, system)]
                step_ms = 1e3 * s["step_s"] / s["steps"] if s["steps"] else float("nan")
                cells += [f"{s['tok_s']:.1f}", f"{s['ttft_mean_ms']:.0f}", f"{s['ttft_p99_ms']:.0f}",
                          f"{s['itl_p99_ms']:.0f}", f"{step_ms:.1f}"]
            lines.append(f"| {w} | {system} | " + " | ".join(cells) + " |")
    lines += ["", "| ratio | goal | " + " | ".join(dtypes) + " |", "|" + "---|" * (2 + len(dtypes))]
    for w in WORKLOADS:
        vals = [f"{results[f'{d}_{w}_http_vs_engine']:.2f}" for d in dtypes]
        lines.append(f"| {w} http_vs_engine (tok/s) | >= {GOAL:g} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--reps", type=int, default=1, help="runs per (workload, system); median of each figure")
    ap.add_argument("--quick", action="store_true", help="8 requests x 8 new tokens over 4 adapters")
    ap.add_argument("--threads", type=int, help="CPU threads of both engines, in-process and the server's "
                    "(default: every core)")
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()
    run_benchmark(args, Sizes(8, 8, 4) if args.quick else Sizes(), bench_dtype, markdown)


if __name__ == "__main__":
    main()
