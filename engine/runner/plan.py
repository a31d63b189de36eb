"""The contract between the scheduler and the model runner: plain data, no tensors.

A ``StepPlan`` says what one engine step computes; the runner answers with one
``RowOutput`` per row that produced something. Rows are named by request id and by the
KV-cache slot the scheduler gave the request at admission; the runner owns the slot
table (each slot's length and last hidden state) and the slot cache itself.

- ``DecodeRow``: one new position for a running request: the embedding of ``feed_token``,
  or, when it is None, the slot's continuous thought (its last hidden state, passed
  through the feedback operator of the row that produced it).
- ``PrefillChunk``: ``token_ids`` of a prompt written at positions ``start``...; a prompt
  longer than the step's budget comes in several chunks, and only the ``last`` one
  produces an output.
- ``released``: the slots of requests that ended since the last step, free from now on.
- ``forks``: slots that take a copy of another slot's first ``length`` positions (the
  answers of one prompt forking from the request that prefilled it and thought), before
  this step's forwards.
- ``prefix_copies``: the same kind of copy for a prompt whose first ``length`` tokens some
  slot already holds (``engine.prefix_cache``), after the fork copies; a copy whose source
  is its own slot only marks those positions as held. The request's first prefill chunk
  then starts at ``length``.

What a row's output holds is fixed by the plan: ``sampling`` set -> a sampled token (and
its log-probability, and its ``top_logprobs`` most likely alternatives', when asked);
``trace_top_k`` > 0 -> the thought's top tokens and the probabilities of
``watch_token_ids``; ``ask_stop`` -> the stop classifier's probability;
``ask_entropy`` -> the entropy and argmax of ``softmax(W h)``; ``feedback`` -> the slot's
next thought is made with that operator (and a traced row reports what it mixed), its noise
drawn from the generator of ``latent_seed`` when set; ``sampling.mixture`` -> the sampled
token's Mixture of Inputs is kept in the slot, which the next row fed with
``feed_mixture`` reads instead of the token's embedding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.params import LatentFeedback, SamplingParams


@dataclass(frozen=True, kw_only=True)
class RowWork:
    request_id: str
    slot: int
    sampling: SamplingParams | None = None   # language mode: sample the next token
    trace_top_k: int = 0
    watch_token_ids: tuple[int, ...] = ()
    ask_stop: bool = False
    # latent mode: the output state may be fed back as the next thought, through this
    # operator (None: as it is, or not at all)
    feedback: LatentFeedback | None = None
    ask_entropy: bool = False                # report softmax(W h)'s entropy and argmax
    # latent mode, a noisy feedback: the request's seed (its generator draws the noise)
    latent_seed: int | None = None

    @property
    def seed(self) -> int | None:
        return self.sampling.seed if self.sampling is not None else self.latent_seed


@dataclass(frozen=True, kw_only=True)
class DecodeRow(RowWork):
    feed_token: int | None                   # None: feed the slot's last hidden state
    # feed_token was sampled by a row with a Mixture of Inputs: feed the mixed input the
    # runner made for the slot instead of the token's embedding
    feed_mixture: bool = False


@dataclass(frozen=True, kw_only=True)
class PrefillChunk(RowWork):
    token_ids: tuple[int, ...]
    start: int
    last: bool


@dataclass(frozen=True)
class ReleasedSlot:
    request_id: str
    slot: int


@dataclass(frozen=True)
class ForkCopy:
    source_slot: int
    slot: int
    length: int          # positions 0..length-1 of source_slot are copied into slot


@dataclass
class StepPlan:
    decode: list[DecodeRow] = field(default_factory=list)
    prefill: list[PrefillChunk] = field(default_factory=list)
    released: list[ReleasedSlot] = field(default_factory=list)
    forks: list[ForkCopy] = field(default_factory=list)
    prefix_copies: list[ForkCopy] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not (self.decode or self.prefill or self.released or self.forks or self.prefix_copies)

    @property
    def rows_with_output(self) -> list[RowWork]:
        return list(self.decode) + [chunk for chunk in self.prefill if chunk.last]


@dataclass
class TraceEntry:
    """The paper's view of one continuous thought: top-k tokens of softmax(W h), its
    entropy (nats), and what was fed: ``feed_type`` (hidden, projection, soft_embedding)
    and, for a soft embedding, the tokens mixed and their weights."""

    token_ids: list[int]
    probs: list[float]
    watch_probs: list[float] | None = None   # the probabilities of the row's watch_token_ids
    entropy: float | None = None
    feed_type: str = "hidden"
    feed_token_ids: list[int] | None = None
    feed_weights: list[float] | None = None


@dataclass
class RowOutput:
    token_id: int | None = None
    logprob: float | None = None
    # sampling.top_logprobs > 0: (ids, logprobs) of the most likely tokens, best first
    top_logprobs: tuple[list[int], list[float]] | None = None
    stop_prob: float | None = None
    trace: TraceEntry | None = None
    entropy: float | None = None     # ask_entropy: nats of softmax(W h)
    argmax: int | None = None        # ask_entropy: argmax of W h
