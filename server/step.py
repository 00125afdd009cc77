"""Packing the running sequences into one step, and turning its logits into tokens."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import torch

from server.engine_types import TokenLogprob
from server.lora.plan import rank_bucket
from server.model_runner import StepInput
from server.sampling import apply_min_tokens, compute_logprobs, sample
from server.sequence import Sequence


@dataclass
class StepPlan:
    step: StepInput
    sampled: list[Sequence] = field(default_factory=list)  # sequences with a logits row, in row order
    fed: list[tuple[Sequence, int, bool]] = field(default_factory=list)  # (sequence, positions written, prefill?)


def build_step(running: list[Sequence], merged_slot: int | None, budget: int, slot_ranks: list[int]) -> StepPlan:
    """One decode token per decoding sequence, then prefill chunks (oldest first) up to `budget` tokens.

    Tokens are packed rows of the merged adapter first, then by rank bucket and adapter slot: the LoRA
    planner then runs each bucket's slots as contiguous runs (see server/lora/plan.py). A prefill chunk
    that ends a sequence's prefill gets a logits row (the next token); a decode token always does.
    """
    decodes = [s for s in running if not s.in_prefill]
    budget -= len(decodes)
    chunks: dict[int, int] = {}
    for seq in sorted((s for s in running if s.in_prefill), key=lambda s: (s.t_admitted, s.block.start)):
        n = min(seq.prefill_to - seq.fed, budget)
        if n <= 0:
            break
        chunks[id(seq)] = n
        budget -= n
    entries = decodes + [s for s in running if id(s) in chunks]
    entries.sort(key=lambda s: (merged_slot is None or s.slot != merged_slot,
                                rank_bucket(slot_ranks[s.slot]) if s.slot >= 0 else 0, s.slot, s.block.start))
    plan = StepPlan(StepInput([], [], [], []))
    for seq in entries:
        _pack(plan, seq, chunks.get(id(seq)))
    return plan


def _pack(plan: StepPlan, seq: Sequence, chunk: int | None) -> None:
    step, start, pos0 = plan.step, len(plan.step.token_ids), seq.fed
    if chunk is not None:  # positions pos0 .. pos0 + chunk - 1 of its prompt (or, after preemption, all it had)
        n = chunk
        step.token_ids += seq.tokens(pos0, pos0 + n)
        step.prefills.append((start, start + n, seq.block, pos0))
        virtual = seq.virtual
        if virtual is not None and virtual.kind == "prompt" and pos0 < virtual.count:  # its virtual embeddings
            end = min(pos0 + n, virtual.count)
            step.embeds.append((start, start + end - pos0, virtual.tensor[pos0:end]))
        samples = pos0 + n == seq.prefill_to
    else:  # its last output token, at the next position
        n, samples = 1, True
        step.token_ids.append(seq.output_ids[-1])
        step.decode.append(start)
    step.positions += range(pos0, pos0 + n)
    step.blocks += [seq.block] * n
    step.token_slots += [seq.slot] * n
    step.weighted += [(start, start + n, part.slot, part.weight) for part in seq.mix]
    plan.fed.append((seq, n, chunk is not None))
    if samples:
        step.logits_idx.append(start + n - 1)
        plan.sampled.append(seq)


def sample_step(logits: torch.Tensor, seqs: list[Sequence], eos_ids: Collection[int],
                tokenizer) -> list[tuple[Sequence, int, TokenLogprob | None]]:
    """logits: [len(seqs), V] float32 -> (sequence, token, logprob entry) for each row."""
    params = [s.req.params for s in seqs]
    masked = apply_min_tokens(logits, params, [len(s.output_ids) for s in seqs], eos_ids)
    tokens = sample(masked, params, [s.generator for s in seqs]).tolist()
    entries: list[TokenLogprob | None] = [None] * len(seqs)
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if rows:
        k = max(params[i].logprobs for i in rows)
        idx = torch.tensor(rows, device=logits.device)
        chosen, top_ids, top_lp = compute_logprobs(logits[idx], torch.tensor([tokens[i] for i in rows]), k)
        for j, i in enumerate(rows):
            kk = params[i].logprobs
            top = tuple(
                (t, tokenizer.decode([t]), lp)
                for t, lp in zip(top_ids[j, :kk].tolist(), top_lp[j, :kk].tolist(), strict=True)
            )
            entries[i] = TokenLogprob(tokens[i], tokenizer.decode([tokens[i]]), float(chosen[j]), top)
    return [(seq, tok, lp) for seq, tok, lp in zip(seqs, tokens, entries, strict=True)]
