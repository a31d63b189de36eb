"""Scheduler: which requests wait, which run, and what each running request computes next.

First come, first served. The scheduler owns batch membership and the slot numbers: a
request admitted into the batch takes the lowest free KV-cache slot (``max_batch_size``
slots) and keeps it until it ends. Each step has a prefill budget of
``max_prefill_tokens`` prompt tokens: prompts already being prefilled continue first, then
waiting requests are admitted in arrival order while a slot is free and budget is left; a
prompt longer than what is left is prefilled in chunks over several steps, so a running
request never waits more than one budget's worth of prefill for its next token. The core
may lower a step's budget (``schedule(prefill_budget)``: ``engine.prefill_pacer`` bounds
the prefill's time while requests decode).

``schedule()`` returns a ``StepPlan`` (``engine.runner.plan``, plain data): one decode row
per running request whose prompt is in the cache (what it feeds and what its output must
hold, read off the request's state), this step's prompt chunks, and the slots freed since
the last step. Requests that finish or are aborted leave at once (``remove``); their slot
is released in the next plan. No tensors, no model.

A request with ``forks`` (the other answers of ``SamplingParams.n`` > 1) is admitted only
when a slot is free for each of its answers, and takes them all at once (so a fork never
waits for a slot); the forks join the running requests when the core calls ``fork``, which
puts the copy of the leader's cached positions into the next plan (``ForkCopy``).

With ``prefix_positions`` set (prefix caching on), a request admitted into the batch first
takes the longest prefix of its prompt that some slot holds (``engine.prefix_cache``: a
running request's, or an ended one's whose columns no forward has overwritten yet) as a
copy in the plan (``prefix_copies``), and its prefill starts after it. Copies run in plan
order before the forwards, so a slot that takes a copy from another slot in this plan is
never a source later in it; a slot admitted into without one still holds its old
columns until the forward, and may be.
"""

from __future__ import annotations

import heapq
from collections import deque

from engine.prefix_cache import MIN_REUSED_TOKENS, SlotPrefixes
from engine.request import Request, RequestStatus
from engine.runner.plan import DecodeRow, ForkCopy, PrefillChunk, ReleasedSlot, StepPlan


