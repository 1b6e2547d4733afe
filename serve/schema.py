"""HTTP request/response models: the OpenAI completions and chat API, plus memory3's documented extras.

Requests are strict (`extra="forbid"`, no type coercion): a misspelt or unsupported OpenAI option is a 400 that
names the field, never silently ignored. The OpenAI fields that evaluation harnesses and serving clients send are
supported with OpenAI's meaning: `seed`, `logprobs` (completions: top-k; chat: `logprobs` + `top_logprobs`), `echo`
with `max_tokens: 0` (scoring a text), and a list of prompts (one choice each). The only extra request field is `memory_mode`; the only extra response
field is `memories` (the references the answer read). Limits that depend on the deployment (prompt length in
tokens, the model's context) are checked by the ingress; the bounds here are absolute ceilings that also appear in
the OpenAPI schema.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MemoryMode = Literal["memory", "none", "rag"]
FinishReason = Literal["stop", "length"]

MAX_PROMPT_CHARS = 200_000  # absolute ceiling; `limits.max_prompt_chars` in configs/serve.yaml is the real one
MAX_TOKENS = 32_768
MAX_STOP = 4
MAX_STOP_CHARS = 64
MAX_PROMPTS = 64  # prompts in one completions request
MAX_LOGPROBS, MAX_TOP_LOGPROBS = 5, 20  # OpenAI's limits: completions' `logprobs`, chat's `top_logprobs`


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Loose(BaseModel):
    """Responses: extra fields allowed, so OpenAI clients and our own tests parse them the same way."""

    model_config = ConfigDict(extra="allow")


StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None
_stop_field = Field(None, description=f"Up to {MAX_STOP} strings; the text ends before the first one found.")


class StreamOptions(StrictModel):
    include_usage: bool = False


class SamplingFields(StrictModel):
    """Options shared by both endpoints (OpenAI names and meanings)."""

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS, description="Tokens to generate (default: config).")
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False, description="0 = greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: Stop = _stop_field
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="Only one choice per request is supported.")
    seed: int | None = Field(None, ge=-2**63, lt=2**64,
                             description="Sampling seed of this request: the same seed and input give the same "
                                         "tokens, whatever else the server is decoding.")
    user: str | None = Field(None, max_length=256)
    memory_mode: MemoryMode | None = Field(
        None, description="memory3 extra. 'memory' (default with a bank): explicit memory read in the memory "
                          "layers; 'none': plain decoding; 'rag': the retrieved reference texts are prepended to "
                          "the prompt.")

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


PromptText = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]


class CompletionRequest(SamplingFields):
    prompt: PromptText | Annotated[list[PromptText], Field(min_length=1, max_length=MAX_PROMPTS)] = Field(
        description=f"A string, or up to {MAX_PROMPTS} strings answered as choices in order (`index`).")
    max_tokens: int | None = Field(None, ge=0, le=MAX_TOKENS,
                                   description="Tokens to generate (default: config); 0 with `echo` scores the prompt.")
    echo: bool = Field(False, description="The choice's text (and logprobs) start with the prompt.")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description="Report each token's logprob and this many most likely alternatives.")

    def prompt_list(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ChatMessage(StrictModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)
    name: str | None = Field(None, max_length=64)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS, description="Alias of max_tokens.")
    logprobs: bool = Field(False, description="Report each generated token's logprob.")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                     description="With `logprobs`: this many most likely alternatives per token.")


class MemoryRef(Loose):
    """One reference the answer read: its bank id, a text snippet and the 64-token windows that used it."""

    id: str
    text: str
    windows: list[int] = Field(default_factory=list)


class Usage(Loose):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(Loose):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(Loose):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None


class CompletionResponse(Loose):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    memories: list[MemoryRef] | None = None


class AssistantMessage(Loose):
    role: Literal["assistant"] = "assistant"
    content: str


class TokenLogprob(Loose):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TokenLogprob):
    top_logprobs: list[TokenLogprob]


class ChatLogprobs(Loose):
    content: list[ChatTokenLogprob] | None


class ChatChoice(Loose):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None


class ChatCompletionResponse(Loose):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    memories: list[MemoryRef]


class ModelCard(Loose):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "memory3"


class ModelList(Loose):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Document(StrictModel):
    id: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:\-]+$",
                    description="Document id; its references get ids '<id>#<chunk>'.")
    text: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)


class AddMemoriesRequest(StrictModel):
    documents: list[Document] = Field(min_length=1, max_length=1024)


class AddMemoriesResponse(Loose):
    object: Literal["list"] = "list"
    ids: list[str] = Field(description="New reference ids, in document order.")
    bank_version: str


class DeleteMemoryResponse(Loose):
    id: str
    object: Literal["memory"] = "memory"
    deleted: bool
    bank_version: str


class CompactionFailure(Loose):
    shard: str
    error: str


class CompactMemoriesResponse(Loose):
    object: Literal["bank.compaction"] = "bank.compaction"
    ok: bool = Field(description="False when a shard failed its checks and still holds deleted rows.")
    generation: int = Field(description="Compactions the bank has had; rows are renumbered by each.")
    shards_rewritten: int
    removed_references: int = Field(description="Deleted references whose bytes left the bank's files.")
    references: int
    failed_shards: list[CompactionFailure] = Field(description="Shards left as they were, with the reason.")
    bank_version: str


class ErrorDetail(Loose):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(Loose):
    error: ErrorDetail


class Health(Loose):
    status: Literal["ok"]
    model: str
    memory: bool
