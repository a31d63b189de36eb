"""OpenAI-compatible routes: ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (streaming and not).

The question is the prompt (completions) or the last user message (chat; a model whose
tokenizer has a chat template gets the whole conversation through it); the content
returned equals ``/v1/reason``'s ``text`` for the same question and parameters. Same
service, same engine, same errors as ``/v1/reason``; only the shapes differ.

A list of prompts on /v1/completions becomes one engine request per prompt, all
submitted together (they share the engine's batch) and answered as one choice each, with
its ``index``; with ``n`` > 1 each prompt has n choices (index ``prompt_index * n + i``),
which carry their ``answer``, and the response a ``majority`` vote per prompt (chat: one);
if one fails (e.g. the waiting queue is full), the others are aborted and
the error is the answer. Log-probabilities come from the engine (``SamplingParams.logprobs``
and ``top_logprobs``: the chosen token's log-probability under the unmodified distribution
and the most likely tokens of the same distribution); see ``server.openai_schemas`` for
the shapes. Tokens are named as the answer's text names them (a symbols model's tokens
in the question's words).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from typing import AsyncIterator, Awaitable, Iterable

from fastapi import APIRouter, Depends, Request

from engine.output import RequestOutput
from engine.params import OPENAI_COMPLETIONS_DEFAULT_MAX_TOKENS, OPENAI_DEFAULT_TEMPERATURE
from server.deps import get_service
from server.disconnect import guard_of
from server.errors import request_id_of
from server.openai_schemas import (AssistantMessage, ChatChoice, ChatLogprobs, ChatRequest, ChatResponse,
                                   ChatTokenLogprob, CompletionChoice, CompletionLogprobs, CompletionRequest,
                                   CompletionResponse, CompletionUsage, ModelCard, ModelList, TopLogprob)
from server.schemas import ERROR_RESPONSES, sse_response
from server.schemas import Majority, PromptTokensDetails
from server.service import Generation, GenerationService, answers_of, latent_trace, latent_trace_json, majority
from server.sse import event_stream

router = APIRouter(tags=["openai"])

#: OpenAI's defaults (written once, in ``engine.params``): temperature 1.0 (``/v1/reason``'s
#: is 0) and, for /v1/completions, 16 tokens.
COMPLETIONS_DEFAULT_MAX_TOKENS = OPENAI_COMPLETIONS_DEFAULT_MAX_TOKENS
#: JSON has no -inf (nor NaN): a log-probability below this is reported as this (OpenAI's value).
MIN_LOGPROB = -9999.0
_STREAM_NOTE = ("JSON, or with `stream: true` server-sent events (`data: {%s}` ... `data: [DONE]`; "
                "a failure after the stream started is one `data: {\"error\": ...}` event, without [DONE])")


def _usage(groups: Iterable[list[RequestOutput]]) -> CompletionUsage:
    """Per prompt (a group: its n answers) the prompt tokens and the thoughts once (its
    answers share them), and the tokens of every answer."""
    groups = [list(g) for g in groups]
    prompt = sum(len(g[0].prompt_token_ids) for g in groups)
    completion = sum(len(o.token_ids) for g in groups for o in g)
    cached = sum(g[0].cached_prompt_tokens for g in groups)
    return CompletionUsage(prompt_tokens=prompt, completion_tokens=completion,
                           total_tokens=prompt + completion, latent_thoughts=sum(g[0].num_thoughts for g in groups),
                           prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


def _response_id(out: RequestOutput) -> str:
    """The request's id: a forked answer's id is ``<leader>#<i>``."""
    return out.request_id.split("#")[0]


def _trace(out: RequestOutput, body) -> list | None:
    return latent_trace(out, body.return_latent_trace)


def _with_logprobs(gen: Generation, top: int) -> Generation:
    return dataclasses.replace(gen, sampling=dataclasses.replace(gen.sampling, logprobs=True, top_logprobs=top))


