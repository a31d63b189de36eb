"""Bodies of the OpenAI-compatible routes (``/v1/completions``, ``/v1/chat/completions``).

Unknown fields are ignored (OpenAI clients send fields such as ``user``); fields we
know but cannot honour (``n > 1``, ``echo``, ``logprobs``, ``best_of``, ``suffix``,
non-text message parts) answer 422 rather than being silently dropped. The latent
options (``latent``, ``return_latent_trace``, ``latent_trace_top_k``) and ``top_k`` /
``ignore_eos`` are accepted as extra body fields (the ``openai`` package's
``extra_body``). Defaults follow OpenAI: temperature 1.0; ``max_tokens`` 16 for
completions.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.schemas import LatentThought, SamplingFields


class StreamOptions(BaseModel):
    include_usage: bool = False


class _OpenAIBase(SamplingFields):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = Field(None, description="must name the served model when given")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    logprobs: None = Field(None, description="not supported (must be null)")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="accepted, not applied")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="accepted, not applied")
    user: str | None = None


class CompletionRequest(_OpenAIBase):
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]], Field(
        min_length=1, max_length=1)] = Field(description="the question (one string, or a list of exactly one)")
    echo: Literal[False] = False
    best_of: int | None = Field(None, ge=1, le=1)
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError(f"exactly one prompt is supported, got {len(value)}")
            value = value[0]
        if not value:
            raise ValueError("the prompt must be a non-empty string")
        return value


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
    max_completion_tokens: int | None = Field(None, ge=1, description="alias of max_tokens")

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


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None
    latent_trace: list[LatentThought] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None
    latent_trace: list[LatentThought] | None = None


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage


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
