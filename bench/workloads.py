"""The engine benchmarks' workloads: chat prompts, W1-W5 request sets, token traces and their summaries."""

from __future__ import annotations

import math
import random
import statistics
import sys
from dataclasses import dataclass, field

from adapters_store.store import AdapterRecord
from server.engine_types import WeightedAdapter

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

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class WithVirtual:
    """An adapter (or a composition) and a prompt or prefix tuning adapter's virtual tokens before the prompt."""

    weights: AdapterRecord | tuple[WeightedAdapter, ...] | None
    virtual: AdapterRecord


Target = AdapterRecord | tuple[WeightedAdapter, ...] | WithVirtual  # an adapter, a composition, either with virtual


def request_fields(target: Target) -> dict:
    """The GenerationRequest fields (adapter, mix, virtual) of a target."""
    virtual = None
    if isinstance(target, WithVirtual):
        target, virtual = target.weights, target.virtual
    adapter, mix = (None, target) if isinstance(target, tuple) else (target, ())
    return {"adapter": adapter, "mix": mix, "virtual": virtual}
