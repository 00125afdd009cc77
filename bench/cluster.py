"""Cluster benchmark: skewed traffic over many adapters through `loramux-cluster`, three ways.

Zipf-distributed requests (exponent --zipf) over --adapters PEFT adapters of ranks 4-64 on every linear layer
of the default model, chat prompts of 20-60 tokens, --new-tokens each, greedy, ignore_eos, streamed over HTTP
by --concurrency closed-loop clients (each sends its next request when the previous one ends), after a warm
pass of half as many requests drawn alike (so residency is in its steady state, not cold), through:
  affinity  2 replicas, --slots device slots each, the adapter-affinity router (the default)
  random    the same 2 replicas with Ray's default router, blind to adapters (--routing random)
  single    1 replica
  unguarded affinity without its load guard (--balance-abs beyond any load): holders always first
Each replica runs one engine thread on its own core (--replica-cpus 1), so the 2-replica configurations use
2 cores and `single` one. Each replica's host cache keeps --host-copies idle adapters (default: as many as its
slots, the case of far more adapters than memory), so a miss reads the store. Per run: output tokens/s at the
client (completion tokens / first send to last chunk; and steady, up to the last send, before the drain),
adapter loads per 100 requests into device slots and from the store into host memory (the replicas'
counters), p99 time to first chunk, CPU per output token of the processes beside the replicas.
Configurations run in rotation (each deployed afresh per repetition), medians of --reps. Ratios printed and
written with --json; the goals: affinity / random tok/s >= 1.3, loads <= 0.25x; affinity / single >= 1.6.
Also the floor of the loads: slot misses of the same traffic simulated for random routing with an LRU per
replica, for adapters split between the replicas with an LRU each, and with Belady's clairvoyant eviction.

    python bench/cluster.py --json bench/cluster.json
    python bench/cluster.py --quick           # smoke test: 8 adapters, 24 requests, 1 repetition
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import httpx
import ray
from common import ALL_LINEAR, DTYPES, emit, load_default, make_peft
from peers import loramux
from prometheus_client.parser import text_string_to_metric_families
from serve import sse_chunks, write_peft_dirs
from workloads import RANKS, SEED, chat_prompts, log, percentile

from server.cluster.launch import NAMESPACE, deploy, prepare, shutdown, start_ray
from server.cluster.settings import ClusterSettings
from server.cluster.state import STATE_ACTOR

CONFIGS = {"affinity": dict(replicas=2, routing="affinity"), "random": dict(replicas=2, routing="random"),
           "single": dict(replicas=1, routing="affinity"),
           "unguarded": dict(replicas=2, routing="affinity", balance_abs=1 << 30)}
PORT = 8765


def zipf_choices(n_adapters: int, n: int, exponent: float, rng: random.Random) -> list[int]:
    weights = [1 / (k + 1) ** exponent for k in range(n_adapters)]
    return rng.choices(range(n_adapters), weights=weights, k=n)


def lru_misses(stream: list[int], capacity: int) -> int:
    cache: OrderedDict[int, None] = OrderedDict()
    misses = 0
    for x in stream:
        if x in cache:
            cache.move_to_end(x)
            continue
        misses += 1
        cache[x] = None
        if len(cache) > capacity:
            cache.popitem(last=False)
    return misses


def belady_misses(stream: list[int], capacity: int) -> int:
    """Misses of the clairvoyant policy (evict the adapter needed again last): no cache does better."""
    following, seen = [0] * len(stream), {}
    for i in range(len(stream) - 1, -1, -1):
        following[i] = seen.get(stream[i], len(stream))
        seen[stream[i]] = i
    cache: dict[int, int] = {}  # adapter -> index of its next request
    misses = 0
    for i, x in enumerate(stream):
        if x not in cache:
            misses += 1
            if len(cache) >= capacity:
                del cache[max(cache, key=cache.get)]
        cache[x] = following[i]
    return misses


def cache_floor(args, n: int = 200_000) -> dict[str, float]:
    """Slot misses per 100 requests on the benchmark's traffic, simulated: 2 replicas with random routing and
    an LRU each; adapters split between them (balanced by traffic) with an LRU each, and with Belady's; and
    Belady's over all 2 x slots as one cache, which no routing of the 2 replicas beats (their slots together
    hold at most that many adapters, and a request whose adapter is in neither misses)."""
    rng = random.Random(SEED + 1)
    stream = zipf_choices(args.adapters, n, args.zipf, rng)
    halves: list[list[int]] = [[], []]
    for x in stream:
        halves[rng.randrange(2)].append(x)
    split = [[x for x in stream if (x % 4 in (0, 3)) == (r == 0)] for r in (0, 1)]
    return {"sim_random_lru_misses_per_100": 100 * sum(lru_misses(h, args.slots) for h in halves) / n,
            "sim_split_lru_misses_per_100": 100 * sum(lru_misses(h, args.slots) for h in split) / n,
            "sim_split_belady_misses_per_100": 100 * sum(belady_misses(h, args.slots) for h in split) / n,
            "sim_union_belady_misses_per_100": 100 * belady_misses(stream, 2 * args.slots) / n}


async def stream_one(client: httpx.AsyncClient, model: str, prompt: list[int], new_tokens: int
                     ) -> tuple[float, float, float, int]:
    """(send, first chunk, last chunk) times and the completion tokens of one streamed request."""
    start = time.perf_counter()
    first, last, tokens = None, start, 0
    body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    async for now, chunk in sse_chunks(client, body, model):
        first = now if first is None else first
        last = now
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    return start, first or last, last, tokens


def tokens_by(t: float, first: float, last: float, n: int) -> float:
    """Tokens of a request received by time `t`, its first at `first` and the rest evenly up to `last`."""
    if t < first or n == 0:
        return 0.0
    return 1 + (n - 1) * min(1.0, (t - first) / max(last - first, 1e-9))


async def closed_loop(url: str, jobs: list[tuple[str, list[int]]], new_tokens: int, concurrency: int) -> dict:
    """tok_s over the whole run; steady_tok_s up to the moment the last request is sent (every client busy
    until then, so the drain at the end, whose length depends on which replica the last requests landed on,
    is left out)."""
    queue = list(reversed(jobs))
    spans: list[tuple[float, float, float, int]] = []
    drained = 0.0
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def worker() -> None:
            nonlocal drained
            while queue:
                model, prompt = queue.pop()
                if not queue:
                    drained = time.perf_counter()
                spans.append(await stream_one(client, model, prompt, new_tokens))
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    tokens = sum(n for *_, n in spans)
    steady = sum(tokens_by(drained, first, last, n) for _, first, last, n in spans)
    return {"tok_s": tokens / wall, "steady_tok_s": steady / (drained - start), "wall_s": wall,
            "ttft_p99_s": percentile([first - sent for sent, first, _, _ in spans], 0.99)}


def loads() -> dict[str, float]:
    state = ray.get_actor(STATE_ACTOR, namespace=NAMESPACE)
    reports = ray.get(state.reports.remote())
    return {tier: sum(r.counters[f"loads_{tier}"] for r in reports) for tier in ("device", "host")}


RAY_SIDE = {"proxy": "ProxyActor", "ingress": "LoramuxIngress", "state": "ClusterState",
            "controller": "ServeController"}
ROLES = (*RAY_SIDE, "client")


def side_cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far by the processes beside the engine replicas (Ray's, from Linux /proc, and this
    client's), by role."""
    tick = os.sysconf("SC_CLK_TCK")
    out = dict.fromkeys(RAY_SIDE, 0.0)
    out["client"] = sum(os.times()[:2])
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        for role, marker in RAY_SIDE.items():
            if cmdline.startswith("ray::") and marker in cmdline:
                out[role] += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return out


