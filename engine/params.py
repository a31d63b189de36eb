"""Per-request parameters: how to sample the answer and how to think before it.

Both are frozen dataclasses validated once, where a request enters (the Python API, the
HTTP layer or the CLI). A bad value raises ``ValueError`` naming the field, the value
and what was expected. Defaults that depend on the checkpoint (the number of thoughts,
the stop threshold) stay ``None`` here and are resolved by ``resolve_latent`` against
the checkpoint's ``coconut.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

LatentMode = Literal["fixed", "auto", "none"]
LATENT_MODES = ("fixed", "auto", "none")

#: Temperatures below this are greedy: dividing logits by a smaller one overflows float32
#: (vLLM uses the same cut-off).
GREEDY_TEMPERATURE = 1e-5

# ---------------------------------------------------------------- the request contract
# Every default and bound of a request is written once, here: ``SamplingParams`` and
# ``LatentPolicy`` check them, and the server's pydantic schemas (``server.schemas``,
# ``server.openai_schemas``) derive their ``Field`` bounds and documented defaults from them.

#: Sampling defaults (``/v1/reason``, the Python API and the CLI).
DEFAULT_MAX_TOKENS = 64
DEFAULT_TEMPERATURE = 0.0          # greedy
DEFAULT_TOP_P = 1.0                # no nucleus filter
DEFAULT_TOP_K = 0                  # no top-k filter
#: The OpenAI-compatible routes follow OpenAI's defaults instead.
OPENAI_DEFAULT_TEMPERATURE = 1.0
OPENAI_COMPLETIONS_DEFAULT_MAX_TOKENS = 16   # /v1/completions only; chat uses DEFAULT_MAX_TOKENS

#: Sampling bounds.
MIN_MAX_TOKENS = 1
MIN_TEMPERATURE = 0.0
MAX_TEMPERATURE = 100.0
MIN_TOP_P = 0.0                    # exclusive
MAX_TOP_P = 1.0
MIN_TOP_K = 0
SEED_BITS = 63
SEED_LIMIT = 2 ** SEED_BITS        # seeds are in [0, SEED_LIMIT)
MAX_STOP_STRINGS = 16
MIN_STOP_LENGTH = 1

#: Hard ceilings that protect the server from absurd requests; the per-model limit
#: (maximum sequence length) is checked separately when a request is added.
MAX_THOUGHTS_CEILING = 1024
MIN_THOUGHTS = 0                   # fixed mode: 0 thoughts is allowed (markers only)
MIN_MAX_THOUGHTS = 1               # auto mode's cap
MIN_THRESHOLD = 0.0
MAX_THRESHOLD = 1.0
MAX_TRACE_TOP_K = 50
#: The HTTP API's ``latent_trace_top_k`` (used when ``return_latent_trace`` is true).
DEFAULT_TRACE_TOP_K = 5
MIN_TRACE_TOP_K = 1


def _check(condition: bool, name: str, value, expected: str) -> None:
    if not condition:
        raise ValueError(f"{name}={value!r} is invalid: expected {expected}")


@dataclass(frozen=True)
class SamplingParams:
    """How language tokens are chosen.

    ``temperature == 0`` (or below ``GREEDY_TEMPERATURE``) is greedy decoding (argmax). ``top_k == 0`` and ``top_p == 1``
    disable those filters. A ``seed`` gives the request its own random generator, so its
    output does not depend on what else shares the batch. ``stop`` strings end the
    answer and are not part of it; ``stop_token_ids`` do the same on token ids.
    ``logprobs`` asks for the log-probability of each chosen token under the model's
    unmodified distribution (before temperature, top-k and top-p), as vLLM reports it.
    """

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: int = DEFAULT_TOP_K
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= MIN_MAX_TOKENS,
               "max_tokens", self.max_tokens, f"an integer >= {MIN_MAX_TOKENS}")
        _check(isinstance(self.temperature, (int, float))
               and MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE,
               "temperature", self.temperature,
               f"a number in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}] (0 = greedy)")
        _check(isinstance(self.top_p, (int, float)) and MIN_TOP_P < self.top_p <= MAX_TOP_P,
               "top_p", self.top_p, f"a number in ({MIN_TOP_P:g}, {MAX_TOP_P:g}]")
        _check(isinstance(self.top_k, int) and self.top_k >= MIN_TOP_K,
               "top_k", self.top_k, f"an integer >= {MIN_TOP_K} (0 = disabled)")
        _check(self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < SEED_LIMIT),
               "seed", self.seed, f"null or an integer in [0, 2**{SEED_BITS})")
        _check(all(isinstance(s, str) and len(s) >= MIN_STOP_LENGTH for s in self.stop),
               "stop", self.stop, "non-empty strings")
        _check(len(self.stop) <= MAX_STOP_STRINGS, "stop", self.stop,
               f"at most {MAX_STOP_STRINGS} stop strings")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids", self.stop_token_ids, "non-negative integers")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


@dataclass(frozen=True)
class LatentPolicy:
    """How many continuous thoughts to spend before answering.

    - ``fixed``: exactly ``thoughts`` thoughts (``None``: the checkpoint's default).
    - ``auto``: after each thought the checkpoint's stop classifier reads the hidden
      state; a stop probability >= ``threshold`` ends latent mode; ``max_thoughts``
      caps it. ``None`` values take the checkpoint's defaults.
    - ``none``: no ``<bot>``/``<eot>`` markers and no thoughts (CoT / no-CoT models).
    - ``mode=None`` (what the HTTP API sends when ``latent.mode`` is unset): the fields
      given imply it (``thoughts``: fixed; ``max_thoughts`` / ``threshold``: auto), else
      it stays ``None`` and ``CoconutConfig.resolve`` takes the checkpoint's default mode.

    ``trace_top_k > 0`` records, for every thought, the top-k tokens of
    ``softmax(W h)`` (the paper's projection of a thought onto the vocabulary).
    """

    mode: LatentMode | None = "fixed"
    thoughts: int | None = None
    max_thoughts: int | None = None
    threshold: float | None = None
    trace_top_k: int = 0

    def __post_init__(self) -> None:
        if self.mode is None:
            if self.thoughts is not None:
                object.__setattr__(self, "mode", "fixed")
            elif self.max_thoughts is not None or self.threshold is not None:
                object.__setattr__(self, "mode", "auto")
        _check(self.mode is None or self.mode in LATENT_MODES, "latent.mode", self.mode,
               f"one of {LATENT_MODES}")
        _check(self.thoughts is None or (isinstance(self.thoughts, int)
                                         and MIN_THOUGHTS <= self.thoughts <= MAX_THOUGHTS_CEILING),
               "latent.thoughts", self.thoughts,
               f"null or an integer in [{MIN_THOUGHTS}, {MAX_THOUGHTS_CEILING}]")
        _check(self.max_thoughts is None or (isinstance(self.max_thoughts, int)
                                             and MIN_MAX_THOUGHTS <= self.max_thoughts <= MAX_THOUGHTS_CEILING),
               "latent.max_thoughts", self.max_thoughts,
               f"null or an integer in [{MIN_MAX_THOUGHTS}, {MAX_THOUGHTS_CEILING}]")
        _check(self.threshold is None or (isinstance(self.threshold, (int, float))
                                          and MIN_THRESHOLD <= self.threshold <= MAX_THRESHOLD),
               "latent.threshold", self.threshold,
               f"null or a number in [{MIN_THRESHOLD:g}, {MAX_THRESHOLD:g}]")
        _check(isinstance(self.trace_top_k, int) and 0 <= self.trace_top_k <= MAX_TRACE_TOP_K,
               "latent.trace_top_k", self.trace_top_k, f"an integer in [0, {MAX_TRACE_TOP_K}]")
        if self.mode is None:
            return                    # the checkpoint's default mode, nothing else given
        if self.mode != "fixed" and self.thoughts is not None:
            raise ValueError(f"latent.thoughts is only meaningful with mode 'fixed', "
                             f"got mode {self.mode!r}")
        if self.mode != "auto" and (self.max_thoughts is not None or self.threshold is not None):
            raise ValueError(f"latent.max_thoughts and latent.threshold are only meaningful "
                             f"with mode 'auto', got mode {self.mode!r}")


def broadcast(value, n: int, name: str) -> list:
    """One value for all ``n`` questions, or a sequence of exactly ``n`` values."""
    if isinstance(value, (list, tuple)) and not isinstance(value, str):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} questions: "
                             f"give one value or one per question")
        return list(value)
    return [value] * n


@dataclass(frozen=True)
class ResolvedLatent:
    """A ``LatentPolicy`` with the checkpoint's defaults filled in (``CoconutConfig.resolve``).

    ``feed`` says what a thought is fed as: ``hidden`` (COCONUT: the last hidden state)
    or ``pause`` (the ``pause_as_thought`` ablation: the latent token's embedding).
    """

    mode: LatentMode
    feed: Literal["hidden", "pause"] = "hidden"
    thoughts: int = 0          # fixed: exact count; auto: the cap (max_thoughts)
    threshold: float = 0.5
    trace_top_k: int = 0

    @property
    def uses_markers(self) -> bool:
        return self.mode != "none"
