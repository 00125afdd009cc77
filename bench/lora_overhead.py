"""LoRA overhead at the forward level on the default model, against PEFT in the same run.

For each dtype: mixed batches of B rows (every row a different rank-16 adapter on q,k,v,o,gate,up,
down) at prefill (64 tokens) and at one decode step over a 256-token KV cache, as time / the
base model's time for the same batch (ours: our runner with no adapter; PEFT: adapters disabled);
merged swap vs PEFT unmerge_adapter + merge_adapter; cold load from the store to a device slot;
decode rows composing two adapters (per-request weighted composition) against rows of one adapter and
against serving the two adapters as two rows (PEFT cannot batch compositions: it merges a new adapter);
batches mixing LoRA, DoRA and composed rows against plain LoRA rows of equal rank (PEFT's mixed batches
refuse DoRA).
Ours with and without adapters and PEFT's mixed batch are timed in rotation (medians over the
repetitions), so that drift hits every side of their ratios alike.

    python bench/lora_overhead.py --json bench/lora_overhead.json
    python bench/lora_overhead.py --parts kinds --json bench/lora_kinds.json   # compositions, mixed kinds
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import ALL_LINEAR, adapter_files, emit, load_default, make_peft, median_time, parsed, rotated_times
from transformers import DynamicCache

from adapters_store.format import ValidationLimits, parse_adapter
from adapters_store.host_cache import HostCache
from adapters_store.identity import AdapterIdentity
from adapters_store.store import SHARED, AdapterStore
from server.kv_blocks import Block
from server.model_runner import ModelRunner, StepInput

PREFILL, KV = 64, 256
PARTS = ("peft", "kinds", "swap")  # against PEFT; compositions and mixed kinds; swaps and cold loads
ORDER = 5  # each row's KV block: 2^5 units of 16 tokens = 512 >= KV + 1


def block(row: int) -> Block:
    return Block(row << ORDER, ORDER)


def prefill_step(rows: int, slots: list[int], length: int, ids: torch.Tensor, last_only: bool = True) -> StepInput:
    step = StepInput([], [], [], [])
    for r in range(rows):
        start = len(step.token_ids)
        step.token_ids += ids[r, :length].tolist()
        step.blocks += [block(r)] * length
        step.positions += list(range(length))
        step.token_slots += [slots[r]] * length
        step.prefills.append((start, start + length, block(r), 0))
        step.logits_idx.append(start + length - 1)
    return step


def decode_step(rows: int, slots: list[int], ids: torch.Tensor) -> StepInput:
    return StepInput(ids[:rows, KV].tolist(), [block(r) for r in range(rows)], [KV] * rows, slots[:rows],
                     decode=list(range(rows)), logits_idx=list(range(rows)))


def measure_batch(runner: ModelRunner, peft, names: list[str], slots: list[int], ids: torch.Tensor, b: int,
                  reps: int, dtype: str) -> dict[str, float]:
    """Prefill and decode of b rows, each its own adapter, against the base model, ours and PEFT's."""
    out: dict[str, float] = {}
    lora, base = slots[:b], [-1] * b
    x = ids[:b, :PREFILL]
    t_base, t_lora, p_lora = rotated_times([
        lambda: runner.forward(prefill_step(b, base, PREFILL, ids)),
        lambda: runner.forward(prefill_step(b, lora, PREFILL, ids)),
        lambda: peft(input_ids=x, adapter_names=names[:b], logits_to_keep=1)], reps)
    with peft.disable_adapter():  # toggling adapters costs ms: measured inside one block
        p_base = median_time(lambda: peft(input_ids=x, logits_to_keep=1), reps)
    out[f"{dtype}_prefill_b{b}_ours_vs_base"] = t_lora / t_base
    out[f"{dtype}_prefill_b{b}_peft_vs_base"] = p_lora / p_base
    out[f"{dtype}_prefill_b{b}_peft_time_vs_ours"] = p_lora / t_lora

    runner.forward(prefill_step(b, base, KV, ids))  # fill each row's cache to 256 tokens
    cache = DynamicCache(config=peft.config)
    peft(input_ids=ids[:b, :KV], past_key_values=cache, use_cache=True, logits_to_keep=1)
    step_ids = ids[:b, KV : KV + 1]

    def peft_decode(**kw):
        peft(input_ids=step_ids, past_key_values=cache, use_cache=True, logits_to_keep=1, **kw)
        cache.crop(-1)

    t_base, t_lora, p_lora = rotated_times([
        lambda: runner.forward(decode_step(b, base, ids)),
        lambda: runner.forward(decode_step(b, lora, ids)),
        lambda: peft_decode(adapter_names=names[:b])], reps * 2)
    with peft.disable_adapter():
        p_base = median_time(peft_decode, reps * 3)
    out[f"{dtype}_decode_b{b}_ours_vs_base"] = t_lora / t_base
    out[f"{dtype}_decode_b{b}_peft_vs_base"] = p_lora / p_base
    out[f"{dtype}_decode_b{b}_peft_time_vs_ours"] = p_lora / t_lora
    return out


