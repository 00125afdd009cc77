"""`python bench/engine.py --kinds`: W1 over 16 adapters of mixed kinds against W1 over 16 plain LoRA adapters.

Both sets keep the ranks of bench/engine.py's 16 adapters (RANKS, every linear layer). The mixed set, by
position i of the round-robin: i % 4 == 1 a DoRA adapter; i % 4 == 3 a composition of two of the LoRA
adapters (weights 0.6 / 0.4); i % 8 == 6 an IA3 adapter (k, v, down; down as a feed-forward input scale);
i == 4 LoRA with a prefix tuning adapter's 16 virtual tokens, i == 12 LoRA with a prompt tuning adapter's 16,
i == 8 LoRA also on the embedding and the head; the rest LoRA (3 LoRA, 4 DoRA, 2 IA3, 4 compositions, 3 LoRA
with virtual tokens or edges). Virtual tokens are work the plain set does not do (16 more positions to
prefill and attend to per request). The same 64 chat prompts x 32 new tokens, all
submitted at once, in each --modes but merged, the two sets in rotation, medians of 3 runs (or --reps).
The figure is mixed W1 tokens/s over plain W1 tokens/s (goal: a mixed-kind batch costs <= 1.15x plain
LoRA, i.e. >= 0.87 here).
PEFT is not a peer here: its mixed batches refuse DoRA and it cannot compose per request.
"""

from __future__ import annotations

import copy
import random
import statistics
import tempfile
from pathlib import Path

import torch
from common import ALL_LINEAR, adapter_files, load_default, make_peft
from peft import IA3Config, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from workloads import RANKS, SEED, Req, Sizes, WithVirtual, chat_prompts, log, summarize

from server.engine_types import WeightedAdapter

COMPOSED_WEIGHTS = (0.6, 0.4)
IA3_SPEC = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])


VIRTUAL_TOKENS = 16
BESIDE = {4: "prefix", 12: "prompt"}  # position -> the virtual tokens beside its LoRA adapter
EDGES_AT = 8  # position of the adapter with LoRA on the embedding and the head too


def kind_of(i: int) -> str:
    if i % 4 == 3:
        return "composed"
    if i % 4 == 1:
        return "dora"
    return "ia3" if i % 8 == 6 else "lora"


def virtual_files(model, name: str, kind: str, seed: int) -> tuple[bytes, bytes]:
    """A PEFT prompt (or prefix) tuning adapter of VIRTUAL_TOKENS, as PEFT initialises it."""
    cls = PromptTuningConfig if kind == "prompt" else PrefixTuningConfig
    torch.manual_seed(seed)
    peft = get_peft_model(copy.deepcopy(model), cls(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS),
                          adapter_name=name)
    return adapter_files(peft, name)


def adapter_sets(model, n: int) -> tuple[dict[str, tuple[bytes, bytes]], list[str], list[str | tuple | dict]]:
    """PEFT files of every adapter; the plain set's names; the mixed set's targets (see `as_target`)."""
    plain = {f"plain{i:02d}_r{r}": dict(r=r, lora_alpha=2 * r, target_modules=ALL_LINEAR)
             for i, r in zip(range(n), RANKS, strict=False)}
    mixed = {f"{kind_of(i)}{i:02d}_r{r}": dict(r=r, lora_alpha=2 * r, use_dora=kind_of(i) == "dora",
                                               target_modules=ALL_LINEAR + (["embed_tokens", "lm_head"]
                                                                            if i == EDGES_AT else []))
             for i, r in zip(range(n), RANKS, strict=False) if kind_of(i) in ("lora", "dora")}
    peft = make_peft(model, plain | mixed, seed=SEED)
    files = {name: adapter_files(peft, name, save_embedding_layers=False) for name in plain | mixed}
    del peft
    loras = [name for name in mixed if name.startswith("lora")]
    targets: list[str | tuple | dict] = []
    for i, r in zip(range(n), RANKS, strict=False):
        kind = kind_of(i)
        if kind == "composed":
            j = len([t for t in targets if isinstance(t, tuple)])
            targets.append((loras[2 * j % len(loras)], loras[(2 * j + 1) % len(loras)]))
        elif kind == "ia3":
            name = f"ia3{i:02d}"
            files[name] = ia3_files(model, name, seed=SEED + i)
            targets.append(name)
        elif i in BESIDE:
            name = f"{BESIDE[i]}{i:02d}"
            files[name] = virtual_files(model, name, BESIDE[i], seed=SEED + i)
            targets.append({"weights": f"{kind}{i:02d}_r{r}", "virtual": name})
        else:
            targets.append(f"{kind}{i:02d}_r{r}")
    return files, list(plain), targets