# ---------------------------------------------------------------- token texts


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte as one printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class TokenTexts:
    """Each generated token's text and UTF-8 bytes, as OpenAI reports them. For byte-level
    BPE tokenizers a token may hold part of a UTF-8 character: its bytes are then the exact
    bytes (its text shows the replacement character, as the decoded text would). A symbols
    model's token that stands for one of the question's names (``renamed``: the request's
    ``RequestOutput.renamed_tokens``) is that name, as the answer's text writes it; a symbol
    the question does not use keeps its vocabulary text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.byte_of: dict[str, int] | None = None
        try:
            decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
        except Exception:
            decoder = {}
        types = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders") or []}
        if "ByteLevel" in types:
            self.byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        self.special = set(getattr(tokenizer, "all_special_ids", ()))

    def text(self, token_id: int, renamed: dict[int, str] | None = None) -> str:
        if renamed and token_id in renamed:
            return renamed[token_id]
        return self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def bytes(self, token_id: int, text: str, renamed: dict[int, str] | None = None) -> list[int]:
        if renamed and token_id in renamed:
            return list(text.encode("utf-8"))
        if self.byte_of is not None and "\ufffd" in text and token_id not in self.special:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(piece, str) and all(c in self.byte_of for c in piece):
                return [self.byte_of[c] for c in piece]
        return list(text.encode("utf-8"))


def _finite(logprob: float | None) -> float:
    return logprob if logprob is not None and logprob > MIN_LOGPROB else MIN_LOGPROB


class _CompletionLogprobs:
    """Builds the completions ``logprobs`` object, in one piece or chunk by chunk: per
    position ``{token: logprob}`` of the request's ``logprobs`` most likely tokens and the
    chosen one (OpenAI: "up to logprobs+1 elements"; two ids of the same text keep the
    better one's)."""

    def __init__(self, texts: TokenTexts):
        self.texts, self.sent, self.offset = texts, 0, 0

    def take(self, out: RequestOutput) -> CompletionLogprobs:
        ids, lps = out.token_ids[self.sent:], (out.logprobs or [])[self.sent:]
        tops = (out.top_logprobs or [])[self.sent:]
        self.sent += len(ids)
        renamed = out.renamed_tokens
        tokens = [self.texts.text(i, renamed) for i in ids]
        offsets = []
        for token in tokens:
            offsets.append(self.offset)
            self.offset += len(token)
        values = [_finite(lp) for lp in lps]
        top_logprobs = []
        for n in range(len(ids)):
            alternatives: dict[str, float] = {}
            for token_id, lp in (tops[n] if n < len(tops) else ()):
                alternatives.setdefault(self.texts.text(token_id, renamed), _finite(lp))
            alternatives.setdefault(tokens[n], values[n])
            top_logprobs.append(alternatives)
        return CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=top_logprobs,
                                  text_offset=offsets)


class _ChatLogprobs:
    def __init__(self, texts: TokenTexts):
        self.texts, self.sent = texts, 0

    def _entry(self, token_id: int, lp: float, renamed) -> TopLogprob:
        text = self.texts.text(token_id, renamed)
        return TopLogprob(token=text, logprob=_finite(lp), bytes=self.texts.bytes(token_id, text, renamed))

    def take(self, out: RequestOutput) -> ChatLogprobs:
        ids, lps = out.token_ids[self.sent:], (out.logprobs or [])[self.sent:]
        tops = (out.top_logprobs or [])[self.sent:]
        self.sent += len(ids)
        renamed = out.renamed_tokens
        content = []
        for n, (token_id, lp) in enumerate(zip(ids, lps)):
            entry = self._entry(token_id, lp, renamed)
            alternatives = [self._entry(i, v, renamed) for i, v in tops[n]] if n < len(tops) else []
            content.append(ChatTokenLogprob(**entry.model_dump(), top_logprobs=alternatives))
        return ChatLogprobs(content=content)


