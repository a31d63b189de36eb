"""Per-request parameters: how to sample the answer and how to think before it.

Both are frozen dataclasses validated once, where a request enters (the Python API, the
HTTP layer or the CLI). A bad value raises ``ValueError`` naming the field, the value
and what was expected. Defaults that depend on the checkpoint (the number of thoughts,
the stop threshold) stay ``None`` here and are resolved by ``resolve_latent`` against
the checkpoint's ``coconut.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

LatentMode = Literal["fixed", "auto", "none"]
LATENT_MODES = ("fixed", "auto", "none")

#: Temperatures below this are greedy: dividing logits by a smaller one overflows float32
#: (vLLM uses the same cut-off).
GREEDY_TEMPERATURE = 1e-5

#: Hard ceilings that protect the server from absurd requests; the per-model limit
#: (maximum sequence length) is checked separately when a request is added.
MAX_THOUGHTS_CEILING = 1024
MAX_TRACE_TOP_K = 50


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

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
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
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1,
               "max_tokens", self.max_tokens, "an integer >= 1")
        _check(isinstance(self.temperature, (int, float)) and 0.0 <= self.temperature <= 100.0,
               "temperature", self.temperature, "a number in [0, 100] (0 = greedy)")
        _check(isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0,
               "top_p", self.top_p, "a number in (0, 1]")
        _check(isinstance(self.top_k, int) and self.top_k >= 0,
               "top_k", self.top_k, "an integer >= 0 (0 = disabled)")
        _check(self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63),
               "seed", self.seed, "null or an integer in [0, 2**63)")
        _check(all(isinstance(s, str) and s for s in self.stop),
               "stop", self.stop, "non-empty strings")
        _check(len(self.stop) <= 16, "stop", self.stop, "at most 16 stop strings")
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

    ``trace_top_k > 0`` records, for every thought, the top-k tokens of
    ``softmax(W h)`` (the paper's projection of a thought onto the vocabulary).
    """

    mode: LatentMode = "fixed"
    thoughts: int | None = None
    max_thoughts: int | None = None
    threshold: float | None = None
    trace_top_k: int = 0

    def __post_init__(self) -> None:
        _check(self.mode in LATENT_MODES, "latent.mode", self.mode, f"one of {LATENT_MODES}")
        _check(self.thoughts is None or (isinstance(self.thoughts, int)
                                         and 0 <= self.thoughts <= MAX_THOUGHTS_CEILING),
               "latent.thoughts", self.thoughts, f"null or an integer in [0, {MAX_THOUGHTS_CEILING}]")
        _check(self.max_thoughts is None or (isinstance(self.max_thoughts, int)
                                             and 1 <= self.max_thoughts <= MAX_THOUGHTS_CEILING),
               "latent.max_thoughts", self.max_thoughts,
               f"null or an integer in [1, {MAX_THOUGHTS_CEILING}]")
        _check(self.threshold is None or (isinstance(self.threshold, (int, float))
                                          and 0.0 <= self.threshold <= 1.0),
               "latent.threshold", self.threshold, "null or a number in [0, 1]")
        _check(isinstance(self.trace_top_k, int) and 0 <= self.trace_top_k <= MAX_TRACE_TOP_K,
               "latent.trace_top_k", self.trace_top_k, f"an integer in [0, {MAX_TRACE_TOP_K}]")
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