def as_target(t: str | tuple | dict, by_name: dict):
    """A name; the two names of a composition; or {"weights": LoRA name, "virtual": its virtual tokens' adapter}."""
    if isinstance(t, str):
        return by_name[t]
    if isinstance(t, dict):
        return WithVirtual(by_name[t["weights"]], by_name[t["virtual"]])
    return tuple(WeightedAdapter(by_name[n], w) for n, w in zip(t, COMPOSED_WEIGHTS, strict=True))


def ia3_files(model, name: str, seed: int) -> tuple[bytes, bytes]:
    """A PEFT IA3 adapter whose vectors are 1 + 0.1 N(0, 1) (PEFT initialises them to 1: the identity)."""
    peft = get_peft_model(copy.deepcopy(model), IA3Config(init_ia3_weights=True, **IA3_SPEC), adapter_name=name)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "ia3_l" in n:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype))
    return adapter_files(peft, name)


def bench_kinds(dtype: str, args, sizes: Sizes) -> tuple[dict, dict]:
    from engine import build_engine_from_files, run_engine, warm_up  # engine.py imports this module

    loaded = load_default(dtype)
    files, plain, targets = adapter_sets(loaded.model, sizes.adapters)
    prompts = chat_prompts(loaded.tokenizer, sizes.requests, random.Random(SEED))
    w1 = [Req(p, i % sizes.adapters) for i, p in enumerate(prompts)]
    modes = [m for m in args.modes if m != "merged"] or ["batched"]
    out: dict = {}
    table: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        engine, records = build_engine_from_files(loaded.model, loaded.tokenizer, files, Path(tmp), args.threads,
                                                  args.max_batch_size, args.max_tokens_per_step, args.compile)
        by_name = {r.id: r for r in records}
        sets = {"plain": [by_name[n] for n in plain], "mixed": [as_target(t, by_name) for t in targets]}
        try:
            log(f"[{dtype}] warm-up")
            for target in sets.values():
                warm_up(engine, target, prompts)
            for mode in modes:
                runs: dict[str, list[dict]] = {name: [] for name in sets}
                for _ in range(max(args.reps, 3)):
                    for name, target in sets.items():
                        trace, _ = run_engine(engine, target, w1, mode, sizes.new_tokens)
                        runs[name].append(summarize(trace))
                        log(f"[{dtype}] {mode} {name}: {runs[name][-1]['tok_s']:.1f} tok/s")
                for name, rs in runs.items():
                    table[(mode, name)] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
                    out.update({f"{dtype}_kinds_{mode}_{name}_{k}": v for k, v in table[(mode, name)].items()})
                out[f"{dtype}_kinds_{mode}_mixed_vs_plain_tok_s"] = (table[(mode, "mixed")]["tok_s"]
                                                                    / table[(mode, "plain")]["tok_s"])
        finally:
            engine.shutdown(drain_timeout=5)
    return out, table


def kinds_markdown(tables: dict[str, dict], results: dict) -> str:
    lines = ["| dtype | mode | plain LoRA W1 tok/s | mixed kinds W1 tok/s | mixed / plain |", "|---|---|---|---|---|"]
    for dtype, table in tables.items():
        for mode in sorted({m for m, _ in table}):
            plain, mixed = table[(mode, "plain")]["tok_s"], table[(mode, "mixed")]["tok_s"]
            lines.append(f"| {dtype} | {mode} | {plain:.1f} | {mixed:.1f} | {mixed / plain:.2f} |")
    return "\n".join(lines)

