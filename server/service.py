"""The service layer: from an HTTP request's fields to ``AsyncEngine.generate`` and back.

Routes stay thin: they parse their schema, call ``GenerationService.params(...)`` to get
a ``Generation`` (question, ``SamplingParams``, ``LatentPolicy``), then either

- ``await service.complete(gen, http_request)`` for the final ``RequestOutput``, or
- ``await service.open_stream(gen, http_request)`` for an async iterator of outputs.

Both validate and tokenize before anything is queued (bad input raises ``ApiError``
422/400, a full queue 503), both race the generation against the client's disconnect
(a client that leaves has its request aborted: its batch slot is freed at the next
engine step), and both turn an engine failure into ``ApiError`` 500 carrying the
engine's message. A stream waits for its first output before the HTTP response starts,
so an error up to that point still gets a proper status code; a failure later in a
stream is the route's to report in-band. With ``n`` > 1 (``SamplingParams.n``) the
stream interleaves the answers' outputs (``RequestOutput.index``) and ``complete``
returns the first answer with every answer in its ``samples``; ``majority`` counts their
answers. Nothing here knows of torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import Request as HttpRequest

from engine.async_engine import AsyncEngine, EngineCrashedError, EngineDeadError, EngineOverloadedError
from engine.output import RequestOutput
from engine.params import (DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P,
                           LatentPolicy, SamplingParams, LatentFeedback)
from server.disconnect import guard_of
from server.errors import ApiError, ClientDisconnected, from_engine_exception
from server.metrics import ServerMetrics
from server.schemas import LatentThought, SamplingFields, ThoughtFeed, TraceToken

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    question: str | list[dict[str, str]]      # a question, or chat messages for a chat template
    sampling: SamplingParams
    latent: LatentPolicy | None
    id_prefix: str = "gen"       # the response id is "<prefix>-<uuid hex>"


class GenerationService:
    def __init__(self, engine: AsyncEngine, metrics: ServerMetrics, model_name: str, retry_after_s: int = 1):
        # The engine resolves unset latent options against the checkpoint
        # (``CoconutConfig.resolve``); the service passes the request's options through.
        self.engine = engine
        self.metrics = metrics
        self.model_name = model_name
        self.retry_after_s = retry_after_s
        self.created = time.time()

    # ------------------------------------------------------------ parameters

    @property
    def has_chat_template(self) -> bool:
        """The served tokenizer renders chat messages itself (``PromptFormat.build_chat``)."""
        prompt_format = getattr(getattr(self.engine, "engine", None), "prompt_format", None)
        return bool(prompt_format is not None and prompt_format.has_chat_template)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(404, f"model {model!r} is not served here; this server serves "
                                f"{self.model_name!r} (see GET /v1/models)", param="model")

    def params(self, question: str | list[dict[str, str]], fields: SamplingFields, id_prefix: str = "gen",
               default_temperature: float = DEFAULT_TEMPERATURE,
               default_max_tokens: int = DEFAULT_MAX_TOKENS) -> Generation:
        """Build the engine's parameter objects; their validation errors answer 422.

        The latent options go to the engine as they were given (unset: ``None``): the
        engine's ``LatentPolicy`` infers an unset mode from the fields given and
        ``CoconutConfig.resolve`` fills in the checkpoint's defaults, once."""
        # Tiny temperatures and top_p values are safe: the engine treats a temperature
        # below 1e-5 as greedy and always keeps the top-ranked token.
        temperature = fields.temperature if fields.temperature is not None else default_temperature
        top_p = fields.top_p if fields.top_p is not None else DEFAULT_TOP_P
        try:
            sampling = SamplingParams(
                max_tokens=fields.max_tokens if fields.max_tokens is not None else default_max_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=fields.top_k if fields.top_k is not None else DEFAULT_TOP_K,
                seed=fields.seed, stop=fields.stop or (), ignore_eos=fields.ignore_eos, n=fields.n,
                mixture=fields.mixture.model_dump(exclude_none=True) if fields.mixture is not None else None)
            latent = None
            options = fields.latent
            top_k = fields.latent_trace_top_k if fields.return_latent_trace else 0
            if options is not None or top_k:
                given = options.model_dump(exclude_none=True) if options is not None else {}
                feedback = given.pop("feedback", None)
                latent = LatentPolicy(mode=given.pop("mode", None), trace_top_k=top_k,
                                      feedback=LatentFeedback(**feedback) if feedback else None, **given)
        except ValueError as e:
            raise ApiError(422, str(e)) from None
        return Generation(question, sampling, latent, id_prefix)

    # ------------------------------------------------------------ running

    def _enter(self, gen: Generation, http: HttpRequest):
        """Validate, tokenize and length-check: the engine ``Request`` (or ApiError)."""
        if not self.engine.accepting:
            reason = self.engine.unavailable_reason or ("the engine is not accepting requests (starting, "
                                                        "shutting down or failed)")
            raise ApiError(503, f"{reason}; see GET /ready", "unavailable_error",
                           headers={"Retry-After": str(self.retry_after_s)})
        try:
            request = self.engine.make_request(gen.question, gen.sampling, gen.latent,
                                               request_id=f"{gen.id_prefix}-{uuid.uuid4().hex}")
        except Exception as e:
            raise self._translate(e) from None
        _annotate(http, engine_request_id=request.request_id,
                  prompt_tokens=request.num_prompt_tokens)
        return request

    def _translate(self, exc: BaseException) -> ApiError:
        known = from_engine_exception(exc, self.retry_after_s)
        return known if known is not None else self._failure(exc)

    @staticmethod
    def _failure(exc: BaseException) -> ApiError:
        log.error("request failed in the engine: %s: %s", type(exc).__name__, exc)
        return ApiError(500, f"the engine failed this request: {type(exc).__name__}: {exc}", "engine_error")

    async def _outputs(self, request, http: HttpRequest) -> AsyncIterator[RequestOutput]:
        """The engine's outputs for one request, observed for metrics and the access log.
        A full queue or a stopping engine raises ApiError 503 (nothing was queued); an
        engine failure (finish_reason 'error', or the loop died) raises ApiError 500."""
        observers = {member.index: self.metrics.observer() for member in request.members}   # one per answer
        reason: str | None = None       # overrides the last output's finish_reason
        try:
            async with contextlib.aclosing(self.engine.generate(request)) as outputs:
                async for out in outputs:
                    observers[out.index].on_output(out)
                    if out.finish_reason == "error":
                        reason = "error"
                        raise ApiError(500, f"the engine failed this request: {out.error}", "engine_error")
                    yield out
        except ApiError:
            raise
        except EngineCrashedError as e:
            reason = "error"         # accepted, then the engine loop (or its process) died
            log.error("request failed: %s", e)
            raise ApiError(500, str(e), "engine_dead_error") from None
        except (EngineOverloadedError, EngineDeadError) as e:
            reason = "rejected"      # refused at submission: full, shutting down or restarting
            raise from_engine_exception(e, self.retry_after_s) from None
        except (asyncio.CancelledError, GeneratorExit):
            reason = "abort"
            raise
        except Exception as e:
            reason = "error"
            raise self._failure(e) from None
        finally:
            lasts = [o.last for o in observers.values()]
            if reason is None and any(last is None or not last.finished for last in lasts):
                reason = "abort"     # left before the end (closed early)
            if reason == "rejected":
                self.metrics.finished.labels("rejected").inc()
            else:
                for observer in observers.values():
                    observer.finish(reason)
            last = lasts[0]
            _annotate(http, finish_reason=reason or last.finish_reason,
                      latent_thoughts=last.num_thoughts if last else 0,
                      completion_tokens=sum(len(o.token_ids) for o in lasts if o is not None))

    async def complete(self, gen: Generation, http: HttpRequest) -> RequestOutput:
        """The final output; raises ClientDisconnected if the client leaves first."""
        request = self._enter(gen, http)

        async def collect() -> RequestOutput:
            finals: dict[int, RequestOutput] = {}
            async with contextlib.aclosing(self._outputs(request, http)) as outputs:
                async for out in outputs:
                    if out.finished:
                        finals[out.index] = out
            assert len(finals) == len(request.members)
            first = finals[0]
            if len(finals) > 1:
                first.samples = [finals[i] for i in range(len(finals))]
            return first

        # the guard is left running: an OpenAI request with several prompts completes each
        # under it at once, and it ends by itself once the response is sent
        try:
            return await guard_of(http).run(collect())
        except ClientDisconnected:
            _annotate(http, finish_reason="abort")
            raise

    async def open_stream(self, gen: Generation, http: HttpRequest) -> AsyncIterator[RequestOutput]:
        """An iterator of outputs whose first item is already there (so errors before it
        still answer with a status code). Closing it aborts the request."""
        request = self._enter(gen, http)
        outputs = self._outputs(request, http)
        try:
            first = await guard_of(http).run(outputs.__anext__())
        except BaseException as e:
            if isinstance(e, ClientDisconnected):
                _annotate(http, finish_reason="abort")
            await outputs.aclose()
            raise

        async def rest() -> AsyncIterator[RequestOutput]:
            async with contextlib.aclosing(outputs):
                yield first
                if not (first.finished and len(request.members) == 1):
                    async for out in outputs:
                        yield out

        return rest()


