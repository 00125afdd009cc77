"""One forward pass of a packed, mixed-adapter step over the frozen base model."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from adapters_store.prompt import ModelGeometry
from server.attention import build_attn_meta, kernel_serves, register
from server.compiled import compile_backbone
from server.gemm import PackedLinear, prepack_supported
from server.kv_blocks import Block
from server.kv_cache import KVCache
from server.lora import kernels
from server.lora.plan import NO_ADAPTER, plan_lora
from server.lora.runtime import LoraRuntime
from server.lora.slots import SlotTable
from server.step_context import ForwardContext, StepContext

log = logging.getLogger(__name__)


@dataclass
class StepInput:
    """The packed tokens of one engine step (N tokens from any number of sequences)."""

    token_ids: list[int]  # [N]
    blocks: list[Block]  # [N] KV block of each token's sequence
    positions: list[int]  # [N]
    token_slots: list[int]  # [N] adapter slot of each token, -1 for the base model
    decode: list[int] = field(default_factory=list)  # packed indices of single decode tokens
    prefills: list[tuple[int, int, Block, int]] = field(default_factory=list)  # (start, end, block, pos0)
    logits_idx: list[int] = field(default_factory=list)  # packed indices whose next-token logits are needed
    # (start, end, slot, weight): tokens of a composed request add weight times that slot's delta
    weighted: list[tuple[int, int, int, float]] = field(default_factory=list)
    # (start, end, rows [end - start, hidden]): tokens whose input embeddings are given (prompt tuning)
    embeds: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)


def kv_geometry(model: PreTrainedModel) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a decoder-only model's config."""
    cfg = model.config.get_text_config()
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return layers, kv_heads, head_dim


def context_limit(model: PreTrainedModel) -> int:
    cfg = model.config.get_text_config()
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 2048)


def model_geometry(model: PreTrainedModel, embed: torch.nn.Module, head: torch.nn.Module,
                   kv: tuple[int, int, int]) -> ModelGeometry:
    """What prompt and prefix tuning, and LoRA on the embedding and the head, must fit."""
    names = {id(m): name for name, m in model.named_modules()}
    tied = head.weight is embed.weight
    with torch.no_grad():
        embed_norms = embed.weight.float().norm(dim=1).cpu()  # [vocab]
        head_norms = embed_norms if tied else head.weight.float().norm(dim=1).cpu()
    plain = type(embed) is torch.nn.Embedding and type(head) is torch.nn.Linear and head.bias is None  # no scaling
    return ModelGeometry(embed.weight.shape[1], *kv, vocab=embed.weight.shape[0],
                         embed_name=names.get(id(embed), "") if plain else "",
                         head_name=names.get(id(head), "") if plain else "", embed_norms=embed_norms,
                         head_norms=head_norms, tied=tied)