class Scheduler:
    def __init__(self, max_batch_size: int, max_prefill_tokens: int, prefix_positions: int | None = None,
                 min_reused_tokens: int = MIN_REUSED_TOKENS):
        """``prefix_positions``: reuse cached prompt prefixes of ``min_reused_tokens`` to
        this many positions (None: prefix caching off)."""
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Request] = deque()
        self.running: dict[str, Request] = {}        # admission order
        self._free_slots = list(range(max_batch_size))
        self._released: list[ReleasedSlot] = []
        self._reserved: dict[str, list[Request]] = {}    # admitted leader id -> forks holding a slot
        self._unforked: dict[str, Request] = {}          # fork id -> fork, until it forks or ends
        self._forks: list[ForkCopy] = []
        self.prefixes = SlotPrefixes(max_batch_size, prefix_positions) if prefix_positions else None
        self.min_reused_tokens = max(1, min_reused_tokens)
        self.cached_tokens = 0                        # prompt tokens reused by the last plan's admissions

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._released or self._forks)

    def add(self, request: Request) -> None:
        self.waiting.append(request)
        for fork in request.forks:
            self._unforked[fork.request_id] = fork

    def prefill_demand(self) -> tuple[int, int]:
        """(decode rows of the next plan, prompts it could prefill): running requests whose
        prompt is cached, and those still prefilling plus the waiting ones a free slot could
        take (``engine.prefill_pacer``'s ``decoding`` and ``waiting``)."""
        decoding = sum(1 for r in self.running.values() if r.prefilled_tokens == r.num_prompt_tokens)
        prefilling = len(self.running) - decoding
        return decoding, prefilling + min(len(self.waiting), len(self._free_slots))

    def schedule(self, prefill_budget: int | None = None) -> StepPlan:
        """The next step; ``prefill_budget`` lowers this step's prompt tokens below
        ``max_prefill_tokens`` (the prefill pacer's figure)."""
        plan = StepPlan(released=self._released, forks=self._forks)
        self._released, self._forks = [], []
        budget = self.max_prefill_tokens if prefill_budget is None else min(prefill_budget, self.max_prefill_tokens)
        self.cached_tokens = 0
        copied_into: set[int] = set()        # slots that take another's columns in this plan: no source
        for request in self.running.values():
            if request.prefilled_tokens == request.num_prompt_tokens:
                plan.decode.append(self._decode_row(request))
            elif budget > 0:
                budget -= self._add_chunk(plan, request, budget)
        while self.waiting and len(self._free_slots) >= len(self.waiting[0].members) and budget > 0:
            request = self.waiting.popleft()
            request.slot = heapq.heappop(self._free_slots)
            if request.forks:
                for fork in request.forks:
                    fork.slot = heapq.heappop(self._free_slots)
                self._reserved[request.request_id] = list(request.forks)
            request.start()
            self.running[request.request_id] = request
            if self.prefixes is not None:
                self._reuse_prefix(plan, request, copied_into)
            budget -= self._add_chunk(plan, request, budget)
        if self.prefixes is not None:        # what the slots hold once this plan has run
            for chunk in plan.prefill:
                self.prefixes.assign(chunk.slot, self.running[chunk.request_id].prompt_token_ids[
                    :chunk.start + len(chunk.token_ids)])
        return plan

    def _reuse_prefix(self, plan: StepPlan, request: Request, copied_into: set[int]) -> None:
        prompt = request.prompt_token_ids
        own = self.prefixes.held_length(request.slot, prompt)
        source, length = self.prefixes.match(prompt, exclude=copied_into)
        if length > own and length >= self.min_reused_tokens:
            plan.prefix_copies.append(ForkCopy(source, request.slot, length))
            copied_into.add(request.slot)
        elif own >= self.min_reused_tokens:
            length = own
            plan.prefix_copies.append(ForkCopy(request.slot, request.slot, own))
        else:
            return
        request.prefilled_tokens = request.cached_prompt_tokens = length
        self.cached_tokens += length

    def forget_prefixes(self) -> None:
        """The cache's content is unknown (a step failed): reuse nothing that is held now."""
        if self.prefixes is not None:
            self.prefixes.clear()

    def fork(self, leader: Request, length: int, refeed_token: int | None = None) -> None:
        """The leader's answers fork now (``Request.fork_from``): each fork that has not
        ended joins the running requests, its slot taking the leader's first ``length``
        positions in the next plan; the slots of forks that ended before are freed."""
        leader.forked = True
        for fork in self._reserved.pop(leader.request_id, []):
            self._unforked.pop(fork.request_id, None)
            if fork.is_finished:
                heapq.heappush(self._free_slots, fork.slot)
                continue
            fork.fork_from(leader, refeed_token)
            self.running[fork.request_id] = fork
            self._forks.append(ForkCopy(leader.slot, fork.slot, length))
            if self.prefixes is not None:
                self.prefixes.copy(leader.slot, fork.slot, length)

    def unforked(self, leader: Request) -> list[Request]:
        """The leader's forks that have not forked (nor ended) yet."""
        return [f for f in leader.forks if f.request_id in self._unforked and not f.is_finished]

    def remove(self, request: Request) -> None:
        """A request ended (finished, aborted or failed): free its slot (and, for a leader
        that ends before its answers forked, theirs; the core ends them)."""
        if request.request_id in self._unforked:     # a fork that ends before forking
            self._unforked.pop(request.request_id)   # (its slot is freed when its leader forks)
            return
        for fork in self._reserved.pop(request.request_id, []):
            heapq.heappush(self._free_slots, fork.slot)
        for fork in request.forks:
            self._unforked.pop(fork.request_id, None)
        if self.running.pop(request.request_id, None) is not None:
            self._released.append(ReleasedSlot(request.request_id, request.slot))
            heapq.heappush(self._free_slots, request.slot)
        else:
            try:
                self.waiting.remove(request)
            except ValueError:
                pass

    def find(self, request_id: str) -> Request | None:
        if request_id in self.running:
            return self.running[request_id]
        if request_id in self._unforked:
            return self._unforked[request_id]
        for r in self.waiting:
            if r.request_id == request_id:
                return r
        return None

    # ---------------------------------------------------------------- rows

    @staticmethod
    def _output_fields(request: Request, thoughts_after: int) -> dict:
        """What the output of the request's next position must hold, from its state
        (``thoughts_after``: the thoughts fed once this position is in)."""
        if request.status == RequestStatus.DECODING:
            return {"sampling": request.sampling} if request.samples_next else {}
        feedback = request.latent.feedback
        may_feed = thoughts_after < request.latent.thoughts and not feedback.is_identity
        return {"trace_top_k": request.latent.trace_top_k, "watch_token_ids": tuple(request.watch_token_ids),
                "feedback": feedback if may_feed else None,
                "latent_seed": request.sampling.seed if may_feed and feedback.random else None}

    def _decode_row(self, request: Request) -> DecodeRow:
        latent = request.status == RequestStatus.LATENT
        # an answer that forks at its first thought feeds the prompt's last token (<bot>) first
        thought = latent and request.pending_token is None
        mode = request.latent.mode
        mixture = request.sampling.mixture
        return DecodeRow(request_id=request.request_id, slot=request.slot,
                         feed_token=None if thought else request.pending_token,
                         feed_mixture=request.pending_is_sampled and mixture is not None and mixture.active,
                         ask_stop=thought and mode == "auto", ask_entropy=thought and mode in ("entropy", "token"),
                         **self._output_fields(request, request.thoughts_done + thought))

    def _add_chunk(self, plan: StepPlan, request: Request, budget: int) -> int:
        start = request.prefilled_tokens
        end = min(request.num_prompt_tokens, start + budget)
        last = end == request.num_prompt_tokens
        fields = self._output_fields(request, 0) if last else {}
        plan.prefill.append(PrefillChunk(request_id=request.request_id, slot=request.slot,
                                         token_ids=tuple(request.prompt_token_ids[start:end]), start=start,
                                         last=last, **fields))
        request.prefilled_tokens = end
        return end - start