def load_cost(base: ClusterSettings, dtype: str, seed_dir: Path, names: list[str], prompt: list[int],
              work: Path) -> dict[str, float]:
    """Mean milliseconds of one adapter load into host memory (store -> host, off the engine thread) and into a
    device slot (on the engine thread, between steps), from the histogram of a single `python -m server` with a
    replica's slots, host copies and thread, after two sequential passes of a 1-token request over every adapter."""
    flags = {"max-loras": base.max_loras, "max-cpu-loras": base.max_cpu_loras, "threads": 1}
    with loramux(dtype, seed_dir, work, flags) as url, httpx.Client(base_url=url, timeout=600,
                                                                    trust_env=False) as client:
        for name in names * 2:
            client.post("/v1/completions", json={"model": name, "prompt": prompt, "max_tokens": 1}
                        ).raise_for_status()
        text = client.get("/metrics").text
    samples = {(sample.name, sample.labels.get("tier")): sample.value
               for family in text_string_to_metric_families(text) for sample in family.samples}
    name = "loramux_adapter_load_seconds"
    return {f"{tier}_load_ms": 1000 * samples[(f"{name}_sum", tier)] / max(samples[(f"{name}_count", tier)], 1)
            for tier in ("host", "device")}


def run_config(name: str, interval: int, base: ClusterSettings, jobs, warm, args) -> dict:
    settings = prepare(base.model_copy(update=CONFIGS[name] | {"stream_interval": interval}))
    deploy(settings)
    url = f"http://127.0.0.1:{settings.port}"
    try:
        asyncio.run(closed_loop(url, warm, args.new_tokens, args.concurrency))
        before, cpu_before = loads(), side_cpu_seconds()
        result = asyncio.run(closed_loop(url, jobs, args.new_tokens, args.concurrency))
        after, cpu_after = loads(), side_cpu_seconds()
        for tier in after:
            result[f"{tier}_loads_per_100"] = 100 * (after[tier] - before[tier]) / len(jobs)
        tokens = result["tok_s"] * result["wall_s"]
        for role in ROLES:
            result[f"{role}_cpu_ms_per_token"] = 1000 * (cpu_after[role] - cpu_before[role]) / tokens
    finally:
        shutdown()
    log(f"{name}, stream interval {interval}: {result}")
    return result


