"""Shared fixtures: a tiny random Llama saved as an HF directory with the default model's tokenizer, and the
adapter format tests' tiny PEFT adapter."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from adapter_format_helpers import Saved, save_peft, target_shapes, tiny_llama
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from adapters_store.format import ModuleShape
from server.model_loader import DEFAULT_GGUF, default_gguf_path


@pytest.fixture(scope="session")
def chat_tokenizer():
    """SmolLM2's byte-level BPE tokenizer with its chat template (from the GGUF, no hub)."""
    gguf = default_gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=DEFAULT_GGUF)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, chat_tokenizer) -> Path:
    """A 2-layer random Llama (GQA) with the real tokenizer, saved like any HF model directory."""
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(chat_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=chat_tokenizer.bos_token_id, eos_token_id=chat_tokenizer.eos_token_id,
                      pad_token_id=chat_tokenizer.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger logits so greedy choices are far from ties
        model.lm_head.weight.mul_(8)
    model.save_pretrained(path)
    chat_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_adapter_dirs(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """Eight PEFT adapters (ranks 2-16, various targets) for the tiny chat model."""
    from tiny_models import SERVING_ADAPTERS, save_peft_adapters

    base = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    return save_peft_adapters(base, SERVING_ADAPTERS, tmp_path_factory.mktemp("tiny-adapters"), b_std=0.5)


@pytest.fixture(scope="session")
def virtual_dirs(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """PEFT prompt and prefix tuning adapters for the tiny chat model (tiny_models.PROMPT_LEARNING)."""
    from tiny_models import PROMPT_LEARNING, save_prompt_learning

    base = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    return save_prompt_learning(base, PROMPT_LEARNING, tmp_path_factory.mktemp("virtual"))


@pytest.fixture(scope="module")
def client(server):
    """An HTTP client of the module's `server` fixture (a ThreadServer)."""
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def base_name(client) -> str:
    """The served name of the module's server's base model."""
    return client.get("/v1/models").json()["data"][0]["id"]


# adapter format tests: a tiny Llama's projection shapes and one PEFT-saved adapter (per module)


@pytest.fixture(scope="module")
def llama_shapes() -> dict[str, ModuleShape]:
    return target_shapes(tiny_llama())


@pytest.fixture(scope="module")
def basic(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    """r=8, alpha=16 on q, k, v, o of both layers."""
    return save_peft(
        tmp_path_factory.mktemp("basic"),
        tiny_llama(),
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    )
