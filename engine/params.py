"""Per-request parameters: how to sample the answer and how to think before it.

Both are frozen dataclasses validated once, where a request enters (the Python API, the
HTTP layer or the CLI). A bad value raises ``ValueError`` naming the field, the value
and what was expected. Defaults that depend on the checkpoint (the number of thoughts,
the stop threshold) stay ``None`` here and are resolved by ``resolve_latent`` against
the checkpoint's ``coconut.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

LatentMode = Literal["fixed", "auto", "entropy", "token", "none"]
LATENT_MODES = ("fixed", "auto", "entropy", "token", "none")
#: The modes whose end is decided after each thought (so at least one thought is fed).
ADAPTIVE_MODES = ("auto", "entropy", "token")
FeedbackType = Literal["hidden", "projection", "soft_embedding"]
FEEDBACK_TYPES = ("hidden", "projection", "soft_embedding")

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
#: Alternatives per generated token (``SamplingParams.top_logprobs``): OpenAI's bound on chat's
#: ``top_logprobs`` (its /v1/completions ``logprobs`` stops at 5).
MAX_TOP_LOGPROBS = 20
#: Samples per request (``SamplingParams.n``): they share one prefill and one latent pass
#: (the engine also needs that many free batch slots at once: ``max_batch_size``).
MAX_SAMPLES = 64

#: Hard ceilings that protect the server from absurd requests; the per-model limit
#: (maximum sequence length) is checked separately when a request is added.
MAX_THOUGHTS_CEILING = 1024
MIN_THOUGHTS = 0                   # fixed mode: 0 thoughts is allowed (markers only)
MIN_MAX_THOUGHTS = 1               # auto mode's cap
MIN_THRESHOLD = 0.0
MAX_THRESHOLD = 1.0
MAX_TRACE_TOP_K = 50
#: The entropy stop (``latent.mode: entropy``): nats of softmax(W h) over the vocabulary.
MIN_ENTROPY_THRESHOLD = 0.0
MAX_ENTROPY_THRESHOLD = 100.0
DEFAULT_ENTROPY_THRESHOLD = 0.01   # Soft Thinking's cold-stop threshold
DEFAULT_PATIENCE = 1
MAX_PATIENCE = MAX_THOUGHTS_CEILING
#: Soft-embedding feedback: softmax(W h / T) kept to its top-k, then top-p tokens.
DEFAULT_SOFT_TEMPERATURE = 1.0
DEFAULT_SOFT_TOP_K = 10
DEFAULT_SOFT_TOP_P = 1.0
MIN_SOFT_TEMPERATURE = 0.0         # exclusive
MAX_SOFT_TEMPERATURE = 100.0
#: Noise on a soft thought's weights (``latent.feedback.noise``, ``engine.noise``): Gumbel-Softmax's
#: temperature and the Dirichlet's concentration scale (Soft Thinking's defaults, 1 and 1).
NOISE_TYPES = ("gumbel", "dirichlet", "none")
DEFAULT_GUMBEL_TAU = 1.0
MIN_GUMBEL_TAU = 0.0               # exclusive
MAX_GUMBEL_TAU = 100.0
DEFAULT_DIRICHLET_ALPHA = 1.0
MIN_DIRICHLET_ALPHA = 0.0          # exclusive
MAX_DIRICHLET_ALPHA = 1e6
#: Mixture of Inputs (``mixture``, ``engine.moi``): the prior's tokens and the sample's weight
#: (mixinputs' defaults: vLLM's 20 logprobs, MIXINPUTS_BETA 1).
MIXTURE_TYPES = ("moi", "none")
DEFAULT_MOI_BETA = 1.0
MIN_MOI_BETA = 0.0
MAX_MOI_BETA = 100.0
DEFAULT_MOI_TOP_K = 20
MIN_MOI_TOP_K = 2                  # H(p) / log K needs K >= 2
MAX_MOI_TOP_K = 256
#: The HTTP API's ``latent_trace_top_k`` (used when ``return_latent_trace`` is true).
DEFAULT_TRACE_TOP_K = 5
MIN_TRACE_TOP_K = 1


def _check(condition: bool, name: str, value, expected: str) -> None:
    if not condition:
        raise ValueError(f"{name}={value!r} is invalid: expected {expected}")


@dataclass(frozen=True)
class InputMixture:
    """Mixture of Inputs (Zhuang et al. 2025), a language-mode operator (``engine.moi``):
    after each sampled answer token ``y`` the next input is
    ``Hn * sum_i w_i E[i] + (1 - Hn) * E[y]`` over the ``top_k`` most likely tokens of the
    distribution ``y`` was drawn from (``p`` renormalised over them),
    ``w = (p + beta * [i == y]) / (1 + beta)``, ``Hn = H(p) / log top_k``. ``type`` ``none``
    asks for plain token inputs (over a server's default mixture)."""

    type: Literal["moi", "none"] = "moi"
    beta: float | None = None
    top_k: int | None = None

    def __post_init__(self) -> None:
        _check(self.type in MIXTURE_TYPES, "mixture.type", self.type, f"one of {MIXTURE_TYPES}")
        _check(self.beta is None or (_is_number(self.beta) and MIN_MOI_BETA <= self.beta <= MAX_MOI_BETA),
               "mixture.beta", self.beta, f"null or a number in [{MIN_MOI_BETA:g}, {MAX_MOI_BETA:g}]")
        _check(self.top_k is None or (_is_int(self.top_k) and MIN_MOI_TOP_K <= self.top_k <= MAX_MOI_TOP_K),
               "mixture.top_k", self.top_k, f"null or an integer in [{MIN_MOI_TOP_K}, {MAX_MOI_TOP_K}]")
        if self.type == "none" and (self.beta is not None or self.top_k is not None):
            raise ValueError("mixture.beta and mixture.top_k are only meaningful with type 'moi', got type 'none'")
        if self.type == "moi":
            object.__setattr__(self, "beta", DEFAULT_MOI_BETA if self.beta is None else float(self.beta))
            object.__setattr__(self, "top_k", DEFAULT_MOI_TOP_K if self.top_k is None else self.top_k)

    @property
    def active(self) -> bool:
        return self.type == "moi"


@dataclass(frozen=True)
class SamplingParams:
    """How language tokens are chosen.

    ``temperature == 0`` (or below ``GREEDY_TEMPERATURE``) is greedy decoding (argmax). ``top_k == 0`` and ``top_p == 1``
    disable those filters. A ``seed`` gives the request its own random generator, so its
    output does not depend on what else shares the batch. ``stop`` strings end the
    answer and are not part of it; ``stop_token_ids`` do the same on token ids.
    ``logprobs`` asks for the log-probability of each chosen token under the model's
    unmodified distribution (before temperature, top-k and top-p), as vLLM reports it;
    ``top_logprobs`` (with ``logprobs``) for the ``top_logprobs`` most likely tokens of that
    same distribution at each position, with theirs (0: none). ``n`` > 1 asks for ``n``
    answers to the same prompt: it is prefilled once, the latent thoughts (deterministic
    for every feedback operator) are computed once, and the answers fork from them;
    answer ``i`` samples with ``seed + i`` (``for_sample(i)``). Noisy soft thoughts
    (``LatentFeedback.noise``) draw from that same generator, so the answers then fork at
    their first thought instead. ``mixture`` feeds each sampled token back as a Mixture of
    Inputs (``InputMixture``; None: the token's embedding).
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
    top_logprobs: int = 0
    n: int = 1
    mixture: InputMixture | None = None

    def __post_init__(self) -> None:
        if isinstance(self.mixture, dict):
            object.__setattr__(self, "mixture", InputMixture(**self.mixture))
        _check(self.mixture is None or isinstance(self.mixture, InputMixture), "mixture", self.mixture,
               'null or a mixture object ({"type": "moi", "beta": B, "top_k": K})')
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _check(_is_int(self.max_tokens) and self.max_tokens >= MIN_MAX_TOKENS,
               "max_tokens", self.max_tokens, f"an integer >= {MIN_MAX_TOKENS}")
        _check(isinstance(self.temperature, (int, float))
               and MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE,
               "temperature", self.temperature,
               f"a number in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}] (0 = greedy)")
        _check(isinstance(self.top_p, (int, float)) and MIN_TOP_P < self.top_p <= MAX_TOP_P,
               "top_p", self.top_p, f"a number in ({MIN_TOP_P:g}, {MAX_TOP_P:g}]")
        _check(_is_int(self.top_k) and self.top_k >= MIN_TOP_K,
               "top_k", self.top_k, f"an integer >= {MIN_TOP_K} (0 = disabled)")
        _check(self.seed is None or (_is_int(self.seed) and 0 <= self.seed < SEED_LIMIT),
               "seed", self.seed, f"null or an integer in [0, 2**{SEED_BITS})")
        _check(all(isinstance(s, str) and len(s) >= MIN_STOP_LENGTH for s in self.stop),
               "stop", self.stop, "non-empty strings")
        _check(len(self.stop) <= MAX_STOP_STRINGS, "stop", self.stop,
               f"at most {MAX_STOP_STRINGS} stop strings")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids", self.stop_token_ids, "non-negative integers")
        _check(_is_int(self.top_logprobs) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
               "top_logprobs", self.top_logprobs, f"an integer in [0, {MAX_TOP_LOGPROBS}]")
        _check(_is_int(self.n) and 1 <= self.n <= MAX_SAMPLES, "n", self.n,
               f"an integer in [1, {MAX_SAMPLES}] (answers per prompt)")
        _check(self.seed is None or self.seed + self.n - 1 < SEED_LIMIT, "seed", self.seed,
               f"a seed with seed + n - 1 < 2**{SEED_BITS} (answer i samples with seed + i)")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=True (the alternatives come with the chosen "
                             "token's log-probability)")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def for_sample(self, index: int) -> "SamplingParams":
        """The parameters of answer ``index`` of ``n``: one answer, seed ``seed + index``."""
        seed = None if self.seed is None else self.seed + index
        return replace(self, n=1, seed=seed)


@dataclass(frozen=True)
class FeedbackNoise:
    """Randomness in a soft thought (``engine.noise``): the kept, renormalised weights ``p``
    of the mixture become ``softmax((log p_i + g_i) / tau)`` with ``g_i ~ Gumbel(0, 1)``
    (``gumbel``, Gumbel-Softmax as in arXiv 2508.03440), or a draw of
    ``Dirichlet(alpha * p)`` (``dirichlet``, as Soft Thinking's code draws it). ``none``
    asks for noiseless thoughts (over a server's default noise)."""

    type: Literal["gumbel", "dirichlet", "none"]
    tau: float | None = None
    alpha: float | None = None

    def __post_init__(self) -> None:
        _check(self.type in NOISE_TYPES, "latent.feedback.noise.type", self.type, f"one of {NOISE_TYPES}")
        _check(self.tau is None or (_is_number(self.tau) and MIN_GUMBEL_TAU < self.tau <= MAX_GUMBEL_TAU),
               "latent.feedback.noise.tau", self.tau, f"null or a number in ({MIN_GUMBEL_TAU:g}, {MAX_GUMBEL_TAU:g}]")
        _check(self.alpha is None or (_is_number(self.alpha)
                                      and MIN_DIRICHLET_ALPHA < self.alpha <= MAX_DIRICHLET_ALPHA),
               "latent.feedback.noise.alpha", self.alpha,
               f"null or a number in ({MIN_DIRICHLET_ALPHA:g}, {MAX_DIRICHLET_ALPHA:g}]")
        if self.type != "gumbel" and self.tau is not None:
            raise ValueError(f"latent.feedback.noise.tau is only meaningful with type 'gumbel', got type {self.type!r}")
        if self.type != "dirichlet" and self.alpha is not None:
            raise ValueError(f"latent.feedback.noise.alpha is only meaningful with type 'dirichlet', "
                             f"got type {self.type!r}")
        if self.type == "gumbel":
            object.__setattr__(self, "tau", DEFAULT_GUMBEL_TAU if self.tau is None else float(self.tau))
        if self.type == "dirichlet":
            object.__setattr__(self, "alpha", DEFAULT_DIRICHLET_ALPHA if self.alpha is None else float(self.alpha))

    @property
    def active(self) -> bool:
        return self.type != "none"


@dataclass(frozen=True)
class LatentFeedback:
    """What a continuous thought feeds back: an operator on the state ``h`` that the
    previous position produced (after the final norm).

    - ``hidden``: ``h`` itself (COCONUT).
    - ``projection``: ``prj(h)``, the checkpoint's learned projection (CODI); only a
      checkpoint that ships one (``coconut.json: latent_feedback``) can use it.
    - ``soft_embedding``: ``sum_i p_i E[i]`` over the input embedding matrix ``E``, with
      ``p = softmax(W h / temperature)`` kept to its ``top_k`` tokens (0: all), then to the
      smallest set whose mass reaches ``top_p``, renormalised (Soft Thinking).

    ``temperature``, ``top_k``, ``top_p`` and ``noise`` (``FeedbackNoise``: random weights;
    None: none, or the engine's default) belong to ``soft_embedding`` alone; ``None``
    is the default (1, 10, 1). ``file`` names the projection's weights in a checkpoint's
    ``coconut.json``; a request never gives it.
    """

    type: FeedbackType = "hidden"
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    file: str | None = None
    noise: FeedbackNoise | None = None

    def __post_init__(self) -> None:
        if isinstance(self.noise, dict):
            object.__setattr__(self, "noise", FeedbackNoise(**self.noise))
        _check(self.noise is None or isinstance(self.noise, FeedbackNoise), "latent.feedback.noise", self.noise,
               'null or a noise object ({"type": "gumbel", "tau": T} or {"type": "dirichlet", "alpha": A})')
        _check(self.type in FEEDBACK_TYPES, "latent.feedback.type", self.type, f"one of {FEEDBACK_TYPES}")
        _check(self.temperature is None or (_is_number(self.temperature)
                                            and MIN_SOFT_TEMPERATURE < self.temperature <= MAX_SOFT_TEMPERATURE),
               "latent.feedback.temperature", self.temperature,
               f"null or a number in ({MIN_SOFT_TEMPERATURE:g}, {MAX_SOFT_TEMPERATURE:g}]")
        _check(self.top_k is None or (_is_int(self.top_k) and self.top_k >= 0),
               "latent.feedback.top_k", self.top_k, "null or an integer >= 0 (0 = the whole vocabulary)")
        _check(self.top_p is None or (_is_number(self.top_p) and MIN_TOP_P < self.top_p <= MAX_TOP_P),
               "latent.feedback.top_p", self.top_p, f"null or a number in ({MIN_TOP_P:g}, {MAX_TOP_P:g}]")
        given = [name for name in ("temperature", "top_k", "top_p", "noise") if getattr(self, name) is not None]
        if self.type != "soft_embedding" and given:
            raise ValueError(f"latent.feedback.{given[0]} is only meaningful with type 'soft_embedding', "
                             f"got type {self.type!r}")
        if self.type != "projection" and self.file is not None:
            raise ValueError(f"latent.feedback.file is only meaningful with type 'projection', "
                             f"got type {self.type!r}")

    def resolved(self) -> "LatentFeedback":
        """Defaults filled in (soft embedding's temperature, top_k and top_p)."""
        if self.type != "soft_embedding":
            return self
        return LatentFeedback("soft_embedding",
                              DEFAULT_SOFT_TEMPERATURE if self.temperature is None else float(self.temperature),
                              DEFAULT_SOFT_TOP_K if self.top_k is None else self.top_k,
                              DEFAULT_SOFT_TOP_P if self.top_p is None else float(self.top_p),
                              noise=self.noise)

    @property
    def is_identity(self) -> bool:
        return self.type == "hidden"

    @property
    def random(self) -> bool:
        """The thoughts it makes are random draws (a soft embedding with active noise)."""
        return self.noise is not None and self.noise.active


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class LatentPolicy:
    """How many continuous thoughts to spend before answering, and what they feed back.

    - ``fixed``: exactly ``thoughts`` thoughts (``None``: the checkpoint's default).
    - ``auto``: after each thought the checkpoint's stop classifier reads the hidden
      state; a stop probability >= ``threshold`` ends latent mode; ``max_thoughts``
      caps it. ``None`` values take the checkpoint's defaults.
    - ``entropy``: after each thought, the entropy (nats) of ``softmax(W h)`` of the state
      that thought produced; latent mode ends once it has been below
      ``entropy_threshold`` for ``patience`` thoughts in a row, or at ``max_thoughts``.
    - ``token``: latent mode ends when the argmax of ``W h`` is the checkpoint's end token
      (``eot_token``), or at ``max_thoughts``.
    - ``none``: no ``<bot>``/``<eot>`` markers and no thoughts (CoT / no-CoT models).
    - ``mode=None`` (what the HTTP API sends when ``latent.mode`` is unset): the fields
      given imply it (``thoughts``: fixed; ``max_thoughts`` / ``threshold``: auto;
      ``entropy_threshold`` / ``patience``: entropy), else ``CoconutConfig.resolve`` takes
      the checkpoint's default mode. ``max_thoughts`` alone caps the checkpoint's default
      mode instead when that is entropy or token (``mode_inferred``).

    ``auto``, ``entropy`` and ``token`` check after each thought, so at least one is fed.
    ``feedback`` overrides the checkpoint's feedback operator (``hidden`` or
    ``soft_embedding``; ``projection`` only where the checkpoint has one).
    ``trace_top_k > 0`` records, for every thought, the top-k tokens of
    ``softmax(W h)`` (the paper's projection of a thought onto the vocabulary).
    """

    mode: LatentMode | None = "fixed"
    thoughts: int | None = None
    max_thoughts: int | None = None
    threshold: float | None = None
    trace_top_k: int = 0
    entropy_threshold: float | None = None
    patience: int | None = None
    feedback: LatentFeedback | None = None
    #: the mode was implied by the fields given, not named
    mode_inferred: bool = field(default=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.feedback, dict):
            object.__setattr__(self, "feedback", LatentFeedback(**self.feedback))
        if self.mode is None:
            implied = None
            if self.thoughts is not None:
                implied = "fixed"
            elif self.entropy_threshold is not None or self.patience is not None:
                implied = "entropy"
            elif self.max_thoughts is not None or self.threshold is not None:
                implied = "auto"
            if implied is not None:
                object.__setattr__(self, "mode", implied)
                object.__setattr__(self, "mode_inferred", True)
        _check(self.mode is None or self.mode in LATENT_MODES, "latent.mode", self.mode,
               f"one of {LATENT_MODES}")
        _check(self.thoughts is None or (_is_int(self.thoughts)
                                         and MIN_THOUGHTS <= self.thoughts <= MAX_THOUGHTS_CEILING),
               "latent.thoughts", self.thoughts,
               f"null or an integer in [{MIN_THOUGHTS}, {MAX_THOUGHTS_CEILING}]")
        _check(self.max_thoughts is None or (_is_int(self.max_thoughts)
                                             and MIN_MAX_THOUGHTS <= self.max_thoughts <= MAX_THOUGHTS_CEILING),
               "latent.max_thoughts", self.max_thoughts,
               f"null or an integer in [{MIN_MAX_THOUGHTS}, {MAX_THOUGHTS_CEILING}]")
        _check(self.threshold is None or (_is_number(self.threshold)
                                          and MIN_THRESHOLD <= self.threshold <= MAX_THRESHOLD),
               "latent.threshold", self.threshold,
               f"null or a number in [{MIN_THRESHOLD:g}, {MAX_THRESHOLD:g}]")
        _check(self.entropy_threshold is None or (_is_number(self.entropy_threshold) and MIN_ENTROPY_THRESHOLD
                                                  <= self.entropy_threshold <= MAX_ENTROPY_THRESHOLD),
               "latent.entropy_threshold", self.entropy_threshold,
               f"null or a number of nats in [{MIN_ENTROPY_THRESHOLD:g}, {MAX_ENTROPY_THRESHOLD:g}]")
        _check(self.patience is None or (_is_int(self.patience) and 1 <= self.patience <= MAX_PATIENCE),
               "latent.patience", self.patience, f"null or an integer in [1, {MAX_PATIENCE}]")
        _check(_is_int(self.trace_top_k) and 0 <= self.trace_top_k <= MAX_TRACE_TOP_K,
               "latent.trace_top_k", self.trace_top_k, f"an integer in [0, {MAX_TRACE_TOP_K}]")
        _check(self.feedback is None or isinstance(self.feedback, LatentFeedback), "latent.feedback",
               self.feedback, "null or a feedback object ({\"type\": \"hidden\" | \"soft_embedding\" | \"projection\"})")
        if self.feedback is not None and self.feedback.file is not None:
            raise ValueError("latent.feedback.file is the checkpoint's (coconut.json); a request cannot give it")
        if self.mode is None:
            return                    # the checkpoint's default mode
        if self.mode != "fixed" and self.thoughts is not None:
            raise ValueError(f"latent.thoughts is only meaningful with mode 'fixed', "
                             f"got mode {self.mode!r}")
        if self.mode not in ADAPTIVE_MODES and self.max_thoughts is not None:
            raise ValueError(f"latent.max_thoughts is only meaningful with modes {ADAPTIVE_MODES}, "
                             f"got mode {self.mode!r}")
        if self.mode != "auto" and self.threshold is not None:
            raise ValueError(f"latent.threshold is only meaningful with mode 'auto' "
                             f"(the entropy rule's is entropy_threshold), got mode {self.mode!r}")
        if self.mode != "entropy" and (self.entropy_threshold is not None or self.patience is not None):
            raise ValueError(f"latent.entropy_threshold and latent.patience are only meaningful "
                             f"with mode 'entropy', got mode {self.mode!r}")
        if self.mode == "none" and self.feedback is not None:
            raise ValueError("latent.feedback is only meaningful when the request thinks; got mode 'none'")


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

    ``feed`` says what a thought is fed as: ``hidden`` (a continuous thought, made by
    ``feedback`` from the last hidden state) or ``pause`` (the ``pause_as_thought``
    ablation: the latent token's embedding). ``thoughts`` is the exact count (fixed) or
    the cap (auto, entropy, token).
    """

    mode: LatentMode
    feed: Literal["hidden", "pause"] = "hidden"
    thoughts: int = 0
    threshold: float = 0.5
    trace_top_k: int = 0
    entropy_threshold: float = DEFAULT_ENTROPY_THRESHOLD
    patience: int = DEFAULT_PATIENCE
    feedback: LatentFeedback = LatentFeedback()

    @property
    def uses_markers(self) -> bool:
        return self.mode != "none"

    @property
    def adaptive(self) -> bool:
        """The end is decided after each thought (auto, entropy, token)."""
        return self.mode in ADAPTIVE_MODES


def with_noise(resolved: ResolvedLatent, asked: FeedbackNoise | None,
               default: FeedbackNoise | None) -> ResolvedLatent:
    """The resolved policy with the noise of its soft thoughts: the request's (``asked``),
    else the engine's ``default``; ``none`` (or no soft thoughts to put a default on) leaves
    the thoughts noiseless. Noise the request asks for needs soft thoughts."""
    feedback = resolved.feedback
    soft = resolved.mode != "none" and resolved.feed == "hidden" and feedback.type == "soft_embedding"
    if asked is not None and not soft and asked.active:
        raise ValueError(f"latent.feedback.noise needs soft thoughts (type 'soft_embedding'); this request's "
                         f"thoughts are {resolved.feed if resolved.feed == 'pause' else feedback.type!r}")
    noise = asked if asked is not None else default
    if not soft or noise is None or not noise.active:
        return resolved if feedback.noise is None else replace(resolved, feedback=replace(feedback, noise=None))
    return replace(resolved, feedback=replace(feedback, noise=noise))


def with_default_mixture(sampling: SamplingParams, default: InputMixture | None) -> SamplingParams:
    """The sampling parameters with their Mixture of Inputs: the request's, else ``default``;
    ``none`` is no mixture (``mixture`` None)."""
    mixture = sampling.mixture if sampling.mixture is not None else default
    if mixture is not None and not mixture.active:
        mixture = None
    return sampling if mixture is sampling.mixture else replace(sampling, mixture=mixture)
