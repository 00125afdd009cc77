"""Typed results of the loramux API (pydantic models that keep any extra fields the server sends)."""

from __future__ import annotations

from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class Usage(_Model):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionChoice(_Model):
    index: int = 0
    text: str = ""
    finish_reason: str | None = None
    logprobs: Any = None


class Completion(_Model):
    """Answer of ``POST /v1/completions``."""

    id: str = ""
    object: str = "text_completion"
    created: int | None = None
    model: str = ""
    choices: list[CompletionChoice] = Field(default_factory=list)
    usage: Usage | None = None

    @property
    def text(self) -> str:
        """Text of the first choice."""
        return self.choices[0].text if self.choices else ""


class CompletionChunk(Completion):
    """One streamed piece of a completion; ``text`` is the new text of the first choice."""


class ChatMessage(_Model):
    role: str = "assistant"
    content: str | None = None


class ChatChoice(_Model):
    index: int = 0
    message: ChatMessage = Field(default_factory=ChatMessage)
    finish_reason: str | None = None
    logprobs: Any = None


class ChatCompletion(_Model):
    """Answer of ``POST /v1/chat/completions``."""

    id: str = ""
    object: str = "chat.completion"
    created: int | None = None
    model: str = ""
    choices: list[ChatChoice] = Field(default_factory=list)
    usage: Usage | None = None

    @property
    def text(self) -> str:
        """Content of the first choice's message."""
        return (self.choices[0].message.content or "") if self.choices else ""


class ChatDelta(_Model):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(_Model):
    index: int = 0
    delta: ChatDelta = Field(default_factory=ChatDelta)
    finish_reason: str | None = None
    logprobs: Any = None


class ChatCompletionChunk(_Model):
    """One streamed piece of a chat completion; ``text`` is the first choice's new content."""

    id: str = ""
    object: str = "chat.completion.chunk"
    created: int | None = None
    model: str = ""
    choices: list[ChatChunkChoice] = Field(default_factory=list)
    usage: Usage | None = None

    @property
    def text(self) -> str:
        return (self.choices[0].delta.content or "") if self.choices else ""


class AdapterInfo(_Model):
    """An adapter's metadata and residency; absent fields are None (e.g. in an upload answer)."""

    id: str
    kind: str | None = None  # "lora" or "dora"
    rank: int | None = Field(None, validation_alias=AliasChoices("rank", "r"))
    alpha: float | None = Field(None, validation_alias=AliasChoices("alpha", "lora_alpha"))
    target_modules: list[str] | str | None = Field(None, validation_alias=AliasChoices("target_modules", "targets"))
    size_bytes: int | None = Field(None, validation_alias=AliasChoices("size_bytes", "size"))
    sha256: str | None = None
    residency: str | None = Field(None, validation_alias=AliasChoices("residency", "tier"))
    pinned: bool | None = None
    in_flight: int | None = Field(None, validation_alias=AliasChoices("in_flight", "in_flight_requests", "inflight"))
    requests_served: int | None = Field(None, validation_alias=AliasChoices("requests_served", "served"))
    last_used: float | str | None = None
    shared: bool | None = None
    owner: str | None = Field(None, validation_alias=AliasChoices("owner", "tenant", "namespace"))
    is_new: bool | None = None  # set by upload: True on 201, False when the same content was already stored

    @model_validator(mode="before")
    @classmethod
    def _flatten_residency(cls, data: Any) -> Any:
        """Accept ``residency`` as an object (``{"tier", "pinned", "in_flight", ...}``) as well as a string."""
        if isinstance(data, dict) and isinstance(data.get("residency"), dict):
            nested = dict(data["residency"])
            tier = nested.pop("tier", nested.pop("residency", None))
            data = {**nested, **{k: v for k, v in data.items() if k != "residency"}, "residency": tier}
        return data

    @property
    def targets(self) -> list[str]:
        """Target modules as a list (a regex string becomes a one-item list)."""
        if self.target_modules is None:
            return []
        return [self.target_modules] if isinstance(self.target_modules, str) else list(self.target_modules)


class ModelInfo(_Model):
    """An entry of ``GET /v1/models``: the base model, or an adapter whose ``parent`` is the base."""

    id: str
    object: str = "model"
    created: int | None = None
    owned_by: str | None = None
    root: str | None = None
    parent: str | None = None
