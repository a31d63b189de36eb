"""OpenAI-compatible routes: ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (streaming and not).

The question is the prompt (completions) or the last user message (chat); the content
returned equals ``/v1/reason``'s ``text`` for the same question and parameters. Same
service, same engine, same errors as ``/v1/reason``; only the shapes differ.
"""

from __future__ import annotations

import time
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request

from engine.output import RequestOutput
from server.deps import get_service
from server.errors import request_id_of
from server.openai_schemas import (AssistantMessage, ChatChoice, ChatRequest, ChatResponse, CompletionChoice,
                                   CompletionRequest, CompletionResponse, CompletionUsage, ModelCard,
                                   ModelList)
from server.routes.reason import trace_of
from server.schemas import ERROR_RESPONSES
from server.service import GenerationService
from server.sse import event_stream

router = APIRouter(tags=["openai"])

COMPLETIONS_DEFAULT_MAX_TOKENS = 16   # OpenAI's default for /v1/completions
OPENAI_DEFAULT_TEMPERATURE = 1.0
_STREAM_DOC = {200: {"description": "JSON, or with `stream: true` server-sent events ending in "
                     "`data: [DONE]`", "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


def _usage(out: RequestOutput) -> CompletionUsage:
    prompt, completion = len(out.prompt_token_ids), len(out.token_ids)
    return CompletionUsage(prompt_tokens=prompt, completion_tokens=completion,
                           total_tokens=prompt + completion, latent_thoughts=out.num_thoughts)


def _trace(out: RequestOutput, body) -> list | None:
    return trace_of(out, body.return_latent_trace)


@router.get("/v1/models", response_model=ModelList)
async def models(service: GenerationService = Depends(get_service)):
    engine = service.engine.engine
    coconut = engine.coconut
    card = ModelCard(id=service.model_name, created=int(service.created), max_model_len=engine.max_seq_len,
                     coconut={"method": coconut.method, "default_mode": coconut.default_mode,
                              "num_thoughts": coconut.num_thoughts,
                              "stop_classifier": coconut.stop_classifier is not None})
    return ModelList(data=[card])


@router.post("/v1/completions", response_model=CompletionResponse, response_model_exclude_none=True,
             responses={**ERROR_RESPONSES, **_STREAM_DOC})
async def completions(body: CompletionRequest, request: Request,
                      service: GenerationService = Depends(get_service)):
    service.check_model(body.model)
    gen = service.params(body.prompt, body, id_prefix="cmpl", default_temperature=OPENAI_DEFAULT_TEMPERATURE,
                         default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS)
    if body.stream:
        outputs = await service.open_stream(gen, request)
        return event_stream(_completion_chunks(outputs, service.model_name, body), request_id_of(request))
    out = await service.complete(gen, request)
    return CompletionResponse(id=out.request_id, created=int(time.time()), model=service.model_name,
                              choices=[CompletionChoice(text=out.text, finish_reason=out.finish_reason,
                                                        latent_trace=_trace(out, body))],
                              usage=_usage(out))


@router.post("/v1/chat/completions", response_model=ChatResponse, response_model_exclude_none=True,
             responses={**ERROR_RESPONSES, **_STREAM_DOC})
async def chat_completions(body: ChatRequest, request: Request,
                           service: GenerationService = Depends(get_service)):
    service.check_model(body.model)
    if body.max_tokens is None and body.max_completion_tokens is not None:
        body = body.model_copy(update={"max_tokens": body.max_completion_tokens})
    gen = service.params(body.question(), body, id_prefix="chatcmpl",
                         default_temperature=OPENAI_DEFAULT_TEMPERATURE)
    if body.stream:
        outputs = await service.open_stream(gen, request)
        return event_stream(_chat_chunks(outputs, service.model_name, body), request_id_of(request))
    out = await service.complete(gen, request)
    return ChatResponse(id=out.request_id, created=int(time.time()), model=service.model_name,
                        choices=[ChatChoice(message=AssistantMessage(content=out.text),
                                            finish_reason=out.finish_reason, latent_trace=_trace(out, body))],
                        usage=_usage(out))


def _include_usage(body) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


async def _completion_chunks(outputs: AsyncIterator[RequestOutput], model: str,
                             body: CompletionRequest) -> AsyncIterator[dict]:
    created = int(time.time())
    async for out in outputs:
        if not (out.delta or out.finished):
            continue
        choice = {"index": 0, "text": out.delta, "finish_reason": out.finish_reason, "logprobs": None}
        if out.finished and body.return_latent_trace:
            choice["latent_trace"] = [t.model_dump() for t in _trace(out, body)]
        yield {"id": out.request_id, "object": "text_completion", "created": created, "model": model,
               "choices": [choice]}
        if out.finished and _include_usage(body):
            yield {"id": out.request_id, "object": "text_completion", "created": created, "model": model,
                   "choices": [], "usage": _usage(out).model_dump()}


async def _chat_chunks(outputs: AsyncIterator[RequestOutput], model: str,
                       body: ChatRequest) -> AsyncIterator[dict]:
    created = int(time.time())
    first = True
    async for out in outputs:
        head = {"id": out.request_id, "object": "chat.completion.chunk", "created": created, "model": model}
        if first:  # OpenAI opens every chat stream with the role
            first = False
            yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None}]}
        if out.delta:
            yield {**head, "choices": [{"index": 0, "delta": {"content": out.delta}, "finish_reason": None}]}
        if out.finished:
            choice = {"index": 0, "delta": {}, "finish_reason": out.finish_reason}
            if body.return_latent_trace:
                choice["latent_trace"] = [t.model_dump() for t in _trace(out, body)]
            yield {**head, "choices": [choice]}
            if _include_usage(body):
                yield {**head, "choices": [], "usage": _usage(out).model_dump()}