def answers_of(out: RequestOutput) -> list[RequestOutput]:
    """Every answer of a finished generation (``complete``'s output), in index order."""
    return out.samples or [out]


def majority(outs: list[RequestOutput]) -> dict:
    """Self-consistency's vote: the most frequent non-empty ``answer`` and how many of the
    answers gave it (a tie goes to the one given first, by index); ``""`` only when no
    answer has one."""
    counts: dict[str, int] = {}
    for out in outs:
        if out.answer:
            counts[out.answer] = counts.get(out.answer, 0) + 1
    if not counts:
        return {"answer": "", "count": len(outs), "of": len(outs)}
    best = max(counts, key=counts.get)          # max keeps the first of equal counts
    return {"answer": best, "count": counts[best], "of": len(outs)}


def latent_trace(out: RequestOutput, asked: bool = True) -> list[LatentThought] | None:
    """The engine's latent trace (``RequestOutput.latent_trace``: one dict per thought with
    ``token_ids``, ``texts``, ``probs`` and maybe ``frontier``) as the API's typed
    ``LatentThought`` list (``None`` unless asked): the one conversion every route uses."""
    if not asked:
        return None
    return [LatentThought(thought=i, tokens=[TraceToken(id=t, text=x, prob=p) for t, x, p in
                                             zip(e["token_ids"], e["texts"], e["probs"])],
                          entropy=e.get("entropy"), feed=_feed(e.get("feed")), frontier=e.get("frontier"))
            for i, e in enumerate(out.latent_trace or [], 1)]


def _feed(feed: dict | None) -> ThoughtFeed | None:
    if feed is None:
        return None
    tokens = None
    if feed.get("token_ids") is not None:
        tokens = [TraceToken(id=t, text=x, prob=w) for t, x, w in zip(feed["token_ids"], feed["texts"],
                                                                      feed["weights"])]
    return ThoughtFeed(type=feed["type"], tokens=tokens)


def latent_trace_json(out: RequestOutput, asked: bool = True) -> list[dict] | None:
    """``latent_trace`` as the JSON of a stream event (unset fields left out)."""
    trace = latent_trace(out, asked)
    return None if trace is None else [t.model_dump(exclude_none=True) for t in trace]


def _annotate(http: HttpRequest, **fields) -> None:
    """Facts about the generation for this request's access-log line."""
    http.scope.setdefault("state", {}).setdefault("log", {}).update(fields)
