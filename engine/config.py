"""Engine configuration: one typed object built once at the edge (CLI, server settings)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.params import FeedbackNoise, InputMixture


@dataclass(frozen=True)
class EngineConfig:
    """Limits and placement of one engine.

    ``max_batch_size``: requests decoded together in one forward pass; more wait.
    ``max_seq_len``: most positions one request may occupy (prompt + thoughts + answer);
    ``None`` takes the model's own limit, at most 4096 (or, with ``kv_cache_memory``, at most
    what fits). A request that can never fit is rejected. The KV cache is preallocated for
    ``max_batch_size`` x ``max_seq_len`` positions, so this bounds its memory.
    ``kv_cache_memory``: the KV cache's memory budget: ``"4GiB"``, ``"512MiB"``, a plain
    number of GiB (``4``, ``"0.5"``) or ``"90%"`` of the device's free memory after the
    weights are loaded; ``max_seq_len`` is then derived from it, or checked against it
    (``engine.kv_cache_sizing``).
    ``max_prefill_tokens``: prompt tokens prefilled in one step; a longer prompt is
    prefilled in chunks over several steps, interleaved with decoding, so this bounds the
    latency a burst of arrivals adds to the running requests' next token.
    ``prefill_delay_factor``: while requests decode, a step prefills only as many prompt
    tokens as take about this many decode steps' time (``engine.prefill_pacer``), so a
    burst of arrivals stretches a running stream's gap between tokens to at most about
    ``1 + prefill_delay_factor`` decode steps (W prompts waiting that outnumber D decoding
    requests get W / D times that); 0 (the default here; ``engine serve`` sets 2 for big
    models) prefills ``max_prefill_tokens`` per step whatever decodes.
    ``compile``: run the decode step through ``torch.compile``, compiled when the engine is
    built (needs a C++ compiler on CPU); None ("auto", what ``engine serve`` passes unless
    told) compiles where it pays: a Llama or Qwen2 model with packed weights on CPU
    (``engine.runner.compiled_decode.reason_not_compiled_by_default``). On CPU, a model the lean forward takes compiles its
    decode-only steps around the engine's own products (``engine.runner.compiled_decode``:
    two graphs, cached on disk by inductor between starts; steps with prompt chunks stay
    eager); any other model compiles the modules' decode forward, rows padded to batch buckets.
    ``pack_weights``: ``"auto"`` (the default), ``"on"`` or ``"off"``: multiply by weights
    that oneDNN packed once at load (``engine.runner.packed_linear``) rather than by MKL,
    which packs them on every call; "auto" packs float32 models on CPU whose linear weights
    take 64 MiB or more, and never one compiled through its modules. Results equal the unpacked ones up to
    float rounding.
    ``lean_decode``: the steps of Llama and Qwen2 models run as plain tensor code
    (``engine.runner.lean_decoder``) instead of through the model's modules: the same
    function with a third of the operator calls, a step's decode rows and prompt chunks in
    one forward (``engine.runner.flat_batch``), and a packed layer's q/k/v and gate/up as
    one product each; other models, and steps compiled off the lean path, go through the modules.
    ``prefix_caching``: a new prompt that begins with tokens some KV-cache slot still holds
    (a running request's prompt, or an ended one's not yet overwritten: a shared system
    prompt, a chat's earlier turns) copies those positions instead of prefilling them
    (``engine.prefix_cache``); results equal a full prefill's up to float rounding.
    ``feedback_noise`` (``engine.params.FeedbackNoise``, or its dict): the noise of a soft
    thought whose request names none; ``mixture`` (``engine.params.InputMixture``, or its
    dict): the Mixture of Inputs of a request that names none. A request's ``{"type":
    "none"}`` turns either off.
    """

    device: str = "cpu"
    dtype: str = "float32"
    max_batch_size: int = 64
    max_seq_len: int | None = None
    max_prefill_tokens: int = 8192
    prefill_delay_factor: float = 0.0
    seed: int | None = None
    compile: bool | None = False
    pack_weights: str = "auto"
    lean_decode: bool = True
    prefix_caching: bool = True
    kv_cache_memory: str | float | None = None
    feedback_noise: "FeedbackNoise | dict | None" = None
    mixture: "InputMixture | dict | None" = None

    def __post_init__(self) -> None:
        from engine.params import FeedbackNoise, InputMixture

        if isinstance(self.feedback_noise, dict):
            object.__setattr__(self, "feedback_noise", FeedbackNoise(**self.feedback_noise))
        if isinstance(self.mixture, dict):
            object.__setattr__(self, "mixture", InputMixture(**self.mixture))
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size={self.max_batch_size} is invalid: expected >= 1")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ValueError(f"max_seq_len={self.max_seq_len} is invalid: expected >= 2")
        if self.max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens={self.max_prefill_tokens} is invalid: expected >= 1")
        if not self.prefill_delay_factor >= 0:
            raise ValueError(f"prefill_delay_factor={self.prefill_delay_factor} is invalid: expected >= 0 "
                             f"(0: no pacing)")
        if self.pack_weights not in ("auto", "on", "off"):
            raise ValueError(f"pack_weights={self.pack_weights!r} is invalid: expected one of auto, on, off")
        if self.kv_cache_memory is not None:
            from engine.kv_cache_sizing import parse_kv_cache_memory
            parse_kv_cache_memory(self.kv_cache_memory)


def json_object(text: str, name: str, expected: str) -> dict:
    """A flag's JSON object (``--coconut``, ``--feedback``), or ``ValueError`` naming the flag
    and saying what was ``expected``."""
    import json

    try:
        value = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{name}={text!r} is not JSON ({e}); expected {expected}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name}={text!r} is invalid: expected {expected}")
    return value