def ratios(runs: dict[str, list[dict]]) -> dict[str, float]:
    """Medians per configuration, and the goals' ratios between the configurations that ran."""
    out: dict[str, float] = {}
    for name, rs in runs.items():
        for key in ("tok_s", "steady_tok_s", "device_loads_per_100", "host_loads_per_100", "ttft_p99_s",
                    *(f"{role}_cpu_ms_per_token" for role in ROLES)):
            out[f"{name}_{key}"] = statistics.median(r[key] for r in rs)
    if "affinity" in runs and "random" in runs:
        for key in ("tok_s", "steady_tok_s"):
            out[f"affinity_vs_random_{key}"] = out[f"affinity_{key}"] / out[f"random_{key}"]
        for tier in ("device", "host"):
            out[f"affinity_vs_random_{tier}_loads"] = (out[f"affinity_{tier}_loads_per_100"]
                                                       / max(out[f"random_{tier}_loads_per_100"], 1e-9))
        out["affinity_vs_random_ttft_p99"] = out["affinity_ttft_p99_s"] / out["random_ttft_p99_s"]
    if "affinity" in runs and "unguarded" in runs:
        for key in ("tok_s", "steady_tok_s", "device_loads_per_100", "ttft_p99_s"):
            out[f"affinity_vs_unguarded_{key}"] = out[f"affinity_{key}"] / max(out[f"unguarded_{key}"], 1e-9)
    if "affinity" in runs and "single" in runs:
        for key in ("tok_s", "steady_tok_s"):
            out[f"two_vs_one_replica_{key}"] = out[f"affinity_{key}"] / out[f"single_{key}"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--host-copies", type=int, help="idle adapters a replica keeps in host memory "
                        "(default: --slots)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--reps", type=int, default=3)
    default_interval = ClusterSettings.model_fields["stream_interval"].default
    parser.add_argument("--stream-intervals", type=int, nargs="+", default=[default_interval],
                        help="tokens per streamed chunk (default: the cluster's); several are run in rotation, "
                        "the first giving the headline ratios and each other one its own (suffix _si<N>)")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.quick:
        args.adapters, args.requests, args.reps, args.concurrency, args.new_tokens = 8, 24, 1, 8, 8
    loaded = load_default(args.dtype)
    names = [f"z{i}" for i in range(args.adapters)]
    ranks = [RANKS[i % len(RANKS)] for i in range(args.adapters)]
    peft = make_peft(loaded.model, {n: dict(r=r, lora_alpha=2 * r, target_modules=ALL_LINEAR)
                                    for n, r in zip(names, ranks, strict=True)}, seed=SEED)
    rng = random.Random(SEED)
    n_warm = args.requests // 2
    prompts = chat_prompts(loaded.tokenizer, args.requests + n_warm, rng)
    picks = zipf_choices(args.adapters, args.requests + n_warm, args.zipf, rng)
    drawn = [(names[k], p) for k, p in zip(picks, prompts, strict=True)]
    warm, jobs = drawn[:n_warm], drawn[n_warm:]
    work = Path(tempfile.mkdtemp(prefix="loramux-bench-cluster-"))
    seed_dir = write_peft_dirs(peft, names, work / "peft")
    del peft, loaded
    base = ClusterSettings(model="default", adapters_dir=work / "store", seed_adapters=seed_dir, port=PORT,
                           device="cpu", dtype=DTYPES[args.dtype], max_loras=args.slots,
                           max_cpu_loras=args.slots if args.host_copies is None else args.host_copies,
                           max_model_len=256, kv_cache_tokens=8192, replica_cpus=1, ray_cpus=2,
                           max_concurrent_per_tenant=4096, log_level="warning")
    start_ray(base)
    runs: dict[tuple[str, int], list[dict]] = {}
    for rep in range(args.reps):
        for interval in args.stream_intervals:
            for name in args.configs:
                log(f"rep {rep + 1}/{args.reps}")
                runs.setdefault((name, interval), []).append(run_config(name, interval, base, jobs, warm, args))
    results: dict[str, float | int | str] = {"dtype": args.dtype, "adapters": args.adapters, "slots": args.slots,
                                             "host_copies": base.max_cpu_loras, "requests": args.requests,
                                             "zipf": args.zipf, "reps": args.reps, "cores_per_replica": 1,
                                             "stream_interval": args.stream_intervals[0]}
    for interval in args.stream_intervals:
        suffix = "" if interval == args.stream_intervals[0] else f"_si{interval}"
        results |= {f"{k}{suffix}": v for k, v in ratios({name: rs for (name, i), rs in runs.items()
                                                           if i == interval}).items()}
    results |= load_cost(base, args.dtype, seed_dir, names, prompts[0], work / "load_cost")
    for name in ("affinity", "unguarded"):  # the most fewer loads can give: the device loads' time it saves
        if f"{name}_tok_s" in results and "random_tok_s" in results:
            saved_s = (results["random_device_loads_per_100"] - results[f"{name}_device_loads_per_100"]) / 100 * len(
                jobs) * results["device_load_ms"] / 1000
            wall_s = len(jobs) * args.new_tokens / results["random_tok_s"]
            per_replica_s = saved_s / CONFIGS[name]["replicas"]  # the replicas load in parallel
            results[f"{name}_vs_random_tok_s_bound_from_loads"] = wall_s / max(wall_s - per_replica_s, 1e-9)
    results |= cache_floor(args)
    for floor in ("split", "union"):
        results[f"sim_{floor}_belady_vs_random_loads"] = (results[f"sim_{floor}_belady_misses_per_100"]
                                                          / results["sim_random_lru_misses_per_100"])
    emit(results, args.json)


if __name__ == "__main__":
    main()
