"""vLLM (CPU) peer runner for loramux benchmarks: offline batched generation, with or without LoRA.

Standalone: runs with the vLLM venv's python (``make vllm-venv``), never imports loramux.

    .vllm-venv/bin/python bench/vllm_peer.py --model HF_DIR --dtype float32 \\
        --requests requests.json --lora on --reps 3 --json out.json

requests.json: {"prompts": [[token ids], ...], "adapters": [null or "name", ...],
"adapter_dirs": {"name": "/path/to/peft/dir"}, "max_tokens": 32}. With --lora off the adapters are
ignored and every prompt runs on the base model. All prompts go into one generate call (concurrent
requests). Output JSON: {"tok_s": [per pass], "tok_s_median": x, "tokens": [[ids] per prompt, last pass]}.
It re-executes itself with LD_PRELOAD set to whichever of tcmalloc (apt: libtcmalloc-minimal4) and the venv's
libiomp5 exist (VLLM_PEER_NO_PRELOAD=1 skips this), and binds OpenMP to this process's CPUs unless
VLLM_CPU_OMP_THREADS_BIND is set. --lora on runs eager (vLLM-CPU's rule); --lora off compiles unless --eager.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


def _ensure_env() -> None:
    """Set vLLM-CPU's recommended preloads and thread binding (before vllm is imported)."""
    cpus = sorted(os.sched_getaffinity(0))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(str(c) for c in cpus))
    libiomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    wanted = [p for p in (TCMALLOC, str(libiomp)) if Path(p).exists()]
    current = os.environ.get("LD_PRELOAD", "")
    if os.environ.get("VLLM_PEER_NO_PRELOAD") or all(p in current for p in wanted):
        return
    os.environ["LD_PRELOAD"] = ":".join([*wanted, *([current] if current else [])])
    os.execv(sys.executable, [sys.executable, *sys.argv])


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="Hugging Face model directory")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--requests", required=True, type=Path, help="request JSON file (see module docstring)")
    ap.add_argument("--lora", choices=["on", "off"], default="on")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", type=Path, help="write results here")
    ap.add_argument(
        "--eager",
        action="store_true",
        help="enforce_eager (vLLM-CPU already runs eager when LoRA is enabled; "
        "without LoRA it torch-compiles unless this is set)",
    )
    ap.add_argument("--kv-cache-gib", type=float, default=1.0, help="CPU KV cache size")
    ap.add_argument("--serve", action="store_true",
                    help="after the warm-up, run one timed pass per 'pass' line on stdin and print it as a line "
                         "'RESULT {json}' ('quit' ends): lets a caller rotate passes with other systems")
    return ap.parse_args()


def _requests(args, spec: dict) -> tuple[list, list, dict[str, int]]:
    """(token prompts, LoRA request per prompt or None, adapter name -> LoRA int id) from the spec file."""
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    prompts = [TokensPrompt(prompt_token_ids=list(map(int, ids))) for ids in spec["prompts"]]
    names = spec.get("adapters") or [None] * len(prompts)
    if len(names) != len(prompts):
        raise SystemExit("'adapters' must have one entry per prompt")
    lora_on = args.lora == "on"
    dirs = spec.get("adapter_dirs", {})
    ids = {name: i for i, name in enumerate(sorted({n for n in names if n}), start=1)}
    missing = [n for n in ids if n not in dirs]
    if lora_on and missing:
        raise SystemExit(f"adapter_dirs lacks {missing}")
    return prompts, [LoRARequest(n, ids[n], dirs[n]) if (lora_on and n) else None for n in names], ids


def main() -> None:
    args = _parse_args()
    _ensure_env()

    from vllm import LLM, SamplingParams

    spec = json.loads(args.requests.read_text())
    prompts, reqs, ids = _requests(args, spec)
    lora_on = args.lora == "on"
    max_tokens = int(spec.get("max_tokens", 32))
    llm = LLM(model=args.model, dtype=args.dtype, enable_lora=lora_on, max_loras=16, max_lora_rank=64,
              max_num_seqs=64, max_model_len=256, seed=0, enforce_eager=args.eager,
              kv_cache_memory_bytes=int(args.kv_cache_gib * (1 << 30)))

    def run(n_prompts: int, n_tokens: int) -> list:
        sp = SamplingParams(temperature=0, max_tokens=n_tokens, ignore_eos=True)
        lora = reqs[:n_prompts] if lora_on else None
        return llm.generate(prompts[:n_prompts], sp, lora_request=lora, use_tqdm=False)

    run(min(4, len(prompts)), 2)  # warm-up (also loads the first adapters)
    if args.serve:
        _serve(run, len(prompts), max_tokens)
        return
    tok_s, outs = [], []
    for rep in range(args.reps):
        t0 = time.perf_counter()
        outs = run(len(prompts), max_tokens)
        wall = time.perf_counter() - t0
        n_out = sum(len(o.outputs[0].token_ids) for o in outs)
        tok_s.append(n_out / wall)
        print(f"pass {rep + 1}/{args.reps}: {n_out} tokens in {wall:.3f}s = {tok_s[-1]:.1f} tok/s", flush=True)
    config = {"dtype": args.dtype, "lora": args.lora, "eager": args.eager, "prompts": len(prompts),
              "max_tokens": max_tokens, "adapters": len(ids) if lora_on else 0,
              "omp_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND")}
    result = {"tok_s": tok_s, "tok_s_median": statistics.median(tok_s) if tok_s else None,
              "tokens": [list(o.outputs[0].token_ids) for o in outs], "config": config}
    if args.json:
        args.json.write_text(json.dumps(result))
    print(json.dumps({k: result[k] for k in ("tok_s", "tok_s_median", "config")}))


def _serve(run, n_prompts: int, max_tokens: int) -> None:
    print("RESULT " + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() != "pass":
            return
        t0 = time.perf_counter()
        outs = run(n_prompts, max_tokens)
        wall = time.perf_counter() - t0
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        print("RESULT " + json.dumps({"tok_s": sum(map(len, tokens)) / wall, "tokens": tokens}), flush=True)


if __name__ == "__main__":
    main()
