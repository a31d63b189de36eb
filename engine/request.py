"""One request's state inside the engine core: token ids and counters, no text.

The status enum is ordered so that "finished" is one comparison::

    WAITING -> LATENT (thoughts remaining) -> DECODING -> FINISHED_*

A request in LATENT feeds a continuous thought made from the last hidden state of its
previous position; a request in DECODING feeds ``pending_token`` (the ``<eot>`` marker and
the checkpoint's ``latent_suffix_tokens`` one by one, then each sampled token). Token
lists change only through methods. Timestamps are ``time.perf_counter()`` values.

Several answers to one prompt (``SamplingParams.n`` > 1) are one *leader* request whose
``forks`` are the other answers (``index`` 1..n-1, ids ``<leader id>#<index>``). Only the
leader is prefilled and thinks; when its latent mode ends (or, for a prompt that starts in
language, once it is prefilled) each fork takes a copy of its cache columns and its
thoughts (``fork_from``) and decodes on its own. When the thoughts are random (noisy soft
thoughts, ``thinks_randomly``) the forks take the prompt but its last token (``<bot>``)
once the leader is prefilled, feed that token themselves and think their own thoughts.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass, field

from engine.params import ResolvedLatent, SamplingParams
from engine.runner.plan import TraceEntry


class RequestStatus(enum.IntEnum):
    WAITING = 0
    LATENT = 1
    DECODING = 2
    FINISHED_STOP = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOP

    @property
    def finish_reason(self) -> str | None:
        return {RequestStatus.FINISHED_STOP: "stop", RequestStatus.FINISHED_LENGTH: "length",
                RequestStatus.FINISHED_ABORTED: "abort", RequestStatus.FINISHED_ERROR: "error"}.get(self)


@dataclass
class RequestTimes:
    arrival: float = field(default_factory=time.perf_counter)
    scheduled: float | None = None       # admitted into the batch (prefill starts)
    prefilled: float | None = None       # prefill forward done
    latent_done: float | None = None     # <eot> about to be fed (latent phase over)
    first_token: float | None = None
    finished: float | None = None

    def phases(self) -> dict[str, float]:
        """Seconds spent waiting, prefilling, thinking and decoding."""
        def span(a, b):
            return max(0.0, b - a) if a is not None and b is not None else 0.0
        end = self.finished or time.perf_counter()
        latent_end = self.latent_done or self.prefilled
        return {"queue": span(self.arrival, self.scheduled),
                "prefill": span(self.scheduled, self.prefilled),
                "latent": span(self.prefilled, latent_end),
                "decode": span(latent_end, end),
                "total": span(self.arrival, end)}


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                 latent: ResolvedLatent, eot_token_id: int, *, starts_in_language: bool,
                 watch_token_ids: list[int] | None = None, graph=None,
                 renamed_tokens: dict[int, str] | None = None, latent_suffix_ids: tuple[int, ...] = ()):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling = sampling
        self.latent = latent
        self.eot_token_id = eot_token_id
        self.latent_suffix_ids = tuple(latent_suffix_ids)   # fed after <eot>, before sampling
        self.forced_tokens: deque[int] = deque()             # what is left of them
        self.low_entropy_run = 0     # entropy mode: thoughts in a row below the threshold
        # True when the prompt already ends in language mode (mode none, pause thoughts,
        # or zero thoughts): the prefill's logits give the first answer token.
        self.starts_in_language = starts_in_language
        # tokens whose probability every traced thought reports (a graph question's nodes),
        # and that graph (an engine.data.question.QuestionGraph) for the trace's frontier view
        self.watch_token_ids = list(watch_token_ids or [])
        self.graph = graph
        # a symbols model: symbol token id -> the question's word, for the output text
        self.renamed_tokens = renamed_tokens
        self.graph_hops: dict[str, int] | None = None
        if graph is not None:
            from engine.data.question import hop_distances

            self.graph_hops = hop_distances(graph)
        self.status = RequestStatus.WAITING
        self.thoughts_done = 0
        self.output_token_ids: list[int] = []
        self.output_logprobs: list[float] = []
        # sampling.top_logprobs > 0: per generated token, (id, logprob) of the most likely tokens
        self.output_top_logprobs: list[list[tuple[int, float]]] = []
        self.trace: list[TraceEntry] = []
        self.stop_probs: list[float] = []
        self.pending_token: int | None = None
        self.pending_is_sampled = False           # pending_token was sampled (not forced)
        self.slot: int | None = None          # KV-cache slot, given by the scheduler at admission
        self.prefilled_tokens = 0                # prompt tokens written into the slot so far
        self.cached_prompt_tokens = 0            # of those, taken from the prefix cache (not computed)
        self.times = RequestTimes()
        self.error: str | None = None
        self.index = 0                            # which answer of the prompt's n this is
        self.forks: list[Request] = []            # a leader's other answers (SamplingParams.n > 1)
        self.forked = False                       # the forks have taken the leader's state

    @property
    def members(self) -> list["Request"]:
        """This request and its forks: every answer to the prompt, in index order."""
        return [self, *self.forks]

    def add_forks(self, samplings: list[SamplingParams]) -> None:
        """Make the other answers of the prompt, one per ``SamplingParams``."""
        for index, sampling in enumerate(samplings, 1):
            fork = Request(f"{self.request_id}#{index}", self.prompt_token_ids, sampling, self.latent,
                           self.eot_token_id, starts_in_language=self.starts_in_language,
                           watch_token_ids=self.watch_token_ids, graph=self.graph,
                           renamed_tokens=self.renamed_tokens, latent_suffix_ids=self.latent_suffix_ids)
            fork.index = index
            self.forks.append(fork)

    def fork_from(self, leader: "Request", refeed_token: int | None) -> None:
        """Take the leader's prompt and thoughts at the end of its latent mode (next: <eot>
        and the latent suffix), or, with ``refeed_token`` (a prompt that starts in language,
        or random thoughts: right after the leader's prefill), its prompt but the last token,
        which this request feeds itself, in the leader's mode."""
        self.prefilled_tokens = self.num_prompt_tokens
        self.thoughts_done = leader.thoughts_done
        self.trace = list(leader.trace)
        self.stop_probs = list(leader.stop_probs)
        self.times.scheduled, self.times.prefilled = leader.times.scheduled, leader.times.prefilled
        if refeed_token is not None:
            self.status = leader.status
            self.pending_token = refeed_token
        else:
            self.end_latent_mode()
            self.times.latent_done = leader.times.latent_done

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, {self.status.name}, prompt={len(self.prompt_token_ids)}, "
                f"thoughts={self.thoughts_done}/{self.latent.thoughts}, out={len(self.output_token_ids)})")

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def thinks_randomly(self) -> bool:
        """Its thoughts are random draws (noisy soft thoughts), so its answers fork at the first."""
        return not self.starts_in_language and self.latent.feed == "hidden" and self.latent.feedback.random

    @property
    def refeeding(self) -> bool:
        """In latent mode, the next position feeds a token (a fork's <bot>), not a thought."""
        return self.status == RequestStatus.LATENT and self.pending_token is not None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def max_positions(self) -> int:
        """The most cache positions this request can ever occupy (prompt, thoughts, <eot>,
        answer tokens except the last, which is never fed)."""
        latent = 0 if self.starts_in_language else self.latent.thoughts + 1 + len(self.latent_suffix_ids)
        return self.num_prompt_tokens + latent + self.sampling.max_tokens - 1

    def start(self) -> None:
        """Admitted into the batch: the prompt is about to be prefilled."""
        self.status = RequestStatus.DECODING if self.starts_in_language else RequestStatus.LATENT
        self.times.scheduled = time.perf_counter()

    def record_thought_fed(self) -> None:
        self.thoughts_done += 1

    @property
    def samples_next(self) -> bool:
        """In language mode, the next position's output is sampled (no forced tokens are
        left to feed before the answer)."""
        return self.status == RequestStatus.DECODING and not self.forced_tokens

    def feed_forced_token(self) -> None:
        self.pending_token = self.forced_tokens.popleft()
        self.pending_is_sampled = False

    def end_latent_mode(self) -> None:
        """Latent mode is over: feed <eot> (and the latent suffix) next, then decode language."""
        self.status = RequestStatus.DECODING
        self.pending_token = self.eot_token_id
        self.pending_is_sampled = False
        self.forced_tokens = deque(self.latent_suffix_ids)
        self.times.latent_done = time.perf_counter()

    def append_token(self, token_id: int, logprob: float | None,
                     top_logprobs: list[tuple[int, float]] | None = None) -> None:
        if not self.output_token_ids:
            self.times.first_token = time.perf_counter()
        self.output_token_ids.append(token_id)
        if logprob is not None:
            self.output_logprobs.append(logprob)
        if top_logprobs is not None:
            self.output_top_logprobs.append(top_logprobs)
        self.pending_token = token_id
        self.pending_is_sampled = True

    def finish(self, status: RequestStatus, error: str | None = None) -> None:
        assert status.finished
        self.status = status
        self.error = error
        self.pending_token = None
        self.times.finished = time.perf_counter()
