"""``POST /v1/reason``: ask a question, get the answer (JSON or SSE) without the thinking.

The latent thoughts stay inside the server: a stream carries only answer text (latent
steps produce no events), and ``latent_trace`` (each thought's top tokens, when asked
with ``return_latent_trace``) comes in the JSON reply or the stream's last event.
Streamed deltas concatenate to exactly the non-streamed ``text``. With ``n`` > 1 the
JSON reply adds ``samples`` (every answer) and ``majority`` (the vote over their answers),
and a stream's events carry ``index`` (one last event per answer), then one ``majority``
event.
"""

from __future__ import annotations

from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request

from engine.output import RequestOutput
from server.deps import get_service
from server.disconnect import guard_of
from server.errors import request_id_of
from server.schemas import (ERROR_RESPONSES, Majority, PromptTokensDetails, ReasonRequest, ReasonResponse, Sample,
                            Timings, Usage, sse_response)
from server.service import GenerationService, answers_of, latent_trace, latent_trace_json, majority
from server.sse import delta_frames, event_stream

router = APIRouter(tags=["reason"])

_STREAM_DOC = sse_response("ReasonStreamEvent", "JSON, or with `stream: true` server-sent events "
                           "(`data: {ReasonStreamEvent}` ... `data: [DONE]`; a failure after the stream "
                           "started is one `data: {\"error\": ...}` event, without [DONE])")


def usage_of(out: RequestOutput, answers: list[RequestOutput] | None = None) -> Usage:
    """The prompt and the thoughts once (the answers share them), the tokens of every answer."""
    return Usage(prompt_tokens=len(out.prompt_token_ids), latent_thoughts=out.num_thoughts,
                 completion_tokens=sum(len(a.token_ids) for a in answers or [out]),
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=out.cached_prompt_tokens))


def timings_of(out: RequestOutput) -> Timings:
    t = out.timings
    return Timings(queue=t.get("queue", 0.0), prefill=t.get("prefill", 0.0), latent=t.get("latent", 0.0),
                   decode=t.get("decode", 0.0))


@router.post("/v1/reason", response_model=ReasonResponse, response_model_exclude_none=True,
             responses={**ERROR_RESPONSES, **_STREAM_DOC})
async def reason(body: ReasonRequest, request: Request,
                 service: GenerationService = Depends(get_service)):
    """Answer one question; `latent` sets how many continuous thoughts come first."""
    service.check_model(body.model)
    gen = service.params(body.question, body, id_prefix="reason")
    if body.stream:
        outputs = await service.open_stream(gen, request)
        return event_stream(_events(outputs, service.model_name, body.return_latent_trace, body.n),
                            request_id_of(request), guard_of(request))
    out = await service.complete(gen, request)
    answers = answers_of(out)
    several = len(answers) > 1
    return ReasonResponse(id=out.request_id, model=service.model_name, text=out.text, answer=out.answer,
                          finish_reason=out.finish_reason, usage=usage_of(out, answers), timings=timings_of(out),
                          latent_trace=latent_trace(out, body.return_latent_trace),
                          samples=[Sample(index=a.index, text=a.text, answer=a.answer, finish_reason=a.finish_reason,
                                          completion_tokens=len(a.token_ids)) for a in answers] if several else None,
                          majority=Majority(**majority(answers)) if several else None)


async def _events(outputs: AsyncIterator[RequestOutput], model: str, want_trace: bool,
                  n: int = 1) -> AsyncIterator[dict | bytes]:
    """Stream events; with n > 1 each names its answer (``index``), the answer's id is the
    request's (answer 0's), and a last event holds the vote."""
    finals: dict[int, RequestOutput] = {}
    frames = {}           # answer index -> its delta events' encoder
    response_id = None
    async for out in outputs:
        response_id = response_id or out.request_id.split("#")[0]
        if out.delta and not out.finished:          # the hot path: one answer token's text
            frame = frames.get(out.index)
            if frame is None:
                frame = frames[out.index] = delta_frames(_head(response_id, model, n, out.index))
            yield frame(out.delta)
        elif out.finished:
            head = _head(response_id, model, n, out.index)
            finals[out.index] = out
            final = {**head, "delta": out.delta, "finish_reason": out.finish_reason,
                     "usage": usage_of(out).model_dump(), "timings": timings_of(out).model_dump(),
                     "answer": out.answer}
            if want_trace:
                final["latent_trace"] = latent_trace_json(out)
            yield final
    if n > 1 and len(finals) == n:
        yield {"id": response_id, "model": model, "delta": "", "finish_reason": None,
               "majority": majority([finals[i] for i in range(n)])}


def _head(response_id: str, model: str, n: int, index: int) -> dict:
    return {"id": response_id, "model": model, **({"index": index} if n > 1 else {})}
