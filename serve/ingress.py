"""The HTTP ingress: OpenAI-compatible completions and chat (with streaming), model list, health, admin API.

The ingress owns text: it validates requests (serve/schema.py), renders chat and RAG prompts (serve/prompts.py),
tokenizes, checks the context budget, and turns the generator's token events back into text with stop strings
(serve/text_stream.py). The generator only sees token ids. Every answer carries `memories`: the references read.
A list of prompts becomes one generator call each, all at once, so the engine batches them; logprobs (and the
prompt's own, for `echo`) come from the engine's decode path and are named by serve/logprobs.py.

Memory modes (request field `memory_mode`): "memory" — explicit memory, retrieved per 64-token window by the
generator (paper §3.1); "none" — plain decoding; "rag" — references retrieved once with the prompt and prepended
as text (the paper's RAG baseline, §7.4).
"""
import asyncio
import hmac
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPBearer
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.util.metrics import Counter, Histogram

from bank.checkpoints import load_tokenizer, local_checkpoint
from model.checkpoint import load_config
from model.prompts import CHAT_STOP, chat_query, rag_prompt, render_chat
from serve.bank_version import CurrentVersion
from serve.errors import APIError, install_error_handlers
from serve.logprobs import TokenLogprobs, chat_logprobs, completion_logprobs
from serve.schema import (AddMemoriesRequest, AddMemoriesResponse, ChatCompletionRequest, ChatCompletionResponse,
                          CompactMemoriesResponse, CompletionRequest, CompletionResponse, DeleteMemoryResponse,
                          ErrorResponse, Health, MemoryMode, ModelList, SamplingFields)
from serve.text_stream import TextStream

app = FastAPI(
    title="memory3", version="0.1.0",
    description="OpenAI-compatible completions with explicit memory (Memory³, arXiv 2407.01178). "
                "See docs/serving.md.")
install_error_handlers(app)
bearer = HTTPBearer(auto_error=False, description="MEMORY3_ADMIN_TOKEN")  # documents the scheme; `guard` checks it


def _errors(*codes: int) -> dict:
    return {c: {"model": ErrorResponse} for c in codes}


SSE = {"text/event-stream": {"schema": {  # one server-sent event (OpenAPI < 3.2: the schema describes each event)
    "type": "object", "required": ["data"],
    "properties": {"data": {"type": "string", "description": "a JSON chunk in OpenAI's format, or [DONE]"},
                   "event": {"type": "string"}}}}}


def admin_auth_error(request: Request) -> APIError | None:
    """The admin API's bearer token check (None: allowed)."""
    token = getattr(request.app.state, "admin_token", None)
    if not token:
        return APIError(403, "the admin API is disabled: set MEMORY3_ADMIN_TOKEN (or admin_token in the serve "
                             "config) to enable it", code="admin_disabled")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        return APIError(401, "missing admin token: send 'Authorization: Bearer <MEMORY3_ADMIN_TOKEN>'",
                        code="missing_token")
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        return APIError(401, "invalid admin token", code="invalid_token")
    return None


@app.middleware("http")
async def guard(request: Request, call_next):
    """Checks that come before the body is read: its size (413, so a huge upload cannot tie up the replica) and
    the admin token (401/403 whatever the body holds)."""
    limit = getattr(request.app.state, "max_body_bytes", None)
    length = request.headers.get("content-length")
    if limit and length and length.isdigit() and int(length) > limit:
        return APIError(413, f"request body of {length} bytes exceeds the limit of {limit}",
                        code="body_too_large").response()
    if request.url.path.startswith("/v1/memories"):
        error = admin_auth_error(request)
        if error is not None:
            return error.response()
    return await call_next(request)


