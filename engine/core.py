"""EngineCore: ``step()`` = schedule -> runner.execute -> update, on token ids only.

The core owns the scheduler and the model runner. It accepts ``Request`` objects whose
prompt is already tokenized, and each ``step()`` returns one ``CoreOutput`` per request
that changed: a new token, a thought, or the end. It knows nothing of text, HTTP or
asyncio; ``abort_request`` may be called from any thread (aborts are queued and drained
at the start of the next step, which frees the request's batch row before that step's
forward pass).

The latent state machine lives in ``_advance``: after the prefill (which fed
``<bot>``) and after each thought, a request in latent mode either feeds its newest
hidden state as the next thought (made by the request's feedback operator, in the
runner) or ends latent mode, which feeds ``<eot>`` and the checkpoint's latent suffix;
``fixed`` counts thoughts, ``auto`` asks the stop classifier's probability, ``entropy``
reads the entropy of ``softmax(W h)`` (below the threshold ``patience`` times in a row),
``token`` whether the argmax of ``W h`` is ``<eot>``.

The answers of one prompt (``SamplingParams.n`` > 1: a leader request and its ``forks``)
fork where the leader's latent mode ends, or right after the prefill of a prompt that
starts in language (the forks then feed the prompt's last token again, to get the logits
their first token is drawn from) or whose thoughts are random (noisy soft thoughts: the
forks feed ``<bot>`` again and draw their own first thought from its state): the scheduler
copies the leader's cached positions into the forks' slots. A leader that ends before that
(aborted, failed) ends its forks too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from engine.config import EngineConfig
from engine.prefill_pacer import PrefillPacer
from engine.request import Request, RequestStatus, TraceEntry
from engine.runner.model_runner import ModelRunner
from engine.runner.plan import RowOutput, StepPlan
from engine.scheduler import Scheduler

log = logging.getLogger(__name__)


class RequestTooLongError(ValueError):
    """The request can never fit in the model's (or the engine's) sequence limit."""


@dataclass
class CoreOutput:
    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[float] = field(default_factory=list)
    new_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    new_trace: list[TraceEntry] = field(default_factory=list)
    num_thoughts: int = 0
    finish_reason: str | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class StepStats:
    batch_size: int = 0        # rows in the mixed forward pass
    num_prefilled: int = 0     # requests whose prompt was prefilled this step
    num_running: int = 0
    num_waiting: int = 0
    early_stops: int = 0       # adaptive-policy requests (auto, entropy, token) ended before the cap
    cached_prompt_tokens: int = 0    # prompt tokens that admitted requests took from the prefix cache


class EngineCore:
    def __init__(self, runner: ModelRunner, config: EngineConfig, max_seq_len: int,
                 eos_token_ids: tuple[int, ...]):
        self.runner = runner
        self.config = config
        self.max_seq_len = max_seq_len   # resolved by the caller: the model's, the config's and the cache's limit
        self.eos_token_ids = frozenset(eos_token_ids)
        # a slot's last column is the decode forward's scratch: never part of a reused prefix
        self.scheduler = Scheduler(config.max_batch_size, config.max_prefill_tokens,
                                   prefix_positions=max_seq_len - 1 if config.prefix_caching else None)
        self.pacer = PrefillPacer(config.max_prefill_tokens, config.prefill_delay_factor)
        self._aborts: deque[tuple[str, RequestStatus]] = deque()
        self._lock = threading.Lock()
        self.last_stats = StepStats()

    # ---------------------------------------------------------------- requests

    def check_fits(self, request: Request) -> None:
        """Raise ``RequestTooLongError`` if the request can never fit the sequence limit
        (``ValueError`` if its answers need more batch slots than there are)."""
        answers = len(request.members)
        if answers > self.config.max_batch_size:
            raise ValueError(f"n={answers} answers need {answers} batch slots at once but the engine has "
                             f"max_batch_size {self.config.max_batch_size}; ask for at most "
                             f"{self.config.max_batch_size} answers")
        needed = request.max_positions
        if needed > self.max_seq_len:
            latent = 0 if request.starts_in_language else request.latent.thoughts + 1 + len(request.latent_suffix_ids)
            raise RequestTooLongError(
                f"request needs up to {needed} positions (prompt {request.num_prompt_tokens} tokens"
                f" + {latent} latent positions + max_tokens {request.sampling.max_tokens} - 1) but "
                f"the limit is {self.max_seq_len}; shorten the question, use fewer thoughts or "
                f"lower max_tokens")

    def add_request(self, request: Request) -> None:
        """Queue a request, or raise ``RequestTooLongError`` if it can never fit."""
        self.check_fits(request)
        self.scheduler.add(request)

    def abort_request(self, request_id: str, status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> None:
        """Thread-safe. ``status`` FINISHED_STOP ends a request normally (a stop string matched)."""
        with self._lock:
            self._aborts.append((request_id, status))

    def has_unfinished(self) -> bool:
        return bool(self._aborts) or self.scheduler.has_work()

    # ---------------------------------------------------------------- step

    def step(self) -> list[CoreOutput]:
        outputs = self._drain_aborts()
        plan = self.scheduler.schedule(self.pacer.budget(*self.scheduler.prefill_demand()))
        if plan.is_empty:
            self._record_stats(plan)
            return outputs
        try:
            rows = self.runner.execute(plan)
        except Exception as e:  # fail the affected requests, keep the engine alive
            running = list(self.scheduler.running.values())
            log.exception("engine step failed; failing %d requests", len(running))
            self.runner.reset()
            self.scheduler.forget_prefixes()
            message = f"{type(e).__name__}: {e}"
            for request in running:   # the cache's state is unknown: every running request ends
                for ended in [request, *self.scheduler.unforked(request)]:
                    ended.finish(RequestStatus.FINISHED_ERROR, error=message)
                    outputs.append(CoreOutput(ended.request_id, num_thoughts=ended.thoughts_done,
                                              finish_reason="error", error=message))
                self.scheduler.remove(request)
            self._record_stats(plan)
            return outputs
        timing = getattr(self.runner, "last_timing", None)    # test doubles of the runner have none
        if timing is not None:
            self.pacer.observe(*timing)
        early = 0
        prefilled = {chunk.request_id for chunk in plan.prefill if chunk.last}
        for row in plan.rows_with_output:
            request = self.scheduler.running[row.request_id]
            output, stopped_early = self._advance(request, rows[row.request_id],
                                                  prefilled=row.request_id in prefilled)
            early += stopped_early
            if output is not None:
                outputs.append(output)
        self._record_stats(plan, early)
        return outputs

    def _advance(self, request: Request, row: RowOutput, prefilled: bool) -> tuple[CoreOutput | None, bool]:
        """Apply one step's result to one request and decide what it feeds next. Returns
        its output (None when nothing visible changed) and whether the stop classifier
        ended its latent mode before the cap."""
        result = CoreOutput(request.request_id)
        early = False
        refed = request.refeeding               # a fork fed <bot>: its state makes its first thought
        if prefilled:
            request.times.prefilled = time.perf_counter()
            # fork before the first token is drawn, or before the first random thought
            if request.forks and (request.starts_in_language or request.thinks_randomly):
                self.scheduler.fork(request, request.num_prompt_tokens - 1, request.prompt_token_ids[-1])
        if request.status == RequestStatus.LATENT:
            if refed:
                request.pending_token = None
            elif not prefilled:
                request.record_thought_fed()
            if row.stop_prob is not None:
                request.stop_probs.append(row.stop_prob)
            if self._wants_another_thought(request, row):
                if row.trace is not None:  # this hidden state becomes the next thought
                    request.trace.append(row.trace)
                    result.new_trace.append(row.trace)
            else:
                if request.latent.adaptive and request.thoughts_done < request.latent.thoughts:
                    early = True
                request.end_latent_mode()
                if request.forks and not request.forked:   # the answers fork from the prompt and the thoughts
                    self.scheduler.fork(request, request.num_prompt_tokens + request.thoughts_done)
        elif request.status == RequestStatus.DECODING and row.token_id is None and request.forced_tokens:
            request.feed_forced_token()        # the latent suffix after <eot>: nothing sampled yet
        elif request.status == RequestStatus.DECODING:
            token = row.token_id
            assert token is not None
            sampling = request.sampling
            if (token in self.eos_token_ids and not sampling.ignore_eos) or token in sampling.stop_token_ids:
                request.finish(RequestStatus.FINISHED_STOP)
            else:
                top = list(zip(*row.top_logprobs)) if row.top_logprobs is not None else None
                request.append_token(token, row.logprob, top)
                result.new_token_ids.append(token)
                if row.logprob is not None:
                    result.new_logprobs.append(row.logprob)
                if top is not None:
                    result.new_top_logprobs.append(top)
                if len(request.output_token_ids) >= sampling.max_tokens:
                    request.finish(RequestStatus.FINISHED_LENGTH)
        result.num_thoughts = request.thoughts_done
        if request.is_finished:
            result.finish_reason = request.status.finish_reason
            self.scheduler.remove(request)
        changed = result.new_token_ids or result.new_trace or result.finished
        return (result if changed else None), early

    @staticmethod
    def _wants_another_thought(request: Request, row: RowOutput) -> bool:
        """After the state ``row`` produced: feed it as another thought? The adaptive modes
        read the state after each thought (not the one at <bot>), so at least one is fed."""
        done, latent = request.thoughts_done, request.latent
        if done >= latent.thoughts:
            return False
        if done == 0 or latent.mode == "fixed":
            return True
        if latent.mode == "auto":
            return row.stop_prob is not None and row.stop_prob < latent.threshold
        if latent.mode == "entropy":
            assert row.entropy is not None
            request.low_entropy_run = request.low_entropy_run + 1 if row.entropy < latent.entropy_threshold else 0
            return request.low_entropy_run < latent.patience
        if latent.mode == "token":
            assert row.argmax is not None
            return row.argmax != request.eot_token_id
        return True

    def _drain_aborts(self) -> list[CoreOutput]:
        outputs = []
        with self._lock:
            pending = list(self._aborts)
            self._aborts.clear()
        for request_id, status in pending:
            request = self.scheduler.find(request_id)
            if request is None or request.is_finished:
                continue
            # a leader whose answers have not forked takes them along (they need its thoughts)
            for ended in [request, *self.scheduler.unforked(request)]:
                ended.finish(status)
                outputs.append(CoreOutput(ended.request_id, num_thoughts=ended.thoughts_done,
                                          finish_reason=status.finish_reason))
            self.scheduler.remove(request)
        return outputs

    def _record_stats(self, plan: StepPlan, early: int = 0) -> None:
        self.last_stats = StepStats(batch_size=len(plan.decode),
                                    num_prefilled=sum(1 for chunk in plan.prefill if chunk.last),
                                    num_running=self.scheduler.num_running,
                                    num_waiting=self.scheduler.num_waiting, early_stops=early,
                                    cached_prompt_tokens=self.scheduler.cached_tokens)
