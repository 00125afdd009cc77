"""Tiny random base models and PEFT-made adapters for the CPU test suite."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from adapters_store.format import LoraAdapter, ValidationLimits, parse_adapter, read_adapter_dir
from adapters_store.identity import AdapterIdentity


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    return GPT2LMHeadModel(cfg).eval()


LLAMA_ADAPTERS: dict[str, dict] = {
    "attn_r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "mlp_r8": dict(r=8, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "all_r16": dict(r=16, lora_alpha=8, target_modules="all-linear"),
    "rslora_r8": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "patterns": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
                     rank_pattern={"q_proj": 4, "model.layers.1.self_attn.v_proj": 12},
                     alpha_pattern={"down_proj": 4}),
    "regex_l1": dict(r=6, lora_alpha=6, target_modules=r".*\.1\..*(k_proj|o_proj|up_proj)"),
    "layer0_r2": dict(r=2, lora_alpha=32, target_modules=["q_proj", "o_proj"], layers_to_transform=[0]),
}

SERVING_ADAPTERS: dict[str, dict] = {  # eight adapters for engine and HTTP tests on the tiny chat model
    f"a{i}": dict(r=r, lora_alpha=2 * r, target_modules=t)
    for i, (r, t) in enumerate([
        (4, ["q_proj", "v_proj"]), (8, "all-linear"), (16, ["gate_proj", "up_proj", "down_proj"]),
        (2, ["o_proj"]), (8, ["k_proj", "v_proj", "down_proj"]), (4, "all-linear"), (12, ["q_proj", "up_proj"]),
        (6, ["v_proj", "o_proj", "gate_proj"]),
    ])
}

DORA_LLAMA: dict[str, dict] = {
    "dora_attn_r4": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "k_proj", "v_proj"]),
    "dora_all_r8": dict(r=8, lora_alpha=16, use_dora=True, target_modules="all-linear"),
}
DORA_GPT2: dict[str, dict] = {  # c_attn and c_fc have biases: the rescale keeps them
    "dora_attn_r4": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["c_attn"]),
    "dora_mlp_r8": dict(r=8, lora_alpha=16, use_dora=True, target_modules=["c_fc", "mlp.c_proj"]),
}

GPT2_ADAPTERS: dict[str, dict] = {
    "attn_r4": dict(r=4, lora_alpha=8, target_modules=["c_attn"]),
    "mlp_r8": dict(r=8, lora_alpha=16, target_modules=["c_fc", "mlp.c_proj"]),
    "all_r16": dict(r=16, lora_alpha=8, target_modules=["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]),
    "rslora_r8": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["c_attn", "c_fc"]),
    "patterns": dict(r=8, lora_alpha=16, target_modules=["c_attn", "c_fc"], rank_pattern={"c_fc": 4},
                     alpha_pattern={"h.1.attn.c_attn": 2}),
    "layer1_r2": dict(r=2, lora_alpha=4, target_modules=["c_attn"], layers_to_transform=[1]),
}


PROMPT_LEARNING = {  # prompt and prefix tuning adapters for the tiny chat model
    "pt5": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
    "px4": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "px3proj": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True,
                                  encoder_hidden_size=32),  # saved with its projection folded in
}


def save_prompt_learning(base: torch.nn.Module, specs: dict, root: Path, seed: int = 20) -> dict[str, Path]:
    """PEFT prompt learning adapters as PEFT initialises and saves them (random virtual tokens)."""
    dirs = {}
    for i, (name, cfg) in enumerate(specs.items()):
        torch.manual_seed(seed + i)
        dirs[name] = root / name
        get_peft_model(copy.deepcopy(base), copy.deepcopy(cfg)).save_pretrained(dirs[name])
    return dirs


@dataclass
class AdapterSet:
    base: torch.nn.Module  # untouched copy of the base model
    peft: PeftModel  # PEFT model holding every adapter (the reference)
    dirs: dict[str, Path]  # adapter name -> PEFT directory


def save_peft_adapters(base: torch.nn.Module, specs: dict[str, dict], root: Path, seed: int = 1,
                       b_std: float = 0.2) -> dict[str, Path]:
    """Create adapters with PEFT itself (B non-zero) and save them with save_pretrained."""
    fan = isinstance(base, GPT2LMHeadModel)
    dirs: dict[str, Path] = {}
    for i, (name, spec) in enumerate(specs.items()):
        torch.manual_seed(seed + i)
        cfg = LoraConfig(init_lora_weights=False, fan_in_fan_out=fan, **spec)
        model = get_peft_model(copy.deepcopy(base), cfg)
        with torch.no_grad():  # make B large enough that adapters change the logits visibly
            for n, p in model.named_parameters():
                if "lora_B" in n or "lora_embedding_" in n:  # an embedding's A too: PEFT's init is N(0, 1)
                    p.normal_(0, b_std)
                elif "lora_magnitude_vector" in n:  # DoRA: magnitudes away from the initial weight norms
                    p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
                elif "modules_to_save" in n or "trainable_tokens_delta" in n:  # trained copies and rows
                    p.add_(torch.randn_like(p) * p.std() * 2)
        dirs[name] = root / name
        model.save_pretrained(dirs[name])
    return dirs


def make_adapters(base: torch.nn.Module, specs: dict[str, dict], root: Path, seed: int = 1) -> AdapterSet:
    """PEFT-made adapters plus one PeftModel holding all of them (the reference)."""
    dirs = save_peft_adapters(base, specs, root, seed)
    names = list(dirs)
    peft = PeftModel.from_pretrained(copy.deepcopy(base), dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(dirs[name], adapter_name=name)
    return AdapterSet(base=base, peft=peft.eval(), dirs=dirs)


def load_parsed(name: str, path: Path, target_shapes, max_rank: int = 64) -> LoraAdapter:
    config, weights = read_adapter_dir(path)
    return parse_adapter(name, config, weights, target_shapes, ValidationLimits(max_rank=max_rank))


# (architecture, prepack, compile, kernels) of the runner-level PEFT-oracle tests, and their ids: the plain
# runners take torch's side paths and decode attention, the others loramux's CPU kernels (the default)
RUNNER_VARIANTS = [("llama", False, False, False), ("gpt2", False, False, False), ("llama", True, False, True),
                   ("gpt2", True, False, True), ("llama", True, True, True), ("gpt2", True, True, True)]
RUNNER_IDS = ["llama", "gpt2", "llama-prepacked-kernels", "gpt2-prepacked-kernels", "llama-compiled-kernels",
              "gpt2-compiled-kernels"]


def warm_up_checked(runner, compiled: bool) -> None:
    """Build the compiled step's graphs; the runner is compiled exactly when asked (not fallen back to eager)."""
    runner.warm_up()
    assert (runner.compiled is not None) == compiled


def pin_adapters(runner, dirs: dict[str, Path]) -> dict[str, int]:
    """Parse each PEFT directory and pin it into a slot of the runner's slot table; name -> slot."""
    slots = {}
    for name, path in dirs.items():
        adapter = load_parsed(name, path, runner.lora.shapes)
        slots[name] = runner.slots.pin(AdapterIdentity("test", name, adapter.sha256), adapter)
    return slots


@torch.no_grad()
def peft_logits(peft: PeftModel, adapter: str | None, ids: list[int]) -> torch.Tensor:
    """Logits [T, V] of one sequence under one adapter (None = base model)."""
    x = torch.tensor([ids])
    if adapter is None:
        with peft.disable_adapter():
            return peft(input_ids=x).logits[0].float()
    peft.set_adapter(adapter)
    return peft(input_ids=x).logits[0].float()