@dataclass
class Job:
    """A validated request, ready for the generator."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    mode: str
    bank_version: str | None
    stream: bool
    include_usage: bool
    chat: bool
    seed: int | None = None
    logprobs: int | None = None  # top-k alternatives per token; None: no logprobs
    echo_tokens: int = 0  # score this many last prompt tokens (the user's prompt): `echo` with `logprobs`
    memories: dict = field(default_factory=dict)  # id -> {"id", "text", "windows"}, in order of first use
    completion_tokens: int = 0
    prompt_scored: TokenLogprobs = field(default_factory=TokenLogprobs)
    generated: TokenLogprobs = field(default_factory=TokenLogprobs)
    started: float = field(default_factory=time.perf_counter)

    def engine_args(self) -> dict:
        return {"prompt": self.prompt_ids, "max_tokens": self.max_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "memory": self.mode == "memory", "bank_version": self.bank_version,
                "seed": self.seed, "logprobs": self.logprobs, "prompt_logprobs": self.echo_tokens > 0}

    def restart(self, memories: dict) -> None:
        """Back to the state before decoding, for a retry on another replica."""
        self.memories, self.completion_tokens = dict(memories), 0
        self.prompt_scored, self.generated = TokenLogprobs(), TokenLogprobs()

    def add_memories(self, refs: list[dict], window: int | None, snippet_chars: int) -> None:
        for ref in refs:
            entry = self.memories.setdefault(ref["id"], {"id": ref["id"], "text": ref["text"][:snippet_chars],
                                                         "windows": []})
            if window is not None and window not in entry["windows"]:
                entry["windows"].append(window)

    def memory_list(self) -> list[dict]:
        return list(self.memories.values())


class _ReplicaFailed(Exception):
    """The generator replica serving a request died or vanished."""


async def _resolve(response):
    return await response


def _usage(*jobs: Job) -> dict:
    prompt, completion = sum(len(j.prompt_ids) for j in jobs), sum(j.completion_tokens for j in jobs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _memory_union(jobs: list[Job]) -> list[dict]:
    """The references any of the jobs read, in prompt order then order of first use."""
    union: dict[str, dict] = {}
    for job in jobs:
        for ref in job.memory_list():
            union.setdefault(ref["id"], ref)
    return list(union.values())


MODE_QUERY = Query(None, description="memory_mode for clients that cannot add a body field (e.g. lm-eval's "
                                     "base_url); the body's memory_mode, if given, must agree.")


def _with_query_mode(body: SamplingFields, mode: str | None) -> SamplingFields:
    """The URL's `?memory_mode=` fills in the body's; evaluation harnesses can only vary the URL per run."""
    if mode is None:
        return body
    if body.memory_mode is not None and body.memory_mode != mode:
        raise APIError(400, f"memory_mode is {body.memory_mode!r} in the body but {mode!r} in the URL",
                       param="memory_mode", code="conflicting_memory_mode")
    return body.model_copy(update={"memory_mode": mode})


def _unsupported(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="unsupported_parameter")


def _openapi_without_422() -> dict:
    """FastAPI documents a 422 for every body; this API answers 400 instead (OpenAI's convention)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path in schema.get("paths", {}).values():
            for op in path.values():
                op.get("responses", {}).pop("422", None)
        app.openapi_schema = schema
    return app.openapi_schema


app.openapi = _openapi_without_422


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    def __init__(self, settings: dict, generator: DeploymentHandle, retriever: DeploymentHandle | None = None,
                 memory_store: DeploymentHandle | None = None, writer: DeploymentHandle | None = None):
        self.settings = settings
        self.limits, self.defaults = settings["limits"], settings["defaults"]
        self.model_name = settings["model_name"]
        self.tokenizer = load_tokenizer(settings["checkpoint"])
        self.model_cfg = load_config(local_checkpoint(settings["checkpoint"]))
        self.generator, self.retriever, self.memory_store, self.writer = generator, retriever, memory_store, writer
        self.bank_version = CurrentVersion(lambda: self.writer.current_version.remote())
        self.has_bank = retriever is not None
        self.created = int(time.time())
        app.state.admin_token = os.environ.get("MEMORY3_ADMIN_TOKEN") or settings.get("admin_token") or None
        app.state.max_body_bytes = self.limits["max_body_bytes"]
        for request_schema in ("CompletionRequest", "ChatCompletionRequest"):  # document the one model served
            app.openapi()["components"]["schemas"][request_schema]["properties"]["model"]["enum"] = [self.model_name]
        self.requests = Counter("memory3_serve_requests_total", description="Completion requests served.",
                                tag_keys=("mode",))
        self.generated = Counter("memory3_serve_generated_tokens_total", description="Tokens generated.")
        self.ttft = Histogram("memory3_serve_time_to_first_token_seconds",
                              description="From request arrival to the first generated token.",
                              boundaries=[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30])

    # --- health and models -------------------------------------------------------------------------------------
    @app.get("/healthz", response_model=Health, responses=_errors(503))
    async def healthz(self) -> Health:
        """200 once every deployment behind the endpoint answers."""
        checks = [self.generator.ping.remote()]
        if self.has_bank:
            checks += [self.retriever.info.remote(), self.memory_store.stats.remote(),
                       self.writer.current_version.remote()]
        try:
            await asyncio.wait_for(asyncio.gather(*(_resolve(c) for c in checks)), timeout=10)
        except Exception as e:
            raise APIError(503, f"not ready: {type(e).__name__}: {e}", code="not_ready") from None
        return Health(status="ok", model=self.model_name, memory=self.has_bank)

    @app.get("/v1/models", response_model=ModelList)
    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "memory3"}]}

    # --- completions -------------------------------------------------------------------------------------------
    @app.post("/v1/completions", response_model=CompletionResponse,
              responses={200: {"content": SSE}, **_errors(400, 404, 413, 503)})
    async def completions(self, body: CompletionRequest, memory_mode: MemoryMode | None = MODE_QUERY):
        body = _with_query_mode(body, memory_mode)
        prompts = body.prompt_list()
        if body.stream and (len(prompts) > 1 or body.echo or body.logprobs is not None):
            raise _unsupported("stream", "streaming supports one prompt without echo or logprobs; send stream: "
                                         "false for a list of prompts, echo or logprobs")
        jobs = await asyncio.gather(*(self._prepare(body, p, p, "prompt", chat=False) for p in prompts))
        for prompt, job in zip(prompts, jobs):
            job.logprobs = body.logprobs
            if body.echo and body.logprobs is not None:
                job.echo_tokens = self._echo_length(job, prompt)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return StreamingResponse(self._sse(jobs[0], rid, created), media_type="text/event-stream")
        outcomes = await asyncio.gather(*(self._collect(job) for job in jobs))
        choices = []
        for index, (prompt, job, (text, finish)) in enumerate(zip(prompts, jobs, outcomes)):
            logprobs = None
            if body.logprobs is not None:
                logprobs = completion_logprobs(self.tokenizer, job.prompt_scored + job.generated,
                                               0 if body.echo else len(prompt))
            choices.append({"index": index, "text": prompt + text if body.echo else text, "logprobs": logprobs,
                            "finish_reason": finish})
        return {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                "choices": choices, "usage": _usage(*jobs), "memories": _memory_union(jobs)}

    def _echo_length(self, job: Job, prompt: str) -> int:
        """How many of the model's prompt tokens are the user's prompt (after the sink and any RAG references)."""
        ids = self.tokenizer.encode(prompt)
        if job.prompt_ids[-len(ids):] != ids:  # a RAG prompt that starts with whitespace merges into the references
            raise APIError(400, "echo with logprobs in memory_mode 'rag' needs a prompt that does not start with "
                                "whitespace", param="prompt", code="unsupported_parameter")
        return len(ids)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse,
              responses={200: {"content": SSE}, **_errors(400, 404, 413, 503)})
    async def chat_completions(self, body: ChatCompletionRequest, memory_mode: MemoryMode | None = MODE_QUERY):
        body = _with_query_mode(body, memory_mode)
        messages = [m.model_dump() for m in body.messages]
        if body.max_tokens is None and body.max_completion_tokens is not None:
            body = body.model_copy(update={"max_tokens": body.max_completion_tokens})
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        if body.stream and body.logprobs:
            raise _unsupported("stream", "streaming does not report logprobs; send stream: false")
        job = await self._prepare(body, render_chat(messages), chat_query(messages), "messages", chat=True)
        job.logprobs = (body.top_logprobs or 0) if body.logprobs else None
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if job.stream:
            return StreamingResponse(self._sse(job, rid, created), media_type="text/event-stream")
        text, finish = await self._collect(job)
        logprobs = chat_logprobs(self.tokenizer, job.generated) if body.logprobs else None
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                             "finish_reason": finish}],
                "usage": _usage(job), "memories": job.memory_list()}

    async def _prepare(self, body: SamplingFields, text: str, query: str, param: str, chat: bool) -> Job:
        if body.model != self.model_name:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        if len(text) > self.limits["max_prompt_chars"]:
            raise APIError(400, f"{param} has {len(text)} characters, more than the limit of "
                                f"{self.limits['max_prompt_chars']}", param=param, code="prompt_too_long")
        stops = body.stop_list()  # the schema bounds their number and length
        mode = body.memory_mode or (self.defaults["memory_mode"] if self.has_bank else "none")
        if mode != "none" and not self.has_bank:
            raise APIError(400, f"memory_mode {mode!r} needs a memory bank; this server has none (use 'none')",
                           param="memory_mode", code="no_memory_bank")
        max_tokens = self.defaults["max_tokens"] if body.max_tokens is None else body.max_tokens
        if max_tokens > self.limits["max_tokens"]:
            raise APIError(400, f"max_tokens={max_tokens} exceeds the limit of {self.limits['max_tokens']}",
                           param="max_tokens", code="max_tokens_too_large")
        job = Job([], max_tokens, body.temperature, body.top_p, stops + (CHAT_STOP if chat else []), mode, None,
                  body.stream, bool(body.stream_options and body.stream_options.include_usage), chat, body.seed)
        if mode != "none":
            job.bank_version = await self.bank_version.get()
        if mode == "rag":
            text = await self._rag_text(job, text, query, max_tokens)
        job.prompt_ids = self.tokenizer.context_ids(text)
        budget = self.model_cfg.max_seq_len
        if len(job.prompt_ids) + max_tokens > budget:
            raise APIError(400, f"this model's context is {budget} tokens; the prompt takes {len(job.prompt_ids)} "
                                f"(with the sink) and max_tokens asks {max_tokens} more", param=param,
                           code="context_length_exceeded")
        self.requests.inc(tags={"mode": mode})
        return job

    async def _rag_text(self, job: Job, text: str, query: str, max_tokens: int) -> str:
        """The paper's RAG baseline (§7.4): one retrieval with the question, reference texts before it; references
        are dropped from the least relevant on until the prompt fits the context."""
        hits = await self.retriever.search.remote(query, self.model_cfg.refs_per_window, job.bank_version)
        budget = self.model_cfg.max_seq_len - max_tokens
        while hits and len(self.tokenizer.context_ids(rag_prompt([h["text"] for h in hits], text))) > budget:
            hits = hits[:-1]
        job.add_memories(hits, None, self.limits["snippet_chars"])
        return rag_prompt([h["text"] for h in hits], text)

    async def _decode(self, job: Job) -> AsyncIterator[tuple[str, str | None]]:
        """(new text, finish reason or None) as the generator produces tokens. A generator replica that dies
        before this request produced any text is retried on another (or its restarted) replica; after that the
        request fails with a 503 and the endpoint carries on."""
        memories = dict(job.memories)  # RAG references chosen before decoding survive a retry
        for attempt in range(self.settings["replica_failure_retries"] + 1):
            produced = False
            try:
                async for piece in self._decode_once(job):
                    produced = True
                    yield piece
                return
            except _ReplicaFailed as e:
                if produced or attempt == self.settings["replica_failure_retries"]:
                    raise APIError(503, f"generation failed ({e}); retry the request",
                                   code="replica_unavailable") from None
                job.restart(memories)

    async def _decode_once(self, job: Job) -> AsyncIterator[tuple[str, str | None]]:
        """One attempt; cancels the generator's stream when the caller stops early (stop string, client gone)."""
        stream = self.generator.options(stream=True).generate.remote(job.engine_args())
        text = TextStream(self.tokenizer, job.stop)
        first = True
        try:
            async for events in stream:
                finish, new_ids = None, []
                for event in events:
                    kind = event["type"]
                    if kind == "token":
                        new_ids.append(event["token"])
                        if "logprob" in event and event["token"] != self.tokenizer.eos_id:
                            job.generated.add(event["token"], event["logprob"], event["top"])
                    elif kind == "prompt_logprobs":
                        scored = TokenLogprobs(job.prompt_ids[1:], event["logprobs"], event["top"])
                        job.prompt_scored = scored.tail(job.echo_tokens)
                    elif kind == "retrieval":
                        job.add_memories(event["memories"], event["window"], self.limits["snippet_chars"])
                    elif kind == "finish":
                        finish = event["reason"]
                    elif kind == "error":
                        raise APIError(event.get("status", 503), event["message"], code="generation_failed")
                if new_ids and first:
                    self.ttft.observe(time.perf_counter() - job.started)
                    first = False
                job.completion_tokens += len(new_ids)
                if new_ids:
                    self.generated.inc(len(new_ids))
                delta = text.push(new_ids)
                if text.stopped:
                    yield delta, "stop"
                    return
                if finish:
                    yield delta + text.flush(), finish
                    return
                if delta:
                    yield delta, None
            raise _ReplicaFailed("the generator ended the stream early")
        except (APIError, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:  # the replica died or became unreachable mid-request
            raise _ReplicaFailed(type(e).__name__) from None
        finally:
            stream.cancel()

    async def _collect(self, job: Job) -> tuple[str, str]:
        parts, finish = [], "length"
        async for delta, reason in self._decode(job):
            parts.append(delta)
            finish = reason or finish
        text = "".join(parts)
        return (text.lstrip() if job.chat else text), finish

    async def _sse(self, job: Job, rid: str, created: int) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format; the last chunk (with finish_reason) carries `memories`."""
        kind = "chat.completion.chunk" if job.chat else "text_completion"

        def event(choices: list[dict], **extra) -> str:
            body = {"id": rid, "object": kind, "created": created, "model": self.model_name, "choices": choices,
                    **extra}
            return f"data: {json.dumps(body)}\n\n"

        def choice(text: str, finish: str | None) -> dict:
            if job.chat:
                return {"index": 0, "delta": {"content": text} if text else {}, "logprobs": None,
                        "finish_reason": finish}
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        try:
            if job.chat:  # OpenAI opens a chat stream with the role
                yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            leading = job.chat  # chat answers start after "Assistant:"; drop the space the model writes first
            async for delta, finish in self._decode(job):
                if leading:
                    delta = delta.lstrip()
                    leading = not delta
                if finish:
                    yield event([choice(delta, finish)], memories=job.memory_list())
                elif delta:
                    yield event([choice(delta, None)])
            if job.include_usage:
                yield event([], usage=_usage(job))
        except APIError as e:
            yield e.sse()
        yield "data: [DONE]\n\n"

    # --- admin -------------------------------------------------------------------------------------------------
    @app.post("/v1/memories", response_model=AddMemoriesResponse, dependencies=[Depends(bearer)],
              responses=_errors(400, 401, 403, 404, 409, 413))
    async def add_memories(self, body: AddMemoriesRequest) -> dict:
        """Add documents to the live bank: chunked, encoded into sparse memories, stored and indexed. The next
        request can retrieve them."""
        self._require_bank()
        if len(body.documents) > self.limits["max_documents"]:
            raise APIError(400, f"{len(body.documents)} documents in one request; the limit is "
                                f"{self.limits['max_documents']}", param="documents", code="too_many_documents")
        ids = [d.id for d in body.documents]
        if len(set(ids)) != len(ids):
            raise APIError(400, "document ids must be unique within a request", param="documents",
                           code="duplicate_document_id")
        too_long = [d.id for d in body.documents if len(d.text) > self.limits["max_prompt_chars"]]
        if too_long:
            raise APIError(400, f"document {too_long[0]!r} is longer than {self.limits['max_prompt_chars']} "
                                f"characters", param="documents", code="document_too_long")
        result = await self.writer.add.remote([d.model_dump() for d in body.documents])
        if "error" in result:
            raise APIError(result["status"], result["error"], param="documents", code="documents_rejected")
        return {"object": "list", "ids": result["ids"], "bank_version": result["bank_version"]}

    @app.delete("/v1/memories/{memory_id}", response_model=DeleteMemoryResponse,
                dependencies=[Depends(bearer)], responses=_errors(400, 401, 403, 404))
    async def delete_memory(self, memory_id: str = Path(min_length=1, max_length=300)) -> dict:
        """Delete one reference (id '<doc_id>#<chunk>'; URL-encode '#' as %23). It is never retrieved again; its
        bytes leave the bank's files with the next POST /v1/memories:compact."""
        self._require_bank()
        result = await self.writer.delete.remote(memory_id)
        if "error" in result:
            raise APIError(result["status"], result["error"], param="memory_id", code="memory_not_found")
        return {"id": memory_id, "object": "memory", "deleted": result["deleted"],
                "bank_version": result["bank_version"]}

    @app.post("/v1/memories:compact", response_model=CompactMemoriesResponse, dependencies=[Depends(bearer)],
              responses=_errors(401, 403, 404))
    async def compact_memories(self) -> dict:
        """Erase deleted memories from the bank's files: shards holding deleted references are rewritten without
        them and the index renumbered (a DELETE only hides a reference). Requests are answered throughout and the
        next one sees the compacted bank. `ok` is false if a shard failed its checks (see `failed_shards`)."""
        self._require_bank()
        return await self.writer.compact.remote()

    def _require_bank(self) -> None:
        if not self.has_bank:
            raise APIError(404, "this server has no memory bank, so there are no memories to edit",
                           code="no_memory_bank")
