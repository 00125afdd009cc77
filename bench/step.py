"""One engine step of the default model: eager against compiled, base rows against 16 adapters (#12).

The adapters and their ranks and targets are bench/peers.py's (16 PEFT adapters, ranks 4-64, mixed targets).
Steps, packed as the engine packs them (rows grouped by rank bucket, then slot):
  decode   64 rows, one token each, over a KV context of `--context` tokens (the peers' requests: 34-92);
  prefill  4 rows of 64 prompt tokens (256 tokens: the default --max-tokens-per-step).
Each is timed with base-model rows and with the 16 adapters (4 rows each), eagerly and through the compiled
step (the same runner, weights and slots: only the backbone function differs), all in rotation, medians; the
16-adapter steps also eagerly with the side paths through torch's matmuls instead of loramux's CPU kernels
(`--no-lora-kernels`, except that a bf16 model's slot weights stay bf16 here; the prefill's runs of 64 tokens
take torch's GEMMs either way), and both decode steps
eagerly with decode attention through torch's batched matmuls instead of loramux's kernel (`--no-attention-kernel`).
Also the floor of the side paths: the bytes of the slot weights one step reads (each adapter's A and B at its
bucket's rank, for the projections it targets), over the read bandwidth measured in the same run.

    python bench/step.py --json bench/step.json
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from common import emit, load_default, parsed, rotated_times
from peers import peer_adapters

from adapters_store.identity import AdapterIdentity
from adapters_store.store import SHARED
from server.kv_blocks import Block
from server.lora.plan import rank_bucket
from server.model_runner import ModelRunner, StepInput
from server.threads import engine_threads, use_threads

ORDER = 4  # each row's KV block: 2^4 units of 16 tokens = 256 tokens
ROWS, PREFILL_ROWS, PREFILL = 64, 4, 64


def block(row: int) -> Block:
    return Block(row << ORDER, ORDER)


def decode_step(slots: list[int], context: int) -> StepInput:
    n = len(slots)
    return StepInput(list(range(100, 100 + n)), [block(r) for r in range(n)], [context] * n, slots,
                     decode=list(range(n)), logits_idx=list(range(n)))


def prefill_step(slots: list[int]) -> StepInput:
    step = StepInput([], [], [], [])
    for r, slot in enumerate(slots):
        start = len(step.token_ids)
        step.token_ids += list(range(200 + r, 200 + r + PREFILL))
        step.blocks += [block(r)] * PREFILL
        step.positions += list(range(PREFILL))
        step.token_slots += [slot] * PREFILL
        step.prefills.append((start, start + PREFILL, block(r), 0))
        step.logits_idx.append(start + PREFILL - 1)
    return step


def read_bandwidth(reps: int) -> float:
    """Bytes per second that a sum over 256 MiB of fp32 reads (every core)."""
    x = torch.ones(64 << 20)
    return x.numel() * 4 / min(rotated_times([x.sum], reps, inner=3))


def side_path_bytes(runner: ModelRunner, specs: dict[str, dict]) -> int:
    """Slot weights one step with every adapter reads: A [r, d_in] and B [r, d_out] of each targeted module."""
    size = torch.tensor([], dtype=runner.lora.dtype).element_size()
    total = 0
    for spec in specs.values():
        r = rank_bucket(spec["r"])
        for name, shape in runner.lora.shapes.items():
            if name.rsplit(".", 1)[-1] in spec["target_modules"]:
                total += r * (shape.d_in + shape.d_out) * size
    return total


def bench_dtype(dtype: str, args) -> dict:
    loaded = load_default(dtype)
    names, specs, peft = peer_adapters(loaded.model)
    runner = ModelRunner(loaded.model, max_loras=16, max_rank=64, max_model_len=256, kv_tokens=ROWS * 256,
                         prepack=True, compile=True)
    compile_s = runner.warm_up()
    compiled = runner.compiled
    if compiled is None:
        raise RuntimeError("the step did not compile (see the warning above)")
    slots = {n: runner.slots.pin(AdapterIdentity(SHARED, n, a.sha256), a)
             for n in names for a in [parsed(peft, n, runner.lora.shapes)]}
    order = sorted(names, key=lambda n: (rank_bucket(specs[n]["r"]), slots[n]))  # as the engine packs rows
    mixed = [slots[order[i * len(order) // ROWS]] for i in range(ROWS)]
    steps = {"decode_base": decode_step([-1] * ROWS, args.context), "decode_16": decode_step(mixed, args.context),
             "prefill_base": prefill_step([-1] * PREFILL_ROWS),
             "prefill_16": prefill_step([slots[order[i * 4]] for i in range(PREFILL_ROWS)])}

    kernel_max_run = runner.kernel_max_run
    if kernel_max_run is None:
        raise RuntimeError("the LoRA CPU kernels did not build (see the warning above)")

    if not runner.attention_kernel:
        raise RuntimeError("the decode-attention kernel did not build (see the warning above)")

    def timed(name: str, mode: str) -> Callable[[], None]:
        def run() -> None:
            runner.compiled = compiled if mode == "compiled" else None
            runner.kernel_max_run = None if mode == "eager_torch" else kernel_max_run
            runner.attention_kernel = mode != "eager_torch_attention"
            runner.forward(steps[name])
        return run

    keys = ([(name, mode) for name in steps for mode in ("eager", "compiled")] + [("decode_16", "eager_torch")] +
            [(name, "eager_torch_attention") for name in ("decode_base", "decode_16")])
    with torch.inference_mode():
        times = rotated_times([timed(name, mode) for name, mode in keys], args.reps, inner=3)
    runner.compiled, runner.kernel_max_run, runner.attention_kernel = compiled, kernel_max_run, True
    t = {f"{name}_{mode}": s * 1e3 for (name, mode), s in zip(keys, times, strict=True)}
    out = {f"{dtype}_{k}_ms": v for k, v in t.items()}
    for kind in ("decode", "prefill"):
        for mode in ("eager", "compiled"):
            out[f"{dtype}_{kind}_16_vs_base_{mode}"] = t[f"{kind}_16_{mode}"] / t[f"{kind}_base_{mode}"]
        for rows in ("base", "16"):
            out[f"{dtype}_{kind}_{rows}_compiled_vs_eager"] = t[f"{kind}_{rows}_compiled"] / t[f"{kind}_{rows}_eager"]
    out[f"{dtype}_decode_16_vs_base_eager_torch"] = t["decode_16_eager_torch"] / t["decode_base_eager"]
    out[f"{dtype}_decode_16_kernels_vs_torch_eager"] = t["decode_16_eager"] / t["decode_16_eager_torch"]
    for rows in ("base", "16"):
        out[f"{dtype}_decode_{rows}_attention_kernel_vs_torch_eager"] = (
            t[f"decode_{rows}_eager"] / t[f"decode_{rows}_eager_torch_attention"])
    floor_ms = side_path_bytes(runner, specs) / read_bandwidth(args.reps) * 1e3
    out[f"{dtype}_decode_side_path_floor_ms"] = floor_ms
    out[f"{dtype}_decode_16_floor_vs_base_compiled"] = 1 + floor_ms / t["decode_base_compiled"]
    out[f"{dtype}_decode_16_floor_vs_base_eager"] = 1 + floor_ms / t["decode_base_eager"]
    out[f"{dtype}_compile_seconds"] = compile_s
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--context", type=int, default=64, help="KV tokens each decode row attends to")
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()
    use_threads(engine_threads(None))
    results: dict = {"rows": ROWS, "context": args.context}
    for dtype in args.dtypes:
        results |= bench_dtype(dtype, args)
    emit(results, args.json_path)


if __name__ == "__main__":
    main()
