"""When to retry a request and how long to wait first: the SDK's only retry rules.

Contract:

- Retried: connection errors and timeouts (``RETRY_ERRORS``: no response at all) and the statuses in
  ``RetryPolicy.statuses`` (408, 429, 502, 503, 504), up to ``max_retries`` extra attempts.
  Nothing else is retried: a 4xx other than those is the caller's mistake, and a 500 may
  have done work already.
- A response's ``Retry-After`` (delta-seconds or an HTTP date) decides the wait when it is
  within ``[0, max_retry_after]``; otherwise (absent, malformed, too long) the wait is
  ``min(initial_delay * 2**attempt, max_delay)`` shortened by up to ``jitter`` (25 %) at
  random, so that many clients refused together do not return together.
- Streams are retried only while opening (before the 2xx status line); once a stream has
  started, nothing is retried (the clients enforce this: the retry loop returns the open
  response and never sees what follows).

The policy is pure: time and randomness come from ``clock`` and ``random`` so tests can
fix them, and the clients take the ``sleep`` function for the same reason.
"""

from __future__ import annotations

import email.utils
import random as _random
import time
from dataclasses import dataclass, field
from datetime import timezone
from typing import Callable, FrozenSet, Optional

import httpx

RETRY_STATUSES: FrozenSet[int] = frozenset({408, 429, 502, 503, 504})

#: Transport failures worth another attempt: the network or the server's side of the
#: connection, not a malformed URL or a protocol misuse on our side.
RETRY_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError,
                httpx.ProxyError)


def parse_retry_after(value: Optional[str], now: float) -> Optional[float]:
    """Seconds to wait from a ``Retry-After`` header value, or ``None`` if unusable.

    ``now`` is the current Unix time, used to turn an HTTP date into a delay; a date in
    the past means "retry now" (0).
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:  # "-0000" parses as naive; RFC 9110 dates are GMT anyway
            when = when.replace(tzinfo=timezone.utc)
        return max(0.0, when.timestamp() - now)
    if seconds != seconds or seconds < 0:  # NaN or negative
        return None
    return seconds


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff parameters. The defaults wait about 0.5 s, then 1 s, ... up to 8 s."""

    initial_delay: float = 0.5
    max_delay: float = 8.0
    jitter: float = 0.25
    max_retry_after: float = 60.0
    statuses: FrozenSet[int] = RETRY_STATUSES
    random: Callable[[], float] = field(default=_random.random, compare=False)
    clock: Callable[[], float] = field(default=time.time, compare=False)

    def backoff(self, attempt: int) -> float:
        """The wait before retry number ``attempt + 1`` when the server gave no hint."""
        base = min(self.initial_delay * (2 ** attempt), self.max_delay)
        return base * (1.0 - self.jitter * self.random())

    def should_retry_status(self, status_code: int) -> bool:
        return status_code in self.statuses

    def delay(self, attempt: int, response: Optional[httpx.Response] = None) -> float:
        """How long to wait before retrying after failed attempt number ``attempt`` (0-based)."""
        if response is not None:
            hinted = parse_retry_after(response.headers.get("retry-after"), self.clock())
            if hinted is not None and hinted <= self.max_retry_after:
                return hinted
        return self.backoff(attempt)

    def next_delay(self, attempt: int, max_retries: int, *, response: Optional[httpx.Response] = None,
                   error: Optional[BaseException] = None) -> Optional[float]:
        """Seconds to sleep before the next attempt, or ``None``: do not retry.

        Give the failed ``response`` (a non-success status) or the transport ``error``.
        """
        if attempt >= max_retries:
            return None
        if error is not None:
            if not isinstance(error, RETRY_ERRORS):
                return None
            return self.backoff(attempt)
        if response is None or not self.should_retry_status(response.status_code):
            return None
        return self.delay(attempt, response)
