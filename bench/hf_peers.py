"""The in-process peers of the engine benchmark: PEFT one request at a time, PEFT mixed static batches and
transformers `generate` on the base model alone, each recording when every token arrives."""

from __future__ import annotations

import time

import torch
from transformers.generation.streamers import BaseStreamer
from workloads import STATIC_BATCH, Req, Sizes, Trace, phases


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


def warm_peers(peft, base, reqs: list[Req], names: list[str], pad_id: int) -> None:
    run_static(peft, reqs, [0], 1, 2, pad_id, names, one_at_a_time=True)
    run_static(peft, reqs, [0, 1], 2, 2, pad_id, names)
    run_static(base, reqs, [0, 1], 2, 2, pad_id, None)
