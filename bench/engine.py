"""Engine-level benchmark: the loramux engine in each mode against PEFT and plain transformers, same run.

Default model, 16 random PEFT adapters (ranks 4-64 on q,k,v,o,gate,up,down), chat prompts of 20-60
tokens, 32 new tokens, greedy, ignore_eos. Workloads (all requests submitted at once unless said):
  W1  64 requests over the 16 adapters, round-robin
  W2  64 requests on one adapter
  W3  80% of 64 on one adapter, the rest over the 15 others (shuffled)
  W4  four phases of 16 requests, each phase another single adapter; phase k+1 is submitted when
      phase k completes (its TTFT counts from its own submission)
  W5  W1 with Poisson arrivals at 70% of the capacity measured on W1 `batched` in the same run
For each workload and mode (`batched`, `merged`, `auto`), after one warm-up of the engine: output
tokens/s (generated tokens / time from the first submit to the last token), mean and p99 time to
first token, p99 inter-token latency (gaps between a request's token arrivals, pooled). Peers on the
same requests (W1; more with --peers-on): PEFT `set_adapter` + `generate` one request at a time,
PEFT mixed static batches of 16 (`adapter_names`, left padding, batches in submission order), and
transformers `generate` on the base model alone with static batches of 16 (the single-model
ceiling). The peers run right after the engine on each workload, so that machine noise hits both
sides of a ratio alike; `--reps N` repeats every run (the modes of a workload in rotation) and keeps
the median of each figure.

Prints each figure, the ratios against the goals and a markdown table (stdout); progress goes to
stderr. Also per engine run: swaps (count, total ms), steps, share of step time per execution kind,
and `exact_vs_peft`, the share of requests whose tokens equal PEFT's (fp32: expect 1). The engine and
the peers run in the same thread with the same OpenMP team (all cores, or `--threads N`; the main
thread stays single-threaded, as in the server: see server/threads.py). On a busy machine pass
`--threads 1`: OpenMP threads that lose their core slow every forward several-fold.

    python bench/engine.py --json bench/engine.json
    python bench/engine.py --quick --dtypes fp32 --threads 1   # smoke test: 8 requests x 8 tokens, 4 adapters
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import torch
from common import ALL_LINEAR, adapter_files, emit, load_default, make_peft
from engine_kinds import bench_kinds, kinds_markdown
from hf_peers import run_peer, warm_peers
from workloads import (
    MODES,
    PEERS,
    POISSON_LOAD,
    RANKS,
    SEED,
    WORKLOADS,
    Req,
    Sizes,
    Target,
    Trace,
    chat_prompts,
    exact_share,
    log,
    make_workloads,
    median_summary,
    phases,
    poisson,
    request_fields,
    summarize,
)

from adapters_store.store import SHARED, AdapterRecord
from server.engine import Engine, EngineConfig
from server.engine_types import GenerationRequest
from server.sampling import SamplingParams
from server.services import build_core
from server.threads import engine_threads, single_threaded

# the engine -----------------------------------------------------------------------------------------


def build_engine(model, tokenizer, peft, names: list[str], root: Path, threads: int | None = None,
                 max_batch_size: int = 64, max_tokens_per_step: int = 512,
                 compile: bool = False) -> tuple[Engine, list[AdapterRecord]]:
    files = {name: adapter_files(peft, name) for name in names}
    return build_engine_from_files(model, tokenizer, files, root, threads, max_batch_size, max_tokens_per_step,
                                   compile)


def build_engine_from_files(model, tokenizer, files: dict[str, tuple[bytes, bytes]], root: Path,
                            threads: int | None = None, max_batch_size: int = 64,
                            max_tokens_per_step: int = 512,
                            compile: bool = False) -> tuple[Engine, list[AdapterRecord]]:
    """The engine (batched, 16 slots, rank <= 64) over a store holding `files` (name -> PEFT config, weights);
    `compile`: the compiled step (its graphs are built here)."""
    config = EngineConfig(mode="batched", max_batch_size=max_batch_size, max_model_len=256,
                          max_tokens_per_step=max_tokens_per_step, max_waiting=1024, threads=threads)
    core = build_core(model, tokenizer, root, config, max_loras=16, max_rank=64, max_cpu_loras=64, compile=compile)
    records = [core.store.put(SHARED, name, *pair)[0] for name, pair in files.items()]
    core.engine.start()
    return core.engine, records


async def drive(engine: Engine, records: list[Target], reqs: list[Req], new_tokens: int) -> Trace:
    """Submit the requests (phase by phase, each at its offset) and record every token's arrival."""
    trace = Trace.empty(len(reqs))
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)

    async def one(i: int, start: float) -> None:
        delay = start + reqs[i].at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        req = GenerationRequest(uuid.uuid4().hex, tuple(reqs[i].prompt), params,
                                **request_fields(records[reqs[i].adapter]))
        trace.submit[i] = time.perf_counter()
        async for out in await engine.generate(req):
            if out.error:
                raise RuntimeError(f"request {i} failed: {out.error}")
            now = time.perf_counter()
            trace.times[i] += [now] * len(out.token_ids)
            trace.tokens[i] += out.token_ids

    for group in phases(reqs):
        start = time.perf_counter()
        await asyncio.gather(*(one(i, start) for i in group))
    return trace


