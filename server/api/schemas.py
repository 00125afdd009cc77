"""Request and response bodies (OpenAI shapes for completions, chat and models; loramux's for adapters)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.engine_types import MAX_ADAPTER_WEIGHT
from server.sampling import MAX_LOGPROBS

TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]

# Every list and string a request may carry is bounded here; the body cap (--max-body-kb) bounds their sum.
MAX_TEXT = 1 << 20  # characters of one prompt or message
MAX_PROMPTS = 64  # prompts in one completion request
MAX_PROMPT_IDS = 1 << 17  # token ids in one prompt
MAX_NAME = 256  # model, user, message name
MAX_STOP_CHARS = 256
MAX_STOP_STRINGS = 16  # --max-stop applies below this
MAX_STOP_IDS = 64
MAX_MESSAGES = 1024
MAX_PARTS = 256  # content parts of one message
MAX_COMPOSED = 16  # adapters in one `adapters` list (--max-adapters-per-request applies below this)

Text = Annotated[str, Field(max_length=MAX_TEXT)]
Name = Annotated[str, Field(max_length=MAX_NAME)]
StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
TokenIds = Annotated[list[TokenId], Field(max_length=MAX_PROMPT_IDS)]


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class StreamOptions(BaseModel):
    include_usage: bool = False


class AdapterWeight(BaseModel):
    id: Name = Field(description="an adapter id (yours first, then a shared one)")
    weight: float = Field(1.0, ge=-MAX_ADAPTER_WEIGHT, le=MAX_ADAPTER_WEIGHT, allow_inf_nan=False,
                          description="the factor of this adapter's delta")


class _Sampling(BaseModel):
    """Fields shared by completions and chat (OpenAI's, plus vLLM's top_k, min_tokens, ignore_eos, ...)."""

    model_config = ConfigDict(extra="ignore")

    model: Name = Field(description="an adapter id, or the base model's served name (with `adapters`: the "
                        "base model's served name)")
    adapters: Annotated[list[AdapterWeight], Field(min_length=1, max_length=MAX_COMPOSED)] | None = Field(
        None, description="serve the base model plus the weighted sum of these adapters' deltas (one adapter "
        "with a weight other than 1: that adapter at another scale); at most one of them may be a prompt or "
        "prefix tuning adapter (weight 1), whose virtual tokens then precede the prompt; `model` must then name "
        "the base model")
    temperature: float | None = Field(1.0, ge=0, le=1e6)
    top_p: float | None = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1, description="0 or -1: off")
    seed: Seed | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_IDS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=2**31 - 1)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, le=2**31 - 1)
    presence_penalty: float | None = Field(None, description="only 0 is supported")
    frequency_penalty: float | None = Field(None, description="only 0 is supported")
    user: Name | None = None


class CompletionRequest(_Sampling):
    prompt: (Text | Annotated[list[Text], Field(max_length=MAX_PROMPTS)] | TokenIds
             | Annotated[list[TokenIds], Field(max_length=MAX_PROMPTS)]) = Field(
        description="text, a list of texts, a list of token ids, or a list of token-id lists"
    )
    max_tokens: int | None = Field(16, ge=1, le=2**31 - 1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = Field(False, description="not supported: must be false")


class ContentPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | Annotated[list[ContentPart], Field(max_length=MAX_PARTS)] | None = None
    name: Name | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, le=2**31 - 1, description="default: the rest of the context")
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions format."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobEntry] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ReplicaResidency(BaseModel):
    replica: str = Field(description="the engine replica's id")
    tier: Literal["disk", "host", "device"]
    slot: int | None
    pinned: bool
    in_flight: int


class AdapterInfo(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    namespace: str = Field(description="the owning tenant, or 'shared'")
    shared: bool
    kind: Literal["lora", "dora", "ia3", "prompt", "prefix"] = Field(
        description="lora; dora (weight-decomposed: LoRA plus a magnitude); ia3 (learned scales of projections); "
        "prompt (prompt tuning: virtual input embeddings before the prompt); prefix (prefix tuning: virtual keys "
        "and values before the prompt)")
    rank: int
    virtual_tokens: int = Field(0, description="prompt and prefix tuning: the positions of the context its virtual "
                                "tokens take before the prompt (0 for the other kinds)")
    composable: bool = Field(True, description="whether it may be weighted or composed in `adapters` (LoRA that "
                             "replaces nothing: not DoRA, IA3, prompt or prefix tuning, modules_to_save or "
                             "trainable tokens)")
    alpha: float
    target_modules: list[str]
    size_bytes: int
    sha256: str
    created_at: float
    residency: Literal["disk", "host", "device"]
    pinned: bool
    in_flight: int
    requests_served: int
    last_used: float | None = Field(description="unix time of the last request, null if never used")
    replicas: list[ReplicaResidency] | None = Field(
        None, description="cluster mode only: each engine replica that holds this version, and how")


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterInfo]


class AdapterEvicted(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    namespace: str
    evicted: bool
    purged: bool


class LoadLoraAdapterRequest(BaseModel):
    """vLLM's `/v1/load_lora_adapter` body."""

    lora_name: Name
    lora_path: Annotated[str, Field(max_length=1024)]


class UnloadLoraAdapterRequest(BaseModel):
    """vLLM's `/v1/unload_lora_adapter` body."""

    lora_name: Name
    lora_int_id: int | None = None


class HealthStatus(BaseModel):
    status: str


class ReadyStatus(BaseModel):
    status: str
    model: str
    running: int
    waiting: int
    mode: str