def measure_composition(runner: ModelRunner, slots: list[int], ids: torch.Tensor, b: int, reps: int,
                        dtype: str) -> dict[str, float]:
    """Decode of b rows each composing two adapters (weights 0.6/0.4), against b rows of one adapter each and
    against the 2b rows that serve the two adapters of each composed row separately."""
    def composed():
        step = decode_step(b, [-1] * b, ids)
        step.weighted = [(r, r + 1, slots[2 * r + i], w) for r in range(b) for i, w in enumerate((0.6, 0.4))]
        return runner.forward(step)

    runner.forward(prefill_step(2 * b, [-1] * 2 * b, KV, ids))  # each row's cache at 256 tokens
    t_one, t_two_rows, t_composed = rotated_times([
        lambda: runner.forward(decode_step(b, slots[:b], ids)),
        lambda: runner.forward(decode_step(2 * b, slots[: 2 * b], ids)),
        composed], reps * 2)
    return {f"{dtype}_decode_b{b}_composed2_vs_one_adapter": t_composed / t_one,
            f"{dtype}_decode_b{b}_composed2_vs_two_rows": t_composed / t_two_rows}


def measure_kinds(runner: ModelRunner, slots: list[int], dora: list[int], ids: torch.Tensor, b: int, reps: int,
                  dtype: str) -> dict[str, float]:
    """A decode batch of b rows mixing kinds (3/8 LoRA, 3/8 DoRA, 1/4 composing two LoRA adapters), all rank 16,
    against b rows of plain LoRA adapters of the same rank; prefill likewise (64 tokens a row). The LoRA rows
    use the last LoRA slots, next to the DoRA slots, as the slot table places one rank bucket's adapters: the
    plain batch's rows, too, sit in consecutive slots."""
    n_mix = b // 4
    n_dora = (b - n_mix) // 2
    n_lora = b - n_mix - n_dora
    kinds = slots[len(slots) - n_lora :] + dora[:n_dora] + [-1] * n_mix
    weighted = [(r, r + 1, slots[(2 * k + i) % len(slots)], 0.5)
                for k, r in enumerate(range(n_lora + n_dora, b)) for i in range(2)]

    def mixed(step: StepInput, per_row: int) -> torch.Tensor:
        step.weighted = [(s * per_row, e * per_row, slot, w) for s, e, slot, w in weighted]
        return runner.forward(step)

    runner.forward(prefill_step(b, [-1] * b, KV, ids))
    t_lora, t_mixed = rotated_times([
        lambda: runner.forward(decode_step(b, slots[:b], ids)),
        lambda: mixed(decode_step(b, kinds, ids), 1)], reps * 2)
    p_lora, p_mixed = rotated_times([
        lambda: runner.forward(prefill_step(b, slots[:b], PREFILL, ids)),
        lambda: mixed(prefill_step(b, kinds, PREFILL, ids), PREFILL)], reps)
    return {f"{dtype}_decode_b{b}_mixed_kinds_vs_lora": t_mixed / t_lora,
            f"{dtype}_prefill_b{b}_mixed_kinds_vs_lora": p_mixed / p_lora}


def swap_times(runner: ModelRunner, peft, names: list[str], slots: list[int], reps: int) -> tuple[float, float]:
    """Median time of one merged swap between two adapters: ours, and PEFT's unmerge + merge."""
    state = {"i": 0}

    def ours_swap():
        state["i"] ^= 1
        runner.slots.merge(slots[state["i"]])

    t_swap = median_time(ours_swap, reps)
    runner.slots.merge(None)

    def peft_swap():
        state["i"] ^= 1
        peft.unmerge_adapter()
        peft.set_adapter(names[state["i"]])
        peft.merge_adapter()

    peft.set_adapter(names[0])
    peft.merge_adapter()
    p_swap = median_time(peft_swap, reps)
    peft.unmerge_adapter()
    return t_swap, p_swap