def run_engine(engine: Engine, records: list[Target], reqs: list[Req], mode: str,
               new_tokens: int) -> tuple[Trace, dict[str, float]]:
    """One run in `mode`; also the engine's swaps (count, total ms), steps and share of step time per kind."""

    async def go() -> Trace:
        engine.set_mode(mode)
        await engine.call(lambda: None)  # the mode is set before the first request arrives
        trace = await drive(engine, records, reqs, new_tokens)
        await engine.call(lambda: None)  # the last step is over (and counted) before stats are read
        return trace

    before, swap_before = engine.stats(), swap_seconds(engine)
    trace = asyncio.run(go())
    after = engine.stats()
    spent = {k: after.step_seconds[k] - before.step_seconds.get(k, 0.0) for k in after.step_seconds}
    total = sum(spent.values()) or 1.0
    extra = {"swaps": float(after.swaps - before.swaps), "swap_ms": 1e3 * (swap_seconds(engine) - swap_before),
             "steps": float(after.steps - before.steps)}
    extra |= {f"share_{k}": v / total for k, v in spent.items() if v > 0}
    return trace, extra


def swap_seconds(engine: Engine) -> float:
    return engine.metrics.registry.get_sample_value("loramux_swap_seconds_sum") or 0.0


def warm_up(engine: Engine, records: list[Target], prompts: list[list[int]]) -> None:
    """One merge (golden copies), every adapter into a device slot, first-call overheads; ends unmerged."""
    every = [Req(prompts[a % len(prompts)], a) for a in range(len(records))]
    run_engine(engine, records, [Req(prompts[0], 0), Req(prompts[1], 0)], "merged", 4)
    run_engine(engine, records, every, "batched", 4)


T = TypeVar("T")


def on_engine_thread(engine: Engine, fn: Callable[[], T]) -> T:
    """Run a peer in the idle engine's thread: the same OpenMP team and cores as the engine's forwards."""
    return asyncio.run(engine.call(fn))


# one dtype ------------------------------------------------------------------------------------------