def _token_texts(service: GenerationService) -> TokenTexts:
    return TokenTexts(service.engine.engine.tokenizer)


# ---------------------------------------------------------------- several requests at once


async def _all_or_none(coros: list[Awaitable]) -> list:
    """Run ``coros`` concurrently; their results in order. If one fails, the others are
    cancelled (their engine requests aborted) and its exception is raised."""
    if len(coros) == 1:
        return [await coros[0]]
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _open_streams(service: GenerationService, gens: list[Generation],
                        request: Request) -> list[AsyncIterator[RequestOutput]]:
    if len(gens) == 1:
        return [await service.open_stream(gens[0], request)]
    tasks = [asyncio.ensure_future(service.open_stream(g, request)) for g in gens]
    try:
        return await _all_or_none(tasks)
    except BaseException:
        for task in tasks:   # close the streams that did open: their requests are aborted
            if task.done() and not task.cancelled() and task.exception() is None:
                await task.result().aclose()
        raise


async def _merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(index, output) pairs of several streams as they come; closing it closes them all."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as stream:
            async for out in stream:
                yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for out in stream:
                    queue.put_nowait((index, out, None))
        except Exception as e:
            queue.put_nowait((index, None, e))
            return
        queue.put_nowait((index, None, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, out, error = await queue.get()
            if error is not None:
                raise error
            if out is None:
                running -= 1
                continue
            yield index, out
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# ---------------------------------------------------------------- routes


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
             responses={**ERROR_RESPONSES, **sse_response("CompletionChunk", _STREAM_NOTE % "CompletionChunk")})
async def completions(body: CompletionRequest, request: Request,
                      service: GenerationService = Depends(get_service)):
    service.check_model(body.model)
    gens = [service.params(prompt, body, id_prefix="cmpl", default_temperature=OPENAI_DEFAULT_TEMPERATURE,
                           default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS) for prompt in body.prompts()]
    if body.logprobs is not None:
        gens = [_with_logprobs(g, body.logprobs) for g in gens]
    if body.stream:
        streams = await _open_streams(service, gens, request)
        return event_stream(_completion_chunks(_merge(streams), service, body, len(gens)), request_id_of(request),
                            guard_of(request))
    outs = await _all_or_none([service.complete(g, request) for g in gens])
    groups = [answers_of(out) for out in outs]
    texts = _token_texts(service) if body.logprobs is not None else None
    several = body.n > 1
    choices = [CompletionChoice(index=p * body.n + a.index, text=a.text, finish_reason=a.finish_reason,
                                logprobs=_CompletionLogprobs(texts).take(a) if texts else None,
                                latent_trace=_trace(a, body), answer=a.answer if several else None)
               for p, group in enumerate(groups) for a in group]
    return CompletionResponse(id=outs[0].request_id, created=int(time.time()), model=service.model_name,
                              choices=choices, usage=_usage(groups),
                              majority=[Majority(**majority(g)) for g in groups] if several else None)


@router.post("/v1/chat/completions", response_model=ChatResponse, response_model_exclude_none=True,
             responses={**ERROR_RESPONSES, **sse_response("ChatCompletionChunk",
                                                          _STREAM_NOTE % "ChatCompletionChunk")})
async def chat_completions(body: ChatRequest, request: Request,
                           service: GenerationService = Depends(get_service)):
    service.check_model(body.model)
    if body.max_tokens is None and body.max_completion_tokens is not None:
        body = body.model_copy(update={"max_tokens": body.max_completion_tokens})
    # a tokenizer with a chat template renders the whole conversation; else the last user message
    question = ([{"role": m.role, "content": m.text()} for m in body.messages] if service.has_chat_template
                else body.question())
    gen = service.params(question, body, id_prefix="chatcmpl",
                         default_temperature=OPENAI_DEFAULT_TEMPERATURE)
    if body.logprobs:
        gen = _with_logprobs(gen, body.top_logprobs or 0)
    if body.stream:
        outputs = await service.open_stream(gen, request)
        return event_stream(_chat_chunks(outputs, service, body), request_id_of(request), guard_of(request))
    out = await service.complete(gen, request)
    answers = answers_of(out)
    several = len(answers) > 1
    texts = _token_texts(service) if body.logprobs else None
    choices = [ChatChoice(index=a.index, message=AssistantMessage(content=a.text),
                          logprobs=_ChatLogprobs(texts).take(a) if texts else None,
                          finish_reason=a.finish_reason, latent_trace=_trace(a, body),
                          answer=a.answer if several else None) for a in answers]
    return ChatResponse(id=out.request_id, created=int(time.time()), model=service.model_name,
                        choices=choices, usage=_usage([answers]),
                        majority=Majority(**majority(answers)) if several else None)


def _include_usage(body) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


async def _completion_chunks(outputs: AsyncIterator[tuple[int, RequestOutput]], service: GenerationService,
                             body: CompletionRequest, prompts: int) -> AsyncIterator[dict]:
    """Chunks of ``prompts`` prompts' streams merged; choice ``prompt * n + answer``."""
    created, model = int(time.time()), service.model_name
    texts = _token_texts(service) if body.logprobs is not None else None
    n = prompts * body.n
    logprobs = [_CompletionLogprobs(texts) for _ in range(n)] if texts else None
    finished: dict[int, RequestOutput] = {}
    response_id = None
    async for prompt, out in outputs:
        if not (out.delta or out.finished):
            continue
        index = prompt * body.n + out.index
        response_id = response_id or _response_id(out)
        choice = {"index": index, "text": out.delta, "finish_reason": out.finish_reason,
                  "logprobs": logprobs[index].take(out).model_dump() if logprobs else None}
        if out.finished and body.return_latent_trace:
            choice["latent_trace"] = latent_trace_json(out)
        if out.finished and body.n > 1:
            choice["answer"] = out.answer
        yield {"id": response_id, "object": "text_completion", "created": created, "model": model,
               "choices": [choice]}
        if out.finished:
            finished[index] = out
    if len(finished) == n and _include_usage(body):
        yield {"id": response_id, "object": "text_completion", "created": created, "model": model,
               "choices": [], "usage": _usage([finished[p * body.n + i] for i in range(body.n)]
                                             for p in range(prompts)).model_dump()}


async def _chat_chunks(outputs: AsyncIterator[RequestOutput], service: GenerationService,
                       body: ChatRequest) -> AsyncIterator[dict]:
    created, model = int(time.time()), service.model_name
    texts = _token_texts(service) if body.logprobs else None
    logprobs: dict[int, _ChatLogprobs] = {}
    finished: dict[int, RequestOutput] = {}
    async for out in outputs:
        index = out.index
        head = {"id": _response_id(out), "object": "chat.completion.chunk", "created": created, "model": model}
        if index not in logprobs:  # OpenAI opens every choice's stream with the role
            logprobs[index] = _ChatLogprobs(texts) if texts else None
            yield {**head, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None}]}
        if out.delta:
            choice = {"index": index, "delta": {"content": out.delta}, "finish_reason": None}
            if texts:
                choice["logprobs"] = logprobs[index].take(out).model_dump()
            yield {**head, "choices": [choice]}
        if out.finished:
            finished[index] = out
            choice = {"index": index, "delta": {}, "finish_reason": out.finish_reason}
            if texts:
                choice["logprobs"] = logprobs[index].take(out).model_dump()
            if body.return_latent_trace:
                choice["latent_trace"] = latent_trace_json(out)
            if body.n > 1:
                choice["answer"] = out.answer
            yield {**head, "choices": [choice]}
            if len(finished) == body.n and _include_usage(body):
                yield {**head, "choices": [], "usage": _usage([[finished[i] for i in range(body.n)]]).model_dump()}
