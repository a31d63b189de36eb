"""Scheduler: which requests wait, which run, which join the batch this step.

First come, first served. A waiting request is admitted while the batch has a free
slot (``max_batch_size``) and the step's prefill budget (``max_prefill_tokens``, padded)
allows; the head of the queue is never skipped, so admission order is arrival order.
Requests that finish or are aborted leave ``running`` at once and are reported to the
runner in the next plan, which frees their batch row before that step's forward pass.
Plain data only: no tensors, no model.
"""

from __future__ import annotations

from collections import deque

from engine.request import Request
from engine.runner.model_runner import StepPlan


class Scheduler:
    def __init__(self, max_batch_size: int, max_prefill_tokens: int):
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Request] = deque()
        self.running: dict[str, Request] = {}
        self._departed: set[str] = set()

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._departed)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def schedule(self) -> StepPlan:
        plan = StepPlan(removed_ids=self._departed)
        self._departed = set()
        width = 0
        while self.waiting and len(self.running) < self.max_batch_size:
            head = self.waiting[0]
            new_width = max(width, head.num_prompt_tokens)
            if plan.new_requests and new_width * (len(plan.new_requests) + 1) > self.max_prefill_tokens:
                break
            self.waiting.popleft()
            width = new_width
            head.start()
            self.running[head.request_id] = head
            plan.new_requests.append(head)
        return plan

    def remove(self, request: Request) -> None:
        """A request ended (finished, aborted or failed): free its slot."""
        if self.running.pop(request.request_id, None) is not None:
            self._departed.add(request.request_id)
        else:
            try:
                self.waiting.remove(request)
            except ValueError:
                pass

    def find(self, request_id: str) -> Request | None:
        if request_id in self.running:
            return self.running[request_id]
        for r in self.waiting:
            if r.request_id == request_id:
                return r
        return None