def bench_dtype(dtype: str, args, sizes: Sizes) -> tuple[dict, dict]:
    """Returns (flat results with `dtype_` keys, table rows {(workload, system): summary}).

    Workload by workload: the engine in each mode, then the peers on the same requests (close in time,
    so that machine noise hits both sides of a ratio alike)."""
    loaded = load_default(dtype)
    tokenizer = loaded.tokenizer
    specs = {name: dict(r=r, lora_alpha=2 * r, target_modules=ALL_LINEAR) for name, r in
             zip(sizes.names, RANKS, strict=False)}
    peft = make_peft(loaded.model, specs, seed=SEED)
    base = copy.deepcopy(loaded.model)  # the runner wraps loaded.model in place
    rng = random.Random(SEED)
    prompts = chat_prompts(tokenizer, sizes.requests, rng)
    workloads = make_workloads(prompts, sizes.adapters, rng)
    pad_id = tokenizer.pad_token_id
    out: dict = {f"{dtype}_prompt_tokens_mean": statistics.fmean(map(len, prompts))}
    table: dict = {}
    traces: dict[tuple[str, str], Trace] = {}

    def record(w: str, system: str, runs: list[tuple[Trace, dict]]) -> None:
        table[(w, system)] = median_summary([summarize(t) for t, _ in runs])
        traces[(w, system)] = runs[-1][0]
        out.update({f"{dtype}_{w}_{system}_{k}": v for k, v in table[(w, system)].items()})
        out.update({f"{dtype}_{w}_{system}_{k}": v for k, v in runs[-1][1].items()})
        log(f"[{dtype}] {w} {system}: {table[(w, system)]['tok_s']:.1f} tok/s")

    wanted = {*args.workloads, *args.peers_on, *(["W1"] if "W5" in args.workloads else [])}
    order = [w for w in WORKLOADS if w in wanted]
    with tempfile.TemporaryDirectory() as tmp:
        engine, records = build_engine(loaded.model, tokenizer, peft, sizes.names, Path(tmp), args.threads,
                                       args.max_batch_size, args.max_tokens_per_step, args.compile)
        engine.runner.attention_kernel &= args.attention_kernel  # read at each step (a built kernel stays built)
        try:
            log(f"[{dtype}] warm-up")
            warm_up(engine, records, prompts)
            on_engine_thread(engine, partial(warm_peers, peft, base, workloads["W1"], sizes.names, pad_id))
            for w in order:
                if w == "W5":  # arrivals at a share of W1 batched's capacity
                    rate = POISSON_LOAD * table[("W1", "batched")]["tok_s"] / sizes.new_tokens
                    workloads["W5"] = poisson(workloads["W1"], rate, random.Random(SEED + 5))
                    out[f"{dtype}_W5_offered_req_s"] = rate
                for system, runs in bench_workload(engine, records, workloads[w], w, args, sizes, dtype,
                                                   partial(run_peer, peft=peft, base=base, pad_id=pad_id)):
                    record(w, system, runs)
        finally:
            engine.shutdown(drain_timeout=5)

    for w in order:
        ref = reference_tokens(traces, "W1" if w == "W5" else w)
        for mode in MODES:
            if (w, mode) in traces and ref:
                out[f"{dtype}_{w}_{mode}_exact_vs_peft"] = exact_share(traces[(w, mode)], ref)
    out |= ratios(dtype, table)
    del engine, records, peft, base, loaded
    gc.collect()
    return out, table


def bench_workload(engine: Engine, records: list[AdapterRecord], reqs: list[Req], w: str, args, sizes: Sizes,
                   dtype: str, peer_run: Callable[..., Trace]) -> list[tuple[str, list[tuple[Trace, dict]]]]:
    """The engine in each mode (in rotation, `args.reps` times), then the peers on the same requests."""
    modes = list(args.modes) if w in args.workloads else []
    if w == "W1" and "W5" in args.workloads and "batched" not in modes:
        modes.insert(0, "batched")  # W5's arrival rate comes from W1 batched
    runs: dict[str, list[tuple[Trace, dict]]] = {mode: [] for mode in modes}
    for rep in range(args.reps):  # modes in rotation: drift hits each mode alike
        for mode in modes:
            log(f"[{dtype}] {w} {mode} run {rep + 1}/{args.reps}")
            runs[mode].append(run_engine(engine, records, reqs, mode, sizes.new_tokens))
    for peer in PEERS if w in args.peers_on else ():
        log(f"[{dtype}] {w} {peer} x{args.reps}")
        run = partial(peer_run, peer, reqs=reqs, sizes=sizes)
        runs[peer] = [(on_engine_thread(engine, run), {}) for _ in range(args.reps)]
    return list(runs.items())


def reference_tokens(traces: dict[tuple[str, str], Trace], w: str) -> dict[int, list[int]]:
    """PEFT's tokens per request: one-at-a-time where it ran, else the mixed batch."""
    ref: dict[int, list[int]] = {}
    for peer in ("peft_mixed16", "peft_one"):
        if (w, peer) in traces:
            ref |= {i: toks for i, toks in enumerate(traces[(w, peer)].tokens) if toks}
    return ref


