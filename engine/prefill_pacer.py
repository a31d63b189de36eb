"""PrefillPacer: how many prompt tokens a step may prefill without stalling running streams.

A step runs one decode forward (every running request's next position) and one prefill
forward (this step's prompt chunks); the running requests get their next token only when
both are done. A fixed token budget (``max_prefill_tokens``) therefore adds a burst's whole
prefill to the running streams' gap: on a 2-core CPU, 512 prompt tokens of a 135M-parameter
model take about 2 s, against a 150 ms decode step.

The pacer bounds that added delay in time rather than tokens. It keeps moving averages of
the decode forward's seconds and of the prefill forward's seconds per token, as the runner
measures them, and while requests decode it allows

    budget = max(min_tokens, delay_factor x decode seconds / prefill seconds per token)

tokens (never more than ``max_prefill_tokens``), so a step's prefill takes about
``delay_factor`` decode steps and every running stream's gap between tokens stays within
about ``(1 + delay_factor)`` decode steps, whatever arrives. With nothing decoding (no one
to stall) the whole ``max_prefill_tokens`` is allowed. Before it has measured anything it
allows ``max_prefill_tokens``. ``delay_factor`` 0 turns pacing off.

It knows nothing of requests or models: the core feeds it the runner's timings and asks
it for the budget of the next step.
"""

from __future__ import annotations


class PrefillPacer:
    def __init__(self, max_prefill_tokens: int, delay_factor: float, min_tokens: int = 16, smoothing: float = 0.3):
        if delay_factor < 0:
            raise ValueError(f"prefill delay factor {delay_factor} is invalid: expected >= 0 (0: no pacing)")
        self.max_prefill_tokens = max_prefill_tokens
        self.delay_factor = delay_factor
        self.min_tokens = min(min_tokens, max_prefill_tokens)
        self.smoothing = smoothing
        self.decode_s: float | None = None          # moving average of the decode forward's seconds
        self.prefill_s_per_token: float | None = None

    def observe(self, decode_s: float | None, prefill_s: float | None, prefill_tokens: int) -> None:
        """One step's timings: the decode forward's seconds (None: no decode rows), the
        prefill forward's seconds over its ``prefill_tokens`` tokens (None: no prefill)."""
        if decode_s is not None:
            self.decode_s = self._average(self.decode_s, decode_s)
        if prefill_s is not None and prefill_tokens > 0:
            self.prefill_s_per_token = self._average(self.prefill_s_per_token, prefill_s / prefill_tokens)

    def budget(self, decoding: bool) -> int:
        """Prompt tokens the next step may prefill (``decoding``: some request will decode in it)."""
        if not decoding or self.delay_factor == 0 or self.decode_s is None or not self.prefill_s_per_token:
            return self.max_prefill_tokens
        paced = int(self.delay_factor * self.decode_s / self.prefill_s_per_token)
        return max(self.min_tokens, min(self.max_prefill_tokens, paced))

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.smoothing) * old + self.smoothing * new