class ModelRunner:
    """Owns the model, its LoRA runtime and slot table, and the KV cache (single-threaded use).

    `compile`: the backbone runs under torch.compile (server/compiled.py); call `warm_up` before serving.
    `lora_kernels`: on CPU, a step's side paths (the runs of up to kernels.MAX_RUN tokens: all of them) go to
    loramux's kernels (server/lora/kernels.py, built on first use), the rest to torch's matmuls.
    `attention_kernel`: on CPU, decode tokens attend through loramux's kernel (server/attention.py)."""

    def __init__(self, model: PreTrainedModel, *, max_loras: int, max_rank: int, max_model_len: int,
                 kv_tokens: int, on_slot_load: Callable[[float], None] | None = None, prepack: bool = False,
                 compile: bool = False, lora_kernels: bool = True, attention_kernel: bool = True):
        self.model = model
        self.backbone = model.base_model
        self.head = model.get_output_embeddings()
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.context = ForwardContext()
        use_kernels = lora_kernels and self.device.type == "cpu" and kernels.load()
        self.kernel_max_run = kernels.MAX_RUN if use_kernels else None
        self.lora = LoraRuntime(model, max_loras, max_rank, self.context, prepack,  # probes the model: before attention
                                kernels=use_kernels)
        self.head_gemm = PackedLinear(self.head) if prepack and prepack_supported(self.head.weight) else self.head
        self.slots = SlotTable(max_loras, self.lora, on_load=on_slot_load)
        self.attention_kernel = attention_kernel and kernel_serves(self.device, self.dtype)
        model.set_attn_implementation(register())
        self.max_model_len = min(max_model_len, context_limit(model))
        layers, kv_heads, head_dim = kv_geometry(model)
        self.cache = KVCache(layers, kv_tokens, kv_heads, head_dim, self.max_model_len, self.dtype, self.device)
        self.vocab_size = self.head.weight.shape[0]
        self.embed = model.get_input_embeddings()
        self.geometry = model_geometry(model, self.embed, self.head, (layers, kv_heads, head_dim))
        self.compiled = compile_backbone(self._backbone) if compile else None

    def _backbone(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[1, N, d] input embeddings, [1, N] positions -> [1, N, d] final hidden states."""
        return self.backbone(inputs_embeds=embeds, position_ids=positions, use_cache=False).last_hidden_state

    @torch.inference_mode()
    def warm_up(self) -> float:
        """Build the compiled step's graphs (a single token, and several) before the first request: returns the
        seconds it took. A model that fails to compile runs eagerly from then on (a warning says why)."""
        if self.compiled is None:
            return 0.0
        block = Block(0, 0)
        one = StepInput([0], [block], [0], [NO_ADAPTER], decode=[0], logits_idx=[0])
        two = StepInput([0, 0], [block] * 2, [0, 1], [NO_ADAPTER] * 2, prefills=[(0, 2, block, 0)], logits_idx=[1])
        calls = self.context.opaque_calls
        try:
            start = time.perf_counter()
            self.forward(one)  # each builds one graph
            self.forward(two)
            seconds = time.perf_counter() - start
            if self.context.opaque_calls == calls:  # torch.compile gave up and ran the frame eagerly
                raise RuntimeError("torch.compile ran the backbone eagerly (see TORCH_LOGS=graph_breaks)")
        except Exception as e:  # inductor fails in many ways: the eager step is the fallback
            log.warning("torch.compile failed (%s: %s); the model runs eagerly", type(e).__name__, str(e)[:300])
            self.compiled = None
            return 0.0
        finally:
            self.cache.clear(block, 2)
        log.info("compiled the step in %.1f s", seconds)
        return seconds

    def step_context(self, step: StepInput) -> StepContext:
        """The attention metadata and LoRA plan of a step (the slot table's ranks and merged slot)."""
        lora = plan_lora(step.token_slots, self.slots.ranks(), slot_groups=self.slots.groups(),
                         weighted=step.weighted, rescaled_slots=self.slots.rescaled_slots(),
                         merged_slot=self.slots.merged_slot, device=self.device,
                         kernel_max_run=self.kernel_max_run)
        attn = build_attn_meta(self.cache, step.blocks, step.positions, step.decode, step.prefills, self.device,
                               kernel=self.attention_kernel)
        return StepContext(attn=attn, lora=lora)

    @torch.inference_mode()
    def forward(self, step: StepInput) -> torch.Tensor:
        """Run the step; returns float32 logits [len(step.logits_idx), V]."""
        with self.context.bind(self.step_context(step)) as ctx:
            ids = torch.tensor(step.token_ids, dtype=torch.long, device=self.device)[None]  # [1, N]
            edges = self.lora.edges
            slots = torch.tensor(step.token_slots, dtype=torch.long, device=self.device) if edges.active else None
            x = self.embed(ids)  # [1, N, hidden]
            for start, end, rows in step.embeds:
                x[0, start:end] = rows.to(x.device, x.dtype)
            if edges.embed:
                edges.add_embedding(x[0], ids[0], slots, step.weighted)
            backbone = self.compiled or self._backbone
            out = backbone(x, ctx.attn.positions[None])  # [1, N, d]
            idx = torch.tensor(step.logits_idx, dtype=torch.long, device=self.device)
            hidden = out[0].index_select(0, idx)  # [n_out, d]
            logits = self.head_gemm(hidden)  # [n_out, V]
            if edges.head:
                edges.add_head(logits, hidden, slots[idx], step.weighted, idx)
        return logits.float()
