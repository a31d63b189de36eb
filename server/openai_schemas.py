"""Bodies of the OpenAI-compatible routes (``/v1/completions``, ``/v1/chat/completions``).

Unknown fields are ignored (OpenAI clients send fields such as ``user``); fields of
OpenAI's API that the server cannot honour answer 422 naming the field and saying it is
not supported, rather than being silently dropped: ``best_of`` above 1,
``echo``, ``suffix``, ``logit_bias``, ``presence_penalty`` / ``frequency_penalty`` other
than 0, and on chat ``tools``, ``tool_choice``, ``functions``, ``function_call``,
``parallel_tool_calls``, ``response_format`` other than text, ``audio``, ``modalities``
other than text, ``prediction``, ``web_search_options``, ``reasoning_effort``,
``verbosity``, ``store: true``, and messages' ``tool_calls`` / ``function_call`` and
non-text parts. Each is accepted as null or as the value that asks for nothing
(``tools: []``, ``tool_choice: "none"``, ``response_format: {"type": "text"}``, ...:
``_Refusals``). The latent options (``latent``, with its feedback's ``noise``,
``return_latent_trace``, ``latent_trace_top_k``), ``mixture`` (Mixture of Inputs) and
``top_k`` / ``ignore_eos`` are
accepted as extra body fields (the ``openai`` package's ``extra_body``). Defaults follow
OpenAI: temperature 1.0; ``max_tokens`` 16 for completions (``engine.params``:
``OPENAI_DEFAULT_TEMPERATURE``, ``OPENAI_COMPLETIONS_DEFAULT_MAX_TOKENS``; the other
bounds are those of ``/v1/reason``, from the same module). Booleans and numbers are
strict (``"stream": 0``, ``"seed": false``, ``"n": 1.0`` are 422s).

Log-probabilities (completions ``logprobs: N``, chat ``logprobs: true`` and
``top_logprobs: N``) are those of the chosen tokens under the model's unmodified
distribution (before temperature, top-k and top-p), one per generated token (the
``completion_tokens`` of ``usage``; an end-of-sequence token is not generated text and
has none). Each position's ``top_logprobs`` holds the N most likely tokens of that same
distribution (the engine's ``SamplingParams.top_logprobs``), best first: on chat exactly
those (N up to 20), on completions those and the chosen token (N up to 5; "up to N + 1
elements", as OpenAI says). A token never sampled (a checkpoint's ``suppress_token_ids``)
is never one. Tokens are named as the text names them: a symbols model's tokens of the
question's names in the question's words, ``bytes`` their UTF-8.

``prompt`` may be a list of strings (up to ``MAX_PROMPTS``): one choice per prompt, with
its ``index``, generated concurrently in the engine's batch (lm-eval's ``--batch_size``
sends that). ``n`` (up to ``engine.params.MAX_SAMPLES`` and the server's batch size) asks
for n choices per prompt, which share its prefill and its latent thoughts (choice
``prompt_index * n + i`` samples with ``seed + i``); each choice then also carries its
``answer`` and the response a ``majority`` vote (chat: one; completions: one per prompt).
Usage counts each prompt and its thoughts once and every choice's tokens.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationInfo,
                      field_validator, model_validator)
from pydantic_core import PydanticCustomError

from engine.params import MIN_MAX_TOKENS
from server.schemas import FinishReason, LatentThought, Majority, PromptTokensDetails, SamplingFields

MAX_PROMPTS = 256
MAX_COMPLETION_LOGPROBS = 5     # OpenAI's limit for /v1/completions `logprobs`
MAX_CHAT_TOP_LOGPROBS = 20      # OpenAI's limit for /v1/chat/completions `top_logprobs`
MAX_CHOICES = 1                 # `best_of`: no ranking of several candidates

Prompt = Annotated[str, Field(min_length=1)]


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


def _not_supported(field: str, why: str) -> PydanticCustomError:
    return PydanticCustomError("not_supported", "{field} is not supported by this server: {why}",
                               {"field": field, "why": why})


def _neutral(value: Any, neutral: tuple) -> bool:
    """``value`` asks for nothing: null, or one of ``neutral`` (same JSON type: ``false`` is not 0)."""
    return value is None or any(type(value) is type(n) and value == n for n in neutral)


class _Refusals:
    """Fields of OpenAI's API this server does not honour. Each is declared (so the OpenAPI
    schema lists it and says so) and accepted only with a value that asks for nothing
    (``NEUTRAL``: null, and e.g. ``tools: []``, ``tool_choice: "none"``,
    ``response_format: {"type": "text"}``); any other value is a 422 naming the field and
    saying it is not supported, rather than an answer that silently ignores it."""

    #: field -> (the values accepted as asking for nothing, what to say)
    NEUTRAL: ClassVar[dict[str, tuple[tuple, str]]] = {}

    @classmethod
    def refuse(cls, value: Any, info: ValidationInfo) -> Any:
        neutral, why = cls.NEUTRAL[info.field_name]
        if not _neutral(value, neutral):
            raise _not_supported(info.field_name, why)
        return value


def _unsupported(why: str) -> Any:
    return Field(None, description=f"not supported ({why}); only null or a value that asks for nothing "
                                   "is accepted, anything else is a 422")


_NO_TOOLS = "the model calls no tools and writes no function calls"
_BASE_REFUSED = {
    "logit_bias": (({},), "the engine applies no logit bias (only {} is accepted)"),
    "presence_penalty": ((0.0,), "the engine applies no penalties (only 0 is accepted)"),
    "frequency_penalty": ((0.0,), "the engine applies no penalties (only 0 is accepted)"),
}


class _OpenAIBase(SamplingFields, _Refusals):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    NEUTRAL: ClassVar = _BASE_REFUSED

    model: str | None = Field(None, description="must name the served model when given")
    stream: StrictBool = Field(False, description="reply with server-sent events")
    stream_options: StreamOptions | None = None
    presence_penalty: StrictFloat | None = Field(None, description="not supported: only 0 is accepted")
    frequency_penalty: StrictFloat | None = Field(None, description="not supported: only 0 is accepted")
    logit_bias: Any = _unsupported("no logit bias is applied; only {} is accepted")
    user: str | None = None

    @field_validator("logit_bias", "presence_penalty", "frequency_penalty")
    @classmethod
    def _refused(cls, value: Any, info: ValidationInfo) -> Any:
        return cls.refuse(value, info)


class CompletionRequest(_OpenAIBase):
    NEUTRAL: ClassVar = {**_BASE_REFUSED,
                         "echo": ((False,), "the prompt is not echoed (only false is accepted)"),
                         "suffix": (("",), "no text is inserted after the completion")}

    prompt: Prompt | Annotated[list[Prompt], Field(min_length=1, max_length=MAX_PROMPTS)] = Field(
        description=f"the question, or a list of up to {MAX_PROMPTS} questions (one choice each)")
    logprobs: StrictInt | None = Field(
        None, ge=0, le=MAX_COMPLETION_LOGPROBS,
        description="return the chosen tokens' log-probabilities and, per position, the `logprobs` most "
                    "likely tokens and the chosen one (top_logprobs)")
    echo: StrictBool | None = Field(None, description="not supported: only false is accepted")
    best_of: StrictInt | None = Field(None, ge=1, description=f"only {MAX_CHOICES} is supported")
    suffix: Any = _unsupported("no text is inserted after the completion")

    @field_validator("echo", "suffix")
    @classmethod
    def _refused_here(cls, value: Any, info: ValidationInfo) -> Any:
        return cls.refuse(value, info)

    @field_validator("best_of")
    @classmethod
    def _best_of_one(cls, value: int | None) -> int | None:
        if value is not None and value > MAX_CHOICES:
            raise _not_supported("best_of", f"best_of={value}; only best_of={MAX_CHOICES} is")
        return value

    def prompts(self) -> list[str]:
        return list(self.prompt) if isinstance(self.prompt, list) else [self.prompt]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: Any = Field(None, description=f"not supported ({_NO_TOOLS}): only null or [] is accepted")
    function_call: Any = Field(None, description=f"not supported ({_NO_TOOLS}): only null is accepted")

    @field_validator("tool_calls", "function_call")
    @classmethod
    def _no_calls(cls, value: Any, info: ValidationInfo) -> Any:
        if not _neutral(value, ([],)):
            raise _not_supported(info.field_name, _NO_TOOLS)
        return value

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


_CHAT_REFUSED = {
    "tools": (([],), _NO_TOOLS + " (only [] is accepted)"),
    "tool_choice": (("none",), _NO_TOOLS + " (only \"none\" is accepted)"),
    "functions": (([],), _NO_TOOLS + " (only [] is accepted)"),
    "function_call": (("none",), _NO_TOOLS + " (only \"none\" is accepted)"),
    "parallel_tool_calls": ((), _NO_TOOLS),
    "response_format": (({"type": "text"},), "the answer is plain text; no JSON mode or schema is "
                        "enforced (only {\"type\": \"text\"} is accepted)"),
    "audio": ((), "the model reads and writes text only"),
    "modalities": ((["text"],), "the model reads and writes text only (only [\"text\"] is accepted)"),
    "prediction": ((), "no predicted output is used"),
    "web_search_options": ((), "the server searches nothing"),
    "reasoning_effort": ((), "the reasoning is continuous thoughts: set `latent` (thoughts, max_thoughts) "
                         "instead"),
    "verbosity": ((), "the answer's length is the model's (set max_tokens)"),
    "store": ((False,), "nothing is stored (only false is accepted)"),
}


class ChatRequest(_OpenAIBase):
    NEUTRAL: ClassVar = {**_BASE_REFUSED, **_CHAT_REFUSED}

    tools: Any = _unsupported(_NO_TOOLS)
    tool_choice: Any = _unsupported(_NO_TOOLS)
    functions: Any = _unsupported(_NO_TOOLS)
    function_call: Any = _unsupported(_NO_TOOLS)
    parallel_tool_calls: Any = _unsupported(_NO_TOOLS)
    response_format: Any = _unsupported("plain text only: {\"type\": \"text\"}")
    audio: Any = _unsupported("text only")
    modalities: Any = _unsupported("text only: [\"text\"]")
    prediction: Any = _unsupported("no predicted outputs")
    web_search_options: Any = _unsupported("no web search")
    reasoning_effort: Any = _unsupported("set `latent` instead")
    verbosity: Any = _unsupported("set max_tokens instead")
    store: Any = _unsupported("nothing is stored: only false")

    @field_validator(*_CHAT_REFUSED)
    @classmethod
    def _refused_here(cls, value: Any, info: ValidationInfo) -> Any:
        return cls.refuse(value, info)

    messages: list[ChatMessage] = Field(min_length=1, description="the last user message is the question")
    max_completion_tokens: StrictInt | None = Field(None, ge=MIN_MAX_TOKENS, description="alias of max_tokens")
    logprobs: StrictBool | None = Field(None, description="return the chosen tokens' log-probabilities")
    top_logprobs: StrictInt | None = Field(
        None, ge=0, le=MAX_CHAT_TOP_LOGPROBS,
        description="with logprobs: the most likely tokens per position, with their log-probabilities")

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> "ChatRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @field_validator("messages")
    @classmethod
    def _has_question(cls, messages: list[ChatMessage]):
        users = [m for m in messages if m.role == "user"]
        if not users or not users[-1].text().strip():
            raise ValueError("the messages must contain a user message with non-empty text "
                             "(the last one is the question)")
        return messages

    def question(self) -> str:
        return [m for m in self.messages if m.role == "user"][-1].text()


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    latent_thoughts: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: one entry per generated token in each list."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] = Field(description="per position, {token: logprob} of the "
                                                 "`logprobs` most likely tokens and the chosen one")
    text_offset: list[int] = Field(description="where each token's text starts in the choice's text")


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None
    latent_trace: list[LatentThought] | None = None
    answer: str | None = Field(None, description="with n > 1: the text after the answer prefix")


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage
    majority: list[Majority] | None = Field(None, description="with n > 1: each prompt's vote, in prompt order")


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = Field(description="the token's UTF-8 bytes")


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(description="the request's top_logprobs most likely tokens at "
                                           "this position, best first (empty for 0)")


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None
    latent_trace: list[LatentThought] | None = None
    answer: str | None = Field(None, description="with n > 1: the text after the answer prefix")


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage
    majority: Majority | None = Field(None, description="with n > 1: the most frequent answer")


# ---------------------------------------------------------------- stream events


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None
    latent_trace: list[LatentThought] | None = None


class CompletionChunk(BaseModel):
    """One server-sent event of a streamed /v1/completions reply (``data: {...}``); with
    ``stream_options.include_usage`` a last one has no choices and the usage."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: CompletionUsage | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None
    logprobs: ChatLogprobs | None = None
    latent_trace: list[LatentThought] | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed /v1/chat/completions reply (``data: {...}``);
    with ``stream_options.include_usage`` a last one has no choices and the usage."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: CompletionUsage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "coconut-serve"
    max_model_len: int
    coconut: dict[str, Any] = Field(description="latent defaults from the checkpoint's coconut.json")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
