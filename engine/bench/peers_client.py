"""The client of ``engine bench peers``: streamed OpenAI chat completions against any server.

One ``ChatPool`` sends ``POST /v1/chat/completions`` with ``stream: true`` over keep-alive
HTTP/1.1 connections on asyncio streams (the same minimal client ``engine bench serve``
uses, so that the benchmark takes little of the CPU it shares with the servers) and
stamps every ``data:`` chunk with content as it arrives. It reads only what the OpenAI
chunk format promises (``choices[0].delta.content``, ``finish_reason``, a final
``usage`` when ``stream_options.include_usage`` is set), so it drives this server,
``transformers serve`` and llama.cpp's server alike.

Two load shapes, as vLLM's ``bench serve`` has them:

- ``closed_loop(pool, prompts, concurrency)``: at most ``concurrency`` requests in flight,
  the next sent as soon as one ends (``--max-concurrency``);
- ``poisson(pool, prompts, rate, seed)``: requests sent at exponential gaps of mean
  ``1/rate`` seconds whatever is in flight (``--request-rate``).

Each returns the requests' ``Trace``s (``engine.bench.serve``) in prompt order, their
answers' text and the wall time. It knows nothing of which server it talks to.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

from engine.bench.serve import RawPool, Trace


@dataclass
class ChatResult:
    traces: list[Trace]
    texts: list[str]
    duration_s: float


class ChatPool(RawPool):
    """``RawPool`` for ``/v1/chat/completions``: ``body`` is a whole chat request."""

    def __init__(self, url: str, headers: dict | None = None):
        super().__init__(url, headers or {})
        self.head = self.head.replace("/v1/reason ", "/v1/chat/completions ", 1)
        self.texts: dict[int, list[str]] = {}

    async def chat(self, body: dict, gate) -> tuple[Trace, str]:
        """One streamed chat request -> its trace and the answer's text."""
        key = id(body)
        self.texts[key] = []
        trace = await self.one(body, None, gate)
        return trace, "".join(self.texts.pop(key, []))

    def payload(self, body: dict, question) -> dict:
        return body

    def on_event(self, trace: Trace, payload: dict, now: float, body: dict) -> None:
        # the stream ends at its last event: ``transformers serve`` sends no ``[DONE]``
        trace.end = now
        choices = payload.get("choices") or []
        if choices:
            delta = choices[0].get("delta") or {}
            content = delta.get("content")
            if content:
                trace.chunk(now)
                self.texts.setdefault(id(body), []).append(content)
        usage = payload.get("usage")
        if usage and usage.get("completion_tokens") is not None:
            trace.tokens = int(usage["completion_tokens"])

    def finish(self, trace: Trace) -> None:
        """No usage chunk: count the chunks with content (one token each on every peer here)."""
        if trace.error is None and not trace.tokens:
            trace.tokens = 0 if trace.first is None else 1 + len(trace.itl)


def chat_body(model: str, prompt: str, max_tokens: int) -> dict:
    """A greedy streamed chat request of exactly what every peer accepts."""
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
            "max_tokens": max_tokens, "temperature": 0.0, "stream_options": {"include_usage": True}}


async def _gather(pool: ChatPool, bodies: list[dict], gate, gaps: list[float] | None) -> ChatResult:
    start = time.perf_counter()
    if gaps is None:
        results = await asyncio.gather(*(pool.chat(b, gate) for b in bodies))
    else:
        tasks = []
        for body, gap in zip(bodies, gaps):
            await asyncio.sleep(gap)
            tasks.append(asyncio.ensure_future(pool.chat(body, gate)))
        results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    return ChatResult([r[0] for r in results], [r[1] for r in results], duration)


async def closed_loop(pool: ChatPool, bodies: list[dict], concurrency: int) -> ChatResult:
    return await _gather(pool, bodies, asyncio.Semaphore(concurrency), None)


async def poisson(pool: ChatPool, bodies: list[dict], rate: float, seed: int) -> ChatResult:
    rng = random.Random(seed)
    gaps = [0.0] + [rng.expovariate(rate) for _ in bodies[1:]]
    return await _gather(pool, bodies, asyncio.Semaphore(len(bodies)), gaps)