def ratios(dtype: str, table: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    w1 = table.get(("W1", "batched"))
    for peer in PEERS:
        if w1 and ("W1", peer) in table:
            out[f"{dtype}_W1_batched_vs_{peer}"] = w1["tok_s"] / table[("W1", peer)]["tok_s"]
    for w in WORKLOADS:
        fixed = {m: table[(w, m)]["tok_s"] for m in ("batched", "merged") if (w, m) in table}
        if (w, "auto") not in table or not fixed:
            continue
        auto = table[(w, "auto")]["tok_s"]
        for m, v in fixed.items():
            out[f"{dtype}_{w}_auto_vs_{m}"] = auto / v
        if len(fixed) == 2:
            out[f"{dtype}_{w}_auto_vs_best_fixed"] = auto / max(fixed.values())
    return out


# report ---------------------------------------------------------------------------------------------

GOALS = {"W1_batched_vs_peft_one": 8.0, "W1_batched_vs_peft_mixed16": 2.0, "W1_batched_vs_base16": 1.0}


def markdown(tables: dict[str, dict], results: dict) -> str:
    dtypes = list(tables)
    head = "| workload | system | " + " | ".join(
        f"{d} tok/s | {d} TTFT mean ms | {d} TTFT p99 ms | {d} ITL p99 ms" for d in dtypes) + " |"
    lines = [head, "|" + "---|" * (2 + 4 * len(dtypes))]
    keys = sorted({k for t in tables.values() for k in t},
                  key=lambda k: (WORKLOADS.index(k[0]), (MODES + PEERS).index(k[1])))
    for w, system in keys:
        cells = []
        for d in dtypes:
            s = tables[d].get((w, system))
            cells += [f"{s['tok_s']:.1f}", f"{s['ttft_mean_ms']:.0f}", f"{s['ttft_p99_ms']:.0f}",
                      f"{s['itl_p99_ms']:.0f}"] if s else [""] * 4
        lines.append(f"| {w} | {system} | " + " | ".join(cells) + " |")
    names = sorted({k.split("_", 1)[1] for k in results if k.split("_", 1)[0] in dtypes
                    and ("_vs_" in k and "exact" not in k)}, key=lambda n: (n not in GOALS, n))
    lines += ["", "| ratio (tok/s) | goal | " + " | ".join(dtypes) + " |", "|" + "---|" * (2 + len(dtypes))]
    for n in names:
        goal = f">= {GOALS[n]:g}" if n in GOALS else (">= 0.95" if n.endswith("best_fixed") else "")
        vals = [f"{results[f'{d}_{n}']:.2f}" if f"{d}_{n}" in results else "" for d in dtypes]
        lines.append(f"| {n} | {goal} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--peers-on", nargs="*", default=["W1"], choices=WORKLOADS[:4],
                    help="workloads the peers also run (W5's arrivals do not apply to static batches)")
    ap.add_argument("--reps", type=int, default=1, help="runs per (workload, system); median of each figure")
    ap.add_argument("--quick", action="store_true", help="8 requests x 8 new tokens over 4 adapters")
    ap.add_argument("--threads", type=int, help="CPU threads of the engine thread, where the peers run too "
                    "(default: every core)")
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--max-tokens-per-step", type=int, default=512)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                    help="the compiled step (the server's --compile; its default is eager)")
    ap.add_argument("--attention-kernel", action=argparse.BooleanOptionalAction, default=True,
                    help="CPU decode attention through loramux's kernel (the server's default), or torch's path")
    ap.add_argument("--kinds", action="store_true", help="W1 over adapters of mixed kinds (LoRA, DoRA, IA3, "
                    "compositions) against W1 over plain LoRA (bench/engine_kinds.py)")
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()
    sizes = Sizes(8, 8, 4, one_at_a_time=2) if args.quick else Sizes()
    if args.kinds:
        run_benchmark(args, sizes, bench_kinds, kinds_markdown)
    else:
        run_benchmark(args, sizes, bench_dtype, markdown)


def run_benchmark(args, sizes: Sizes, bench: Callable[..., tuple[dict, dict]],
                  table: Callable[[dict, dict], str]) -> None:
    """Every dtype in turn (`bench(dtype, args, sizes)` -> figures, table rows), then the figures as lines
    and JSON, and `table(tables, figures)` in markdown. Shared by this benchmark and bench/serve.py."""
    sizes.names = [f"a{i:02d}_r{r}" for i, r in zip(range(sizes.adapters), RANKS, strict=False)]
    single_threaded()  # as in the server: only the engine thread runs torch on every core
    torch.manual_seed(SEED)
    results: dict = {"model": "SmolLM2-135M-Instruct", "threads": engine_threads(args.threads),
                     "requests": sizes.requests, "new_tokens": sizes.new_tokens, "adapters": sizes.adapters,
                     "compile": args.compile, "attention_kernel": args.attention_kernel}
    tables: dict[str, dict] = {}
    for dtype in args.dtypes:
        out, tables[dtype] = bench(dtype, args, sizes)
        results |= out
        gc.collect()
    emit(results, args.json_path)
    print()
    print(table(tables, results))


if __name__ == "__main__":
    main()
