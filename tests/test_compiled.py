"""The compiled step against the eager one: models sharing the compiled frame, and the eager fallback."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from tiny_models import LLAMA_ADAPTERS, make_adapters, pin_adapters, warm_up_checked
from transformers import LlamaConfig, LlamaForCausalLM

import server.model_runner as model_runner
from server.kv_blocks import Block
from server.model_runner import ModelRunner, StepInput

SPECS = {k: LLAMA_ADAPTERS[k] for k in ("attn_r4", "mlp_r8", "all_r16")}


def llama(hidden: int, intermediate: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def mixed_step(slots: list[int]) -> StepInput:
    """One prefill of 5 tokens per slot (rows in their own KV blocks), logits of every token."""
    step = StepInput([], [], [], [])
    for row, slot in enumerate(slots):
        block, start = Block(row << 3, 3), len(step.token_ids)
        step.token_ids += [(7 * row + 3 * k) % 96 for k in range(5)]
        step.blocks += [block] * 5
        step.positions += list(range(5))
        step.token_slots += [slot] * 5
        step.prefills.append((start, start + 5, block, 0))
    step.logits_idx = list(range(len(step.token_ids)))
    return step


def runner_of(base: LlamaForCausalLM, compile: bool) -> ModelRunner:
    return ModelRunner(copy.deepcopy(base), max_loras=4, max_rank=16, max_model_len=128, kv_tokens=4 * 128,
                       prepack=True, compile=compile)


@pytest.mark.parametrize("sizes", [[(64, 96), (64, 128), (32, 96)]], ids=["three-sizes"])
def test_models_of_one_architecture_and_other_sizes_each_get_their_graph(tmp_path, sizes):
    """The compiled frame is shared by every model: one whose projections have other sizes must not run another's
    graph (the projections are opaque ops, so their sizes are arguments the graph holds)."""
    for i, (hidden, intermediate) in enumerate(sizes):
        base = llama(hidden, intermediate, seed=i)
        aset = make_adapters(copy.deepcopy(base), SPECS, tmp_path / f"m{i}")
        eager, compiled = runner_of(base, False), runner_of(base, True)
        warm_up_checked(compiled, True)
        slots = [pin_adapters(r, aset.dirs) for r in (eager, compiled)]
        assert slots[0] == slots[1]
        step = mixed_step([-1, *slots[0].values()])
        calls = compiled.context.opaque_calls
        want, got = eager.forward(step), compiled.forward(step)
        assert compiled.context.opaque_calls > calls  # the compiled graph ran
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_model_that_fails_to_compile_runs_eagerly(monkeypatch, caplog):
    def broken(eager):
        def run(embeds, positions):
            raise RuntimeError("inductor could not build the graph")
        return run

    monkeypatch.setattr(model_runner, "compile_backbone", broken)
    base = llama(64, 96, seed=0)
    runner = runner_of(base, True)
    with caplog.at_level(logging.WARNING, logger="server.model_runner"):
        assert runner.warm_up() == 0.0
    assert runner.compiled is None
    assert "inductor could not build the graph" in caplog.text
    step = mixed_step([-1, -1])
    torch.testing.assert_close(runner.forward(step), runner_of(base, False).forward(step), rtol=0, atol=0)
