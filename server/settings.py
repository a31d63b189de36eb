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

    model: str | None = Field(None, description="the model: a checkpoint directory, a .gguf file (or DIR:FILE.gguf), "
                              "or a Hugging Face Hub id org/name (or org/name:FILE.gguf) taken from the Hub's cache "
                              "(HF_HOME, HF_HUB_OFFLINE, HF_TOKEN honoured) (default: the bundled model)")
    revision: str | None = Field(None, description="a Hub id's branch, tag or commit (default: main)")
    served_model_name: str | None = Field(None, description="name reported by the API "
                                          "(default: the Hub id, the GGUF file's stem or the directory's name)")
    host: str = Field("127.0.0.1", description="interface to bind (0.0.0.0 for all)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port)")
    api_key: SecretStr | None = Field(None, description="require 'Authorization: Bearer KEY' on the API")

    device: str = Field("auto", description="torch device: cpu, cuda, cuda:1, ... (auto: cuda if available)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights dtype (auto: bfloat16 on CUDA and on CPUs that multiply it natively, "
        "AVX-512 BF16 or AMX; float32 on other CPUs)")
    max_batch_size: int = Field(64, ge=1, description="requests decoded together in one forward pass")
    max_queue: int = Field(256, ge=1, description="requests waiting for a batch slot before 503")
    max_seq_len: int | None = Field(None, ge=2, description="positions per request (default: the model's, at most 4096, or with --kv-cache-memory at most what fits); the KV cache holds max_batch_size x max_seq_len")
    kv_cache_memory: str | None = Field(None, description="memory for the KV cache: 4GiB, 512MiB, a plain "
                                        "number of GiB (4, 0.5), or 90% of the device's memory free after the weights "
                                        "are loaded; with it an unset max_seq_len becomes the model's context if that fits "
                                        "max_batch_size slots, else to what fits (no 4096 cap), and a given max_seq_len "
                                        "that does not fit is refused at start-up (default: sized by max_seq_len alone)")
    max_prefill_tokens: int = Field(512, ge=1, description="prompt tokens prefilled per step (longer prompts are prefilled in chunks, interleaved with decoding): lower for steadier gaps between tokens under arrivals, higher for sooner first tokens")
    prefill_delay_factor: float | None = Field(None, ge=0, description="while requests decode, a step prefills only "
                                               "the prompt tokens that take about this many decode steps' time (measured "
                                               "as it runs), so a burst of arrivals stretches a running stream's gap "
                                               "between tokens to at most about 1 + this many decode steps; prompts that "
                                               "outnumber the decoding requests W to D get W/D times that "
                                               "(0: prefill --max-prefill-tokens per step whatever decodes)")
    seed: int | None = Field(None, description="seed of the engine's shared generator (unseeded requests)")
    compile: bool | None = Field(None, description="compile the decode step with torch.compile at start-up. "
                                 "Unset: where it pays, on CPU for Llama and Qwen2 models with packed weights "
                                 "(float32, 64 MiB or more) when a C++ compiler is on the PATH. There their "
                                 "decode-only steps run as one graph around the packed products (SmolLM2-135M: "
                                 "30 against 35 ms a step at 1 row, 102 against 121 at 32); the first start "
                                 "compiles for about 90 s, later ones load inductor's on-disk cache in about 8. "
                                 "--compile forces it (other models compile their modules, rows padded to batch "
                                 "buckets; on CPU it needs a C++ compiler); --no-compile turns it off")
    pack_weights: Literal["auto", "on", "off"] = Field(
        "auto", description="multiply by weights prepared once at load instead of MKL's per-call packing (CPU): "
        "in float32 on x86-64 with AVX2, the engine's own kernels, each decoder weight laid out once in blocks "
        "of 16 outputs, the LM head's a copy beside the tied embedding (built with the machine's C compiler; "
        "COCONUT_CPU_KERNEL=off to skip them), else oneDNN's packed copy (SmolLM2-135M's products at 1 row: 14 ms "
        "against oneDNN's 22 and MKL's 35); auto: float32 models whose linear weights take 64 MiB or more "
        "(with --compile only on the lean path)")
    lean_decode: bool = Field(True, description="run the steps of Llama and Qwen2 models as plain tensor code "
                              "instead of through the model's modules: the same function in a third of the "
                              "operator calls, decode rows and prompt chunks in one forward, a packed layer's "
                              "q/k/v and gate/up as one product each (SmolLM2-135M, 16 staggered streams in the "
                              "engine: 178-182 against 140-151 tok/s with separate forwards); other models use "
                              "the modules")
    prefix_caching: bool = Field(True, description="a prompt that begins with tokens a KV-cache slot still holds "
                                 "(a running or recently ended request's: a shared system prompt, a chat's "
                                 "earlier turns) copies them instead of prefilling them; per token, from 16 tokens")
    engine_process: bool = Field(True, description="run the engine loop in its own process (the HTTP "
                                 "work and the model then never wait for each other's interpreter lock; the "
                                 "server's process only tokenizes); --no-engine-process runs it in a thread of "
                                 "the server's process. Ray Serve replicas always run their engine in-process")
    max_engine_restarts: int = Field(5, ge=0, description="with the engine in its own process: when it dies, "
                                     "the in-flight requests fail at once (500) and a new engine process is "
                                     "started after a backoff (1 s, 2 s, 4 s, ...); more than this many restarts "
                                     "within --engine-restart-window-s make the server exit non-zero (4), for the "
                                     "supervisor above it (0: exit on the first failure)")
    engine_restart_window_s: float = Field(600.0, gt=0, description="the window --max-engine-restarts counts "
                                           "failures in, seconds")
    engine_restart_backoff_s: float = Field(1.0, ge=0, description="the wait before the first restart within the "
                                            "window, doubled for each further one (at most 60 s)")
    torch_threads: int | None = Field(None, ge=1, description="CPU threads for torch ops (default: "
                                      "torch's choice; with the engine process every usable CPU for weights of 100 MiB or "
                                      "more, every CPU but one (left to the API process) for smaller ones, its OpenMP "
                                      "threads sleeping between steps after about 1 ms of spinning: OMP_WAIT_POLICY=PASSIVE, "
                                      "GOMP_SPINCOUNT=100000 unless set)")

    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest accepted request body (413 above)")
    retry_after_s: int = Field(1, ge=0, description="Retry-After seconds sent with 503")
    drain_timeout_s: float = Field(300.0, gt=0, description="on SIGTERM, how long in-flight requests "
                                   "may take to finish")
    keep_alive_timeout_s: int = Field(90, ge=1, description="how long an idle HTTP keep-alive connection is "
                                      "held open, seconds; longer than clients' own idle expiry (httpx and the "
                                      "openai SDK: 5 s), so the server does not close a connection as a client "
                                      "reuses it (a spurious ReadError on the client)")
    log_level: str = Field("info", description=f"one of {', '.join(LOG_LEVELS)}")

    # a latent reasoner from any causal LM (a plain Hugging Face directory, no coconut.json), or
    # coconut.json's fields overridden: settings.coconut_overrides()
    latent_feedback: Literal["hidden", "soft_embedding"] | None = Field(
        None, description="what a thought feeds back: hidden (COCONUT) or soft_embedding (Soft Thinking, "
        "no training: any causal LM); overrides coconut.json's latent_feedback")
    bot_token: str | None = Field(None, description="the token that opens latent mode (e.g. <think>; added "
                                  "to a plain model's tokenizer when it has none)")
    eot_token: str | None = Field(None, description="the token that closes it (e.g. </think>)")
    latent_mode: Literal["fixed", "entropy", "token", "none"] | None = Field(
        None, description="the latent mode of a request that names none (coconut.json's latent_mode; none: "
                          "answer without thoughts unless a request asks for them)")
    feedback_noise: str | None = Field(None, description="the noise of soft thoughts whose request names none, "
                                       "as a JSON object: '{\"type\": \"gumbel\", \"tau\": 0.5}' or "
                                       "'{\"type\": \"dirichlet\", \"alpha\": 1.0}' (default: none, "
                                       "deterministic thoughts)")
    mixture: str | None = Field(None, description="the Mixture of Inputs of requests that name none, as a JSON "
                                "object: '{\"type\": \"moi\", \"beta\": 1.0, \"top_k\": 20}' (default: none, "
                                "plain token inputs)")
    coconut: str | None = Field(None, description="more coconut.json fields, as a JSON object (e.g. "
                                "'{\"max_thoughts\": 32, \"entropy_threshold\": 0.05, \"answer_prefix\": \"\"}'), "
                                "applied last")

    # scale-out on Ray Serve (server.ray_serve; needs the extra: pip install -e ".[ray]")
    replicas: int | None = Field(None, ge=1, description="serve N replicas of the app on Ray Serve, each with its "
                                 "own engine, behind Ray's proxy (default: one process, no Ray)")
    ray_address: str | None = Field(None, description="Ray cluster to deploy on, e.g. ray://head:10001 or auto "
                                    "(default: start a local Ray cluster; needs --replicas or --autoscale)")
    num_gpus_per_replica: float = Field(0.0, ge=0, description="GPUs Ray reserves for each replica "
                                        "(fractions share a GPU)")
    ray_ingress: Literal["proxy", "haproxy"] = Field(
        "proxy", description="what takes the HTTP connections on Ray: Ray Serve's Python proxy (its stable "
                             "path), or its HAProxy ingress (a Ray feature flag; less overhead per request; "
                             "on a remote cluster set RAY_SERVE_ENABLE_HA_PROXY=1 there)")
    autoscale: str | None = Field(None, description="MIN:MAX replicas, scaled by Ray Serve on ongoing requests "
                                  "per replica (see --autoscale-target-ongoing-requests)")
    autoscale_target_ongoing_requests: int | None = Field(
        None, ge=1, description="--autoscale: the ongoing requests per replica Ray Serve scales to hold "
                                "(default: max_batch_size, a full batch)")

    @field_validator("autoscale")
    @classmethod
    def _autoscale(cls, value: str | None) -> str | None:
        if value is None:
            return None
        low, sep, high = value.partition(":")
        if not sep or not low.strip().isdigit() or not high.strip().isdigit():
            raise ValueError(f"expected MIN:MAX replicas such as 1:4, got {value!r}")
        if int(high) < 1 or int(low) > int(high):
            raise ValueError(f"expected MIN:MAX replicas with 0 <= MIN <= MAX and MAX >= 1, got {value!r}")
        return f"{int(low)}:{int(high)}"

    def autoscale_bounds(self) -> tuple[int, int] | None:
        if self.autoscale is None:
            return None
        low, high = self.autoscale.split(":")
        return int(low), int(high)

    def uses_ray(self) -> bool:
        """Whether ``engine serve`` deploys on Ray Serve: replicas asked for (more than one,
        or one on a given cluster) or autoscaling. ``--replicas 1`` alone is the plain server."""
        return bool((self.replicas or 1) > 1 or self.autoscale or self.ray_address)

    @field_validator("feedback_noise", "mixture")
    @classmethod
    def _request_default(cls, value: str | None, info) -> str | None:
        if value is None:
            return None
        parsed = _default_object(info.field_name, value)   # ValueError saying what is expected
        return None if parsed is None else value

    def request_defaults(self) -> dict:
        """``EngineConfig``'s ``feedback_noise`` and ``mixture`` (dicts) from the flags."""
        return {name: _default_object(name, getattr(self, name)) for name in ("feedback_noise", "mixture")}

    @field_validator("kv_cache_memory")
    @classmethod
    def _kv_cache_memory(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from engine.kv_cache_sizing import parse_kv_cache_memory
        parse_kv_cache_memory(value)   # ValueError saying what is expected
        return value.strip()

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
        if self.resolved_device() == "cpu":
            from engine.cpu_features import default_cpu_dtype
            return default_cpu_dtype()
        return "bfloat16"

    def resolved_prefill_delay_factor(self) -> float:
        """``--prefill-delay-factor``, else 2 for weights of 100 MiB or more and 0 (no pacing)
        for smaller ones, whose forwards cost mostly their fixed overhead: there, splitting
        prompts adds steps without shortening them (the bundled model served 0.93x the
        requests/s at 32 clients, its ITL p99 145 against 134 ms). Factor 2 against 3 and 1.5
        on SmolLM2-135M (``engine bench peers``, coconut alone, one run each): output tok/s at
        16 / 32 streams 115.3 / 149.7 against 115.7 / 151.9 and 103.2 / 127.4; ITL p99 at 4 /
        16 streams and 1 req/s 157 / 235 / 176 ms against 190 / 295 / 243 and 143 / 227 / 177."""
        if self.prefill_delay_factor is not None:
            return self.prefill_delay_factor
        from server.app import PARALLEL_WEIGHTS_BYTES, weights_bytes
        return 2.0 if weights_bytes(self.model_spec()) >= PARALLEL_WEIGHTS_BYTES else 0.0

    def coconut_overrides(self) -> dict | None:
        """``coconut.json`` fields from the flags (None: none given)."""
        from engine.config import json_object

        fields: dict = {}
        if self.latent_feedback is not None:
            fields["latent_feedback"] = {"type": self.latent_feedback}
        for name in ("bot_token", "eot_token", "latent_mode"):
            if getattr(self, name) is not None:
                fields[name] = getattr(self, name)
        if self.coconut:
            fields.update(json_object(self.coconut, "coconut", "a JSON object of coconut.json fields"))
        return fields or None

    @field_validator("model", mode="before")
    @classmethod
    def _model(cls, value):
        return str(value) if isinstance(value, Path) else value

    def model_spec(self) -> str:
        """What ``--model`` names (``engine.sources.resolve_model`` reads it), or the bundled model."""
        if self.model is not None:
            return self.model
        from engine.models import default_model_dir
        return str(default_model_dir())


def _default_object(name: str, value: str | None) -> dict | None:
    """A request default's JSON object, checked as a request's would be (``ValueError``)."""
    if value is None or not value.strip():
        return None
    from engine.config import json_object
    from engine.params import FeedbackNoise, InputMixture

    if name == "feedback_noise":
        parsed = json_object(value, "feedback_noise", 'an object such as {"type": "gumbel", "tau": 0.5}')
        FeedbackNoise(**_known(parsed, ("type", "tau", "alpha"), name))
    else:
        parsed = json_object(value, "mixture", 'an object such as {"type": "moi", "beta": 1.0, "top_k": 20}')
        InputMixture(**_known(parsed, ("type", "beta", "top_k"), name))
    return parsed


def _known(parsed: dict, fields: tuple[str, ...], name: str) -> dict:
    extra = sorted(set(parsed) - set(fields))
    if extra:
        raise ValueError(f"{name}: unknown fields {extra}; expected {', '.join(fields)}")
    if name == "feedback_noise" and "type" not in parsed:
        raise ValueError("feedback_noise needs a type: 'gumbel', 'dirichlet' or 'none'")
    return parsed
