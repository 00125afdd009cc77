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
import math
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

import torch
from common import ALL_LINEAR, adapter_files, emit, load_default, make_peft
from transformers.generation.streamers import BaseStreamer

from adapters_store.format import ValidationLimits, parse_adapter
from adapters_store.residency import Residency
from adapters_store.store import SHARED, AdapterRecord, AdapterStore
from server.engine import Engine, EngineConfig
from server.engine_types import GenerationRequest
from server.model_runner import ModelRunner
from server.sampling import SamplingParams
from server.threads import engine_threads, single_threaded

SEED = 0
RANKS = (16, 4, 8, 32, 64, 8, 16, 4, 32, 16, 64, 8, 4, 16, 32, 8)  # adapter 0 is the hot one
WORKLOADS = ("W1", "W2", "W3", "W4", "W5")
MODES = ("batched", "merged", "auto")
PEERS = ("peft_one", "peft_mixed16", "base16")
STATIC_BATCH = 16
POISSON_LOAD = 0.7
HOT_SHARE = 0.8
PROMPT_TOKENS = (20, 60)
SYSTEM = "You are a helpful assistant."
SUBJECTS = (
    "photosynthesis", "the French Revolution", "black holes", "compound interest", "the immune system",
    "plate tectonics", "the printing press", "neural networks", "the water cycle", "supply and demand",
    "the Roman Empire", "quantum entanglement", "climate change", "the stock market", "vaccines",
    "the internet", "jazz music", "volcanoes", "the Renaissance", "electric cars", "honey bees",
    "the Silk Road", "solar panels", "sleep", "coral reefs", "inflation", "the Moon landing",
    "public key cryptography", "bread baking", "glaciers", "the human heart", "chess openings",
)
TEMPLATES = (
    "What is {x}?",
    "Explain {x} in simple terms.",
    "Give me three surprising facts about {x}.",
    "Write a short poem about {x}.",
    "What are the main pros and cons of {x}?",
    "How would you explain {x} to a ten-year-old who loves football?",
    "Summarize the history of {x} in a few sentences, and say why it still matters today.",
    "I am preparing a lesson for high-school students. Could you explain {x} step by step, with one "
    "example they can relate to and one common misconception to avoid?",
    "Compare {x} and {y}: what do they have in common, and how do they differ?",
    "List five questions a curious student might ask about {x}, then answer the first one briefly.",
)


@dataclass
class Req:
    prompt: list[int]
    adapter: int
    phase: int = 0  # a phase is submitted when the previous one has completed
    at: float = 0.0  # arrival offset (s) from the start of its phase


@dataclass
class Trace:
    """Per request: submit time, arrival time of each output token, and the tokens."""

    submit: list[float]
    times: list[list[float]]
    tokens: list[list[int]]

    @classmethod
    def empty(cls, n: int) -> Trace:
        return cls([0.0] * n, [[] for _ in range(n)], [[] for _ in range(n)])


@dataclass
class Sizes:
    requests: int = 64
    new_tokens: int = 32
    adapters: int = 16
    one_at_a_time: int | None = None  # requests given to the one-at-a-time peer (None: all)
    names: list[str] = field(default_factory=list)


# requests -------------------------------------------------------------------------------------------


def chat_prompts(tokenizer, n: int, rng: random.Random) -> list[list[int]]:
    """n distinct chat prompts whose token counts lie in PROMPT_TOKENS."""
    prompts: list[list[int]] = []
    seen: set[str] = set()
    while len(prompts) < n:
        x, y = rng.sample(SUBJECTS, 2)
        question = rng.choice(TEMPLATES).format(x=x, y=y)
        if question in seen:
            continue
        seen.add(question)
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        if PROMPT_TOKENS[0] <= len(ids) <= PROMPT_TOKENS[1]:
            prompts.append(list(ids))
    return prompts


