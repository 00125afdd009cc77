"""Server settings: one pydantic-settings class, filled from CLI flags and `LORAMUX_*` environment variables."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/loramux, else ~/.cache/loramux."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "loramux"


class Settings(BaseSettings):
    """Every flag of `loramux-server`; `--max-loras` becomes `max_loras` and `LORAMUX_MAX_LORAS`."""

    model_config = SettingsConfigDict(env_prefix="LORAMUX_", extra="forbid", protected_namespaces=())

    model: str = Field("default", description="'default', a Hugging Face model directory or a .gguf file")
    adapters_dir: Path = Field(Path(".loramux/adapters"), description="root of the durable adapter store")
    cache_dir: Path = Field(default_factory=default_cache_dir,
                            description="converted GGUF weights and other caches (default ~/.cache/loramux)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    mode: Literal["auto", "batched", "merged"] = "auto"
    max_batch_size: int = Field(64, ge=1, description="running sequences")
    kv_cache_tokens: int = Field(32768, ge=16, description="tokens of KV cache shared by the running sequences")
    prepack: bool = Field(True, description="CPU: base GEMMs through oneDNN over reordered weights (one more "
                                            "copy of the projection and head weights)")
    compile: bool = Field(False, description="run the step under torch.compile (inductor; start-up builds its "
                                             "graphs first, 20-60 s on 2 CPU cores). Off by default: measured "
                                             "0.97x / 1.06x (fp32 / bf16) over HTTP and 0.85x / 0.70x in the "
                                             "engine, against the eager step")
    lora_kernels: bool = Field(True, description="CPU: the side paths of decode rows through loramux's SGMV "
                                                 "kernels (built with the C++ compiler on first start, ~15 s); "
                                                 "off: torch's batched matmuls")
    attention_kernel: bool = Field(True, description="CPU: decode tokens attend through loramux's kernel (built "
                                                     "like the SGMV kernels), each over its own keys in place; "
                                                     "off: torch's batched matmuls")
    max_loras: int = Field(16, ge=1, description="adapters resident in device slots")
    max_cpu_loras: int = Field(64, ge=0, description="adapters kept in host memory")
    max_rank: int = Field(64, ge=1)
    max_adapters_per_request: int = Field(4, ge=1, le=16, description="adapters one request may compose "
                                          "(`adapters`); each takes a device slot while it runs")
    api_keys_file: Path | None = Field(None, description="YAML/JSON keys file; without it the server runs open")
    served_model_name: str | None = Field(None, description="name of the base model (default: the model's name)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    preload: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="adapter ids made resident at start-up ('ns/id' for a tenant's)"
    )
    seed_adapters: Path | None = Field(
        None, description="import every PEFT sub-directory of this directory into the shared namespace at start"
    )
    max_model_len: int = Field(2048, ge=2)
    max_tokens_per_step: int = Field(256, ge=1)
    merge_share: float = Field(0.75, gt=0, le=1, description="auto: merge an adapter holding this share of rows")
    unmerge_share: float = Field(0.5, gt=0, le=1, description="auto: keep it merged while it holds this share")
    threads: int | None = Field(None, ge=1, description="CPU threads of the engine (default: every core)")
    stream_interval: int = Field(1, ge=1, le=64, description="tokens per streamed chunk of a sample (its first "
                                 "token and its end go out at once); more cuts the per-chunk cost of streaming")
    max_turn_s: float = Field(2.0, gt=0, description="merged: longest wait an adapter's turn may impose")
    max_waiting: int = Field(256, ge=1, description="queued sequences before requests get 503")
    queue_timeout: float = Field(120.0, gt=0, description="seconds a request may wait for admission before a 503")
    max_concurrent_per_tenant: int = Field(
        64, ge=1, description="generation and upload requests in progress per tenant (with API keys)")
    max_waiting_per_tenant: int | None = Field(
        None, ge=1, description="queued sequences per tenant, with API keys (default: a quarter of --max-waiting)")
    max_pins_per_tenant: int | None = Field(
        None, ge=0, description="device slots a tenant may pin (default: a quarter of --max-loras)")
    max_adapters_per_tenant: int = Field(256, ge=0, description="adapters a tenant may store")
    max_adapter_mb_per_tenant: float = Field(4096, ge=0, description="adapter bytes a tenant may store (MiB)")
    max_upload_mb: float = Field(256, gt=0, description="cap on an upload's body and an adapter's weights")
    max_body_kb: float = Field(1024, gt=0, description="cap on every other request body (KiB)")
    read_timeout: float = Field(30.0, gt=0, description="seconds a client may pause while sending a request body")
    max_connections: int = Field(1024, ge=1, description="open connections before new ones get 503")
    max_n: int = Field(8, ge=1)
    max_stop: int = Field(8, ge=0)
    allow_open: bool = Field(False, description="listen on a non-loopback --host without --api-keys-file")
    create_keys_file: bool = Field(
        False, description="create --api-keys-file with one admin key if it does not exist (mode 0600)")
    vllm_lora_dir: Path | None = Field(
        None, description="allow-listed directory for the vLLM-style load/unload routes (off when unset)"
    )
    drain_timeout: float = Field(30.0, ge=0, description="seconds in-flight requests get to finish on SIGTERM")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    @field_validator("preload", mode="before")
    @classmethod
    def _split_preload(cls, value: object) -> object:
        """Accept `a,b c` (env var) as well as a list whose items may hold commas."""
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            return value
        return [part for item in items for part in str(item).replace(",", " ").split()]

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _no_open_exposure(self) -> Settings:
        if self.api_keys_file is None and not self.allow_open and not _is_loopback(self.host):
            raise ValueError(f"--host {self.host} is reachable from other machines, and without --api-keys-file "
                             "every caller would be an admin: give a keys file (--create-keys-file makes one) or "
                             "--allow-open")
        if self.create_keys_file and self.api_keys_file is None:
            raise ValueError("--create-keys-file needs --api-keys-file PATH")
        return self

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_kb * 2**10)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
