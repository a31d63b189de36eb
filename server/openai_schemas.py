"""Bodies of the OpenAI-compatible routes (``/v1/completions``, ``/v1/chat/completions``).

Unknown fields are ignored (OpenAI clients send fields such as ``user``); fields we
know but cannot honour (``n > 1``, ``echo``, ``best_of``, ``suffix``, non-text message
parts) answer 422 rather than being silently dropped. The latent options (``latent``,
``return_latent_trace``, ``latent_trace_top_k``) and ``top_k`` / ``ignore_eos`` are
accepted as extra body fields (the ``openai`` package's ``extra_body``). Defaults follow
OpenAI: temperature 1.0; ``max_tokens`` 16 for completions (``engine.params``:
``OPENAI_DEFAULT_TEMPERATURE``, ``OPENAI_COMPLETIONS_DEFAULT_MAX_TOKENS``; the other
bounds are those of ``/v1/reason``, from the same module). Booleans are strict
(``"stream": 0`` is a 422).

Log-probabilities (completions ``logprobs: N``, chat ``logprobs: true`` and
``top_logprobs: N``) are those of the chosen tokens under the model's unmodified
distribution (before temperature, top-k and top-p), one per generated token (the
``completion_tokens`` of ``usage``; an end-of-sequence token is not generated text and
has none). The engine computes the chosen token's log-probability only, so each
position's ``top_logprobs`` holds that one token (whatever N asks for, as vLLM does for
N = 0), not the N most likely ones.

``prompt`` may be a list of strings (up to ``MAX_PROMPTS``): one choice per prompt, with
its ``index``, generated concurrently in the engine's batch (lm-eval's ``--batch_size``
sends that).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator

from engine.params import MIN_MAX_TOKENS
from server.schemas import FinishReason, LatentThought, SamplingFields

MAX_PROMPTS = 256
MAX_COMPLETION_LOGPROBS = 5     # OpenAI's limit for /v1/completions `logprobs`
MAX_CHAT_TOP_LOGPROBS = 20      # OpenAI's limit for /v1/chat/completions `top_logprobs`
MAX_PENALTY = 2.0               # OpenAI's range for presence_penalty / frequency_penalty: [-2, 2]
MAX_CHOICES = 1                 # `n` and `best_of`: one choice per prompt

Prompt = Annotated[str, Field(min_length=1)]


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _OpenAIBase(SamplingFields):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = Field(None, description="must name the served model when given")
    stream: StrictBool = Field(False, description="reply with server-sent events")
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="only 1 is supported (for several completions of "
                   "different prompts, send `prompt` as a list)")
    presence_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY, description="accepted, not applied")
    frequency_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY, description="accepted, not applied")
    user: str | None = None


class CompletionRequest(_OpenAIBase):
    prompt: Prompt | Annotated[list[Prompt], Field(min_length=1, max_length=MAX_PROMPTS)] = Field(
        description=f"the question, or a list of up to {MAX_PROMPTS} questions (one choice each)")
    logprobs: StrictInt | None = Field(
        None, ge=0, le=MAX_COMPLETION_LOGPROBS,
        description="return the chosen tokens' log-probabilities; top_logprobs holds the chosen "
                    "token only (the engine computes no other)")
    echo: StrictBool = Field(False, description="not supported (must be false)")
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)
    suffix: None = None

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported")
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

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_OpenAIBase):
    messages: list[ChatMessage] = Field(min_length=1, description="the last user message is the question")
    max_completion_tokens: int | None = Field(None, ge=MIN_MAX_TOKENS, description="alias of max_tokens")
    logprobs: StrictBool | None = Field(None, description="return the chosen tokens' log-probabilities")
    top_logprobs: StrictInt | None = Field(
        None, ge=0, le=MAX_CHAT_TOP_LOGPROBS,
        description="with logprobs: alternatives per position; the engine computes the chosen "
                    "token's log-probability only, so the list holds that one token when > 0")

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


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: one entry per generated token in each list."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] = Field(description="per position, {token: logprob} of the "
                                                 "chosen token (the engine computes no other)")
    text_offset: list[int] = Field(description="where each token's text starts in the choice's text")


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None
    latent_trace: list[LatentThought] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = Field(description="the token's UTF-8 bytes")


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(description="empty unless top_logprobs > 0; then the chosen "
                                           "token only (the engine computes no other)")


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


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage


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
