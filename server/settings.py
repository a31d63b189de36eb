"""Server settings: one typed object, built once at the edge (CLI flags and env vars).

Every field can be set by an environment variable named ``COCONUT_`` + the field name in
upper case (``COCONUT_PORT=9000``, ``COCONUT_API_KEY=...``, ``COCONUT_MODEL=/ckpt``);
command-line flags (``engine serve --port 9000``) win over the environment, which wins
over the defaults below. ``model`` unset means the bundled default model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COCONUT_", extra="forbid", frozen=True)

    model: Path | None = Field(None, description="checkpoint directory (default: the bundled model)")
    served_model_name: str | None = Field(None, description="name reported by the API "
                                          "(default: the checkpoint directory's name)")
    host: str = Field("127.0.0.1", description="interface to bind (0.0.0.0 for all)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port)")
    api_key: SecretStr | None = Field(None, description="require 'Authorization: Bearer KEY' on the API")

    device: str = Field("auto", description="torch device: cpu, cuda, cuda:1, ... (auto: cuda if available)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights dtype (auto: float32 on CPU, bfloat16 on CUDA)")
    max_batch_size: int = Field(32, ge=1, description="requests decoded together in one forward pass")
    max_queue: int = Field(256, ge=1, description="requests waiting for a batch slot before 503")
    max_seq_len: int | None = Field(None, ge=2, description="positions per request (default: the model's, at most 4096); the KV cache holds max_batch_size x max_seq_len")
    max_prefill_tokens: int = Field(8192, ge=1, description="prompt tokens prefilled per step (longer prompts are prefilled in chunks, interleaved with decoding)")
    seed: int | None = Field(None, description="seed of the engine's shared generator (unseeded requests)")
    torch_threads: int | None = Field(None, ge=1, description="CPU threads for torch ops (default: "
                                      "torch's choice; 1 is fastest for small models on busy CPUs)")

    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest accepted request body (413 above)")
    retry_after_s: int = Field(1, ge=0, description="Retry-After seconds sent with 503")
    drain_timeout_s: float = Field(300.0, gt=0, description="on SIGTERM, how long in-flight requests "
                                   "may take to finish")
    log_level: str = Field("info", description=f"one of {', '.join(LOG_LEVELS)}")

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.lower() not in LOG_LEVELS:
            raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}")
        return value.lower()

    @field_validator("api_key")
    @classmethod
    def _key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value():
            return None  # COCONUT_API_KEY="" means no key, not "the empty key"
        return value

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "float32" if self.resolved_device() == "cpu" else "bfloat16"

    def model_dir(self) -> Path:
        if self.model is not None:
            return self.model
        from engine.models import default_model_dir
        return default_model_dir()
