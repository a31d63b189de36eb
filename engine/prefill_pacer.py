"""PrefillPacer: how many prompt tokens a step may prefill without stalling running streams.

A step runs one decode forward (every running request's next position) and one prefill
forward (this step's prompt chunks); the running requests get their next token only when
both are done. A fixed token budget (``max_prefill_tokens``) therefore adds a burst's whole
prefill to the running streams' gap: on a 2-core CPU, 512 prompt tokens of a 135M-parameter
model take about 2 s, against a 150 ms decode step.

The pacer bounds that added delay in time rather than tokens. It keeps a moving average of
the decode forward's seconds and fits the prefill forward's seconds as ``fixed + per_token x
tokens`` (least squares over the recent forwards, older ones weighing less), as the runner
measures them; while requests decode it allows the most tokens whose prefill fits in
``delay_factor`` decode steps,

    budget = max(min_tokens, (delay_factor x decode seconds - fixed) / per_token)

(never more than ``max_prefill_tokens``), so every running stream's gap between tokens
stays within about ``(1 + delay_factor)`` decode steps, whatever arrives, as long as the
decoding requests are at least as many as the prompts waiting to be prefilled. Where the
prompts outnumber them (W prompts against D decoding requests: a burst that arrives while
few requests run, or a closed loop whose requests end together), the delay allowed is
``delay_factor x W / D`` decode steps, at most ``max_prefill_tokens``' worth: holding W
first tokens back to spare D streams one gap costs more waiting than it saves, and the
burst otherwise trickles in over many steps of a few decode rows, each of which reads
every weight for a handful of tokens (SmolLM2-135M on 2 cores, 16 streams whose requests end
together, two pairs: 181.0 / 189.5 output tok/s and an ITL p99 of 101 / 103 ms, against
148.2 / 185.2 tok/s and 214 / 158 ms paced by the decoding requests alone). The fixed part
matters on small models, where a forward's overhead outweighs its tokens: an average per
token taken from small chunks would shrink the budget chunk after chunk. With nothing decoding (no one
to stall) the whole ``max_prefill_tokens`` is allowed. Before it has measured anything it
allows ``max_prefill_tokens``. ``delay_factor`` 0 turns pacing off.

Where a step's prompts run in one forward with its decode rows (the runner's lean path),
the forward's seconds beyond the decode forwards' moving average count as the prompts'.

It knows nothing of requests or models: the core feeds it the runner's timings and asks
it for the budget of the next step.
"""

from __future__ import annotations


class PrefillPacer:
    def __init__(self, max_prefill_tokens: int, delay_factor: float, min_tokens: int = 16, smoothing: float = 0.3,
                 memory: float = 0.9):
        if delay_factor < 0:
            raise ValueError(f"prefill delay factor {delay_factor} is invalid: expected >= 0 (0: no pacing)")
        self.max_prefill_tokens = max_prefill_tokens
        self.delay_factor = delay_factor
        self.min_tokens = min(min_tokens, max_prefill_tokens)
        self.smoothing = smoothing
        self.memory = memory                        # weight of the older prefill forwards in the fit
        self.decode_s: float | None = None          # moving average of the decode forward's seconds
        self._sums = [0.0, 0.0, 0.0, 0.0, 0.0]      # weighted n, sum x, sum y, sum xx, sum xy

    def observe(self, decode_s: float | None, prefill_s: float | None, prefill_tokens: int,
                with_decode: bool = False) -> None:
        """One step's timings: the decode forward's seconds (None: no decode rows), the
        prefill forward's seconds over its ``prefill_tokens`` tokens (None: no prefill).
        ``with_decode``: the prompts ran in one forward with the decode rows, so
        ``prefill_s`` holds theirs too; the prompts' cost is what it took beyond the decode
        forwards' moving average."""
        if with_decode and prefill_s is not None:
            prefill_s = max(0.0, prefill_s - (self.decode_s or 0.0))
        if decode_s is not None:
            self.decode_s = decode_s if self.decode_s is None else (
                (1 - self.smoothing) * self.decode_s + self.smoothing * decode_s)
        if prefill_s is not None and prefill_tokens > 0:
            x, y = float(prefill_tokens), prefill_s
            self._sums = [self.memory * old + new for old, new in zip(self._sums, (1.0, x, y, x * x, x * y))]

    def prefill_cost(self) -> tuple[float, float] | None:
        """(fixed seconds, seconds per token) of a prefill forward, or None before any."""
        n, sx, sy, sxx, sxy = self._sums
        if n == 0:
            return None
        variance = n * sxx - sx * sx
        if variance > 1e-9 * max(1.0, sx * sx):
            per_token = (n * sxy - sx * sy) / variance
            fixed = (sy - per_token * sx) / n
            if per_token > 0 and fixed >= 0:
                return fixed, per_token
        return 0.0, sy / sx          # one chunk size so far (or a fit that makes no sense): the mean

    @property
    def prefill_s_per_token(self) -> float | None:
        cost = self.prefill_cost()
        return None if cost is None else cost[1]

    def budget(self, decoding: int | bool, waiting: int = 0) -> int:
        """Prompt tokens the next step may prefill. ``decoding``: the requests that will
        decode in it (a bool: whether any will, counted as one); ``waiting``: the prompts it
        could prefill. While prompts outnumber the decoding requests, the delay allowed
        grows with the ratio (module docstring)."""
        cost = self.prefill_cost()
        if not decoding or self.delay_factor == 0 or self.decode_s is None or cost is None:
            return self.max_prefill_tokens
        fixed, per_token = cost
        share = max(1.0, waiting / int(decoding))
        paced = int((self.delay_factor * share * self.decode_s - fixed) / per_token + 1e-6)
        return max(self.min_tokens, min(self.max_prefill_tokens, paced))