def make_workloads(prompts: list[list[int]], n_adapters: int, rng: random.Random) -> dict[str, list[Req]]:
    """W1-W4 (W5 needs the measured capacity: see poisson)."""
    n = len(prompts)
    n_hot = round(HOT_SHARE * n)
    w3_adapters = [0] * n_hot + [1 + i % (n_adapters - 1) for i in range(n - n_hot)]
    rng.shuffle(w3_adapters)
    phase_len = n // 4
    return {
        "W1": [Req(p, i % n_adapters) for i, p in enumerate(prompts)],
        "W2": [Req(p, 0) for p in prompts],
        "W3": [Req(p, a) for p, a in zip(prompts, w3_adapters, strict=True)],
        "W4": [Req(p, min(i // phase_len, 3), phase=min(i // phase_len, 3)) for i, p in enumerate(prompts)],
    }


def poisson(reqs: list[Req], rate: float, rng: random.Random) -> list[Req]:
    t, out = 0.0, []
    for r in reqs:
        out.append(Req(r.prompt, r.adapter, at=t))
        t += rng.expovariate(rate)
    return out


def phases(reqs: list[Req]) -> list[list[int]]:
    """Request indices grouped by phase, in submission order."""
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(reqs):
        groups.setdefault(r.phase, []).append(i)
    return [groups[k] for k in sorted(groups)]


# metrics --------------------------------------------------------------------------------------------


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(trace: Trace) -> dict[str, float]:
    done = [i for i, t in enumerate(trace.times) if t]
    wall = max(trace.times[i][-1] for i in done) - min(trace.submit[i] for i in done)
    ttft = [trace.times[i][0] - trace.submit[i] for i in done]
    gaps = [b - a for i in done for a, b in zip(trace.times[i], trace.times[i][1:], strict=False)]
    return {
        "tok_s": sum(len(trace.tokens[i]) for i in done) / wall,
        "ttft_mean_ms": 1e3 * statistics.fmean(ttft),
        "ttft_p99_ms": 1e3 * percentile(ttft, 0.99),
        "itl_p99_ms": 1e3 * percentile(gaps, 0.99) if gaps else float("nan"),
    }


def median_summary(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def exact_share(trace: Trace, ref: dict[int, list[int]]) -> float:
    common = [i for i in ref if trace.tokens[i]]
    return sum(trace.tokens[i] == ref[i] for i in common) / len(common) if common else float("nan")

T = TypeVar("T")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# the engine -----------------------------------------------------------------------------------------


def build_engine(model, tokenizer, peft, names: list[str], root: Path,
                 threads: int | None = None) -> tuple[Engine, list[AdapterRecord]]:
    runner = ModelRunner(model, max_loras=16, max_rank=64, max_seqs=64, max_model_len=256)
    limits = ValidationLimits(max_rank=64)
    store = AdapterStore(root, lambda i, c, w: parse_adapter(i, c, w, runner.lora.target_shapes, limits))
    records = [store.put(SHARED, name, *adapter_files(peft, name))[0] for name in names]
    residency = Residency(store, runner.lora, max_device=16, max_host=64)
    config = EngineConfig(mode="batched", max_batch_size=64, max_model_len=256, max_tokens_per_step=512,
                          max_waiting=1024, threads=threads)
    engine = Engine(runner, tokenizer, residency, config)
    engine.start()
    return engine, records


async def drive(engine: Engine, records: list[AdapterRecord], reqs: list[Req], new_tokens: int) -> Trace:
    """Submit the requests (phase by phase, each at its offset) and record every token's arrival."""
    trace = Trace.empty(len(reqs))
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)

    async def one(i: int, start: float) -> None:
        delay = start + reqs[i].at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        req = GenerationRequest(uuid.uuid4().hex, tuple(reqs[i].prompt), params, records[reqs[i].adapter])
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


def run_engine(engine: Engine, records: list[AdapterRecord], reqs: list[Req], mode: str,
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


def warm_up(engine: Engine, records: list[AdapterRecord], prompts: list[list[int]]) -> None:
    """One merge (golden copies), every adapter into a device slot, first-call overheads; ends unmerged."""
    every = [Req(prompts[a % len(prompts)], a) for a in range(len(records))]
    run_engine(engine, records, [Req(prompts[0], 0), Req(prompts[1], 0)], "merged", 4)
    run_engine(engine, records, every, "batched", 4)


# the peers ------------------------------------------------------------------------------------------


class TokenClock(BaseStreamer):
    """Records when each row of a `generate` call receives a token (the first put is the prompt)."""

    def __init__(self, trace: Trace, idx: list[int]):
        self.trace, self.idx, self.prompt_seen = trace, idx, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        now = time.perf_counter()
        for i, tok in zip(self.idx, value.reshape(-1).tolist(), strict=True):
            self.trace.times[i].append(now)
            self.trace.tokens[i].append(tok)

    def end(self) -> None:
        pass


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def run_static(model, reqs: list[Req], idx: list[int], batch: int, new_tokens: int, pad_id: int,
               names: list[str] | None, one_at_a_time: bool = False) -> Trace:
    """Static batches of `batch` requests in submission order; `names`: PEFT adapter names (None: base)."""
    trace = Trace.empty(len(reqs))
    chosen = set(idx)
    with torch.inference_mode():
        for group in phases(reqs):
            group = [i for i in group if i in chosen]
            start = time.perf_counter()
            for k in range(0, len(group), batch):
                rows = group[k : k + batch]
                for i in rows:
                    trace.submit[i] = start
                ids, mask = left_pad([reqs[i].prompt for i in rows], pad_id)
                kwargs = {}
                if names is not None and one_at_a_time:
                    model.set_adapter(names[reqs[rows[0]].adapter])
                elif names is not None:
                    kwargs["adapter_names"] = [names[reqs[i].adapter] for i in rows]
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id,
                               streamer=TokenClock(trace, rows), **kwargs)
    return trace


def run_peer(peer: str, peft, base, reqs: list[Req], sizes: Sizes, pad_id: int) -> Trace:
    everyone = list(range(len(reqs)))
    if peer == "peft_one":
        idx = everyone[: sizes.one_at_a_time] if sizes.one_at_a_time else everyone
        return run_static(peft, reqs, idx, 1, sizes.new_tokens, pad_id, sizes.names, one_at_a_time=True)
    if peer == "peft_mixed16":
        return run_static(peft, reqs, everyone, STATIC_BATCH, sizes.new_tokens, pad_id, sizes.names)
    return run_static(base, reqs, everyone, STATIC_BATCH, sizes.new_tokens, pad_id, None)


def on_engine_thread(engine: Engine, fn: Callable[[], T]) -> T:
    """Run a peer in the idle engine's thread: the same OpenMP team and cores as the engine's forwards."""
    return asyncio.run(engine.call(fn))


def warm_peers(peft, base, reqs: list[Req], names: list[str], pad_id: int) -> None:
    run_static(peft, reqs, [0], 1, 2, pad_id, names, one_at_a_time=True)
    run_static(peft, reqs, [0, 1], 2, 2, pad_id, names)
    run_static(base, reqs, [0, 1], 2, 2, pad_id, None)


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
        engine, records = build_engine(loaded.model, tokenizer, peft, sizes.names, Path(tmp), args.threads)
        try:
            log(f"[{dtype}] warm-up")
            warm_up(engine, records, prompts)
            on_engine_thread(engine, partial(warm_peers, peft, base, workloads["W1"], sizes.names, pad_id))
            for w in order:
                modes = list(args.modes) if w in args.workloads else []
                if w == "W1" and "W5" in args.workloads and "batched" not in modes:
                    modes.insert(0, "batched")  # W5's arrival rate comes from W1 batched
                if w == "W5":
                    rate = POISSON_LOAD * table[("W1", "batched")]["tok_s"] / sizes.new_tokens
                    workloads["W5"] = poisson(workloads["W1"], rate, random.Random(SEED + 5))
                    out[f"{dtype}_W5_offered_req_s"] = rate
                runs: dict[str, list[tuple[Trace, dict]]] = {mode: [] for mode in modes}
                for rep in range(args.reps):  # modes in rotation: drift hits each mode alike
                    for mode in modes:
                        log(f"[{dtype}] {w} {mode} run {rep + 1}/{args.reps}")
                        runs[mode].append(run_engine(engine, records, workloads[w], mode, sizes.new_tokens))
                for mode in modes:
                    record(w, mode, runs[mode])
                for peer in PEERS if w in args.peers_on else ():
                    log(f"[{dtype}] {w} {peer} x{args.reps}")
                    run = partial(run_peer, peer, peft, base, workloads[w], sizes, pad_id)
                    record(w, peer, [(on_engine_thread(engine, run), {}) for _ in range(args.reps)])
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
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()
    run_benchmark(args, Sizes(8, 8, 4, one_at_a_time=2) if args.quick else Sizes(), bench_dtype, markdown)


def run_benchmark(args, sizes: Sizes, bench: Callable[..., tuple[dict, dict]],
                  table: Callable[[dict, dict], str]) -> None:
    """Every dtype in turn (`bench(dtype, args, sizes)` -> figures, table rows), then the figures as lines
    and JSON, and `table(tables, figures)` in markdown. Shared by this benchmark and bench/serve.py."""
    sizes.names = [f"a{i:02d}_r{r}" for i, r in zip(range(sizes.adapters), RANKS, strict=False)]
    single_threaded()  # as in the server: only the engine thread runs torch on every core
    torch.manual_seed(SEED)
    results: dict = {"model": "SmolLM2-135M-Instruct", "threads": engine_threads(args.threads),
                     "requests": sizes.requests, "new_tokens": sizes.new_tokens, "adapters": sizes.adapters}
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