def bench_dtype(dtype: str, batches: list[int], reps: int, prepack: bool = True,
                parts: frozenset[str] = frozenset(PARTS)) -> dict:
    loaded = load_default(dtype)
    n_adapters = max(batches)
    specs = {f"r16_{i}": dict(r=16, lora_alpha=32, target_modules=ALL_LINEAR) for i in range(n_adapters)}
    n_dora = n_adapters // 2
    dora_specs = {f"dora16_{i}": dict(r=16, lora_alpha=32, use_dora=True, target_modules=ALL_LINEAR)
                  for i in range(n_dora)}
    peft = make_peft(loaded.model, specs | dora_specs)
    names = list(specs)
    runner = ModelRunner(loaded.model, max_loras=n_adapters + n_dora, max_rank=16, max_model_len=512,
                         kv_tokens=n_adapters * 512, prepack=prepack)
    slots, idents = [], []
    for name in names:
        adapter = parsed(peft, name, runner.lora.shapes)
        idents.append(AdapterIdentity(SHARED, name, adapter.sha256))
        slots.append(runner.slots.pin(idents[-1], adapter))
    dora = []
    for name in dora_specs:
        adapter = parsed(peft, name, runner.lora.shapes)
        dora.append(runner.slots.pin(AdapterIdentity(SHARED, name, adapter.sha256), adapter))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (n_adapters, KV + 1), generator=g)
    out: dict[str, float] = {}
    with torch.inference_mode():
        if "peft" in parts:
            for b in batches:
                out.update(measure_batch(runner, peft, names, slots, ids, b, reps, dtype))
        if "kinds" in parts:
            for b in sorted({min(batches), max(batches) // 2}):
                out.update(measure_composition(runner, slots, ids, b, reps, dtype))
                out.update(measure_kinds(runner, slots, dora, ids, b, reps, dtype))
        if "swap" in parts:
            decode8 = median_time(lambda: runner.forward(decode_step(8, [-1] * 8, ids)), reps * 3)
            t_swap, p_swap = swap_times(runner, peft, names, slots, reps)
            out[f"{dtype}_swap_ours_vs_peft"] = t_swap / p_swap
            out[f"{dtype}_swap_vs_decode_step_b8"] = t_swap / decode8
            out[f"{dtype}_swap_ms"] = t_swap * 1e3
            runner.slots.evict(idents[-1])  # a free slot for the cold loads
            out.update(cold_load(runner, adapter_files(peft, names[0]), reps, dtype))
    return out


def cold_load(runner: ModelRunner, files: tuple[bytes, bytes], reps: int, dtype: str) -> dict[str, float]:
    """Store -> host copy -> device slot, then evicted from both (the runner has one free slot)."""
    with tempfile.TemporaryDirectory() as tmp:
        limits = ValidationLimits(max_rank=16)
        shapes = runner.lora.shapes
        store = AdapterStore(Path(tmp), lambda i, c, w: parse_adapter(i, c, w, shapes, limits))
        record, _ = store.put(SHARED, "cold", *files)
        host = HostCache(store, max_idle=0)

        def cold():
            copy = host.lease(record)
            runner.slots.release(runner.slots.acquire(record.identity, copy.adapter))
            host.release(copy)
            runner.slots.evict(record.identity)

        t_cold = median_time(cold, reps)
    return {f"{dtype}_cold_load_ms": t_cold * 1e3,
            f"{dtype}_cold_load_ms_per_mb": t_cold * 1e3 / (record.size_bytes / 2**20)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--batches", nargs="+", type=int, default=[8, 32])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--prepack", action=argparse.BooleanOptionalAction, default=True,
                    help="base GEMMs through oneDNN over reordered weights, as the server does by default")
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS, help="which figures to measure")
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    results: dict = {"model": "SmolLM2-135M-Instruct", "threads": torch.get_num_threads()}
    for dtype in args.dtypes:
        results.update(bench_dtype(dtype, args.batches, args.reps, args.prepack, frozenset(args.parts)))
    emit(results, args.json_path)


if __name__ == "__main__":
    main()
