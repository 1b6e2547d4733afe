"""The serving application end to end: real Ray Serve on 127.0.0.1, real HTTP, the official openai client, a
random-weight tiny checkpoint and a real memory bank (written by the bank code, searched with FAISS)."""
from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pyarrow.parquet as pq
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from ray import serve
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                               response_schema_conformance, status_code_conformance)

from serve_testing import CITIES, city_documents, serving
from serve.app import wait_healthy

APP, MODEL, TOKEN = "memory3-test", "memory3", "test-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
LIMITS = {"max_prompt_chars": 2000, "max_tokens": 200, "max_documents": 8, "max_body_bytes": 200_000,
          "snippet_chars": 80}


@dataclass
class Server:
    url: str
    client: openai.OpenAI
    http: httpx.Client
    bank: str

    def complete(self, **body) -> dict:
        r = self.http.post("/v1/completions", json={"model": MODEL, **body})
        assert r.status_code == 200, r.text
        return r.json()

    def generator_stats(self) -> dict:
        return serve.get_deployment_handle("Generator", APP).stats.remote().result()


@pytest.fixture(scope="module")
def server(ray_local, tiny_checkpoint, tiny_bank, tmp_path_factory):
    bank = str(tmp_path_factory.mktemp("api") / "bank")
    shutil.copytree(tiny_bank, bank)  # the admin tests edit it
    args = {"checkpoint": tiny_checkpoint, "bank": bank, "admin_token": TOKEN, "model_name": MODEL,
            "limits": LIMITS, "decoding": {"max_batch_size": 8, "seed": 0}, "writer": {"refresh_s": 0.5}}
    with serving(APP, args) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        with httpx.Client(base_url=url, timeout=120) as http:
            yield Server(url, client, http, bank)


def memory_ids(response) -> list[str]:
    body = response if isinstance(response, dict) else response.to_dict()
    return [m["id"] for m in body["memories"]]


PROMPT = "Osaka is a city in Japan. It has a population of about 548 thousand people."


def test_openai_client_completions_chat_and_models(server):
    c = server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    assert c.object == "text_completion" and c.choices[0].finish_reason in ("length", "stop")
    assert c.usage.prompt_tokens > 3 and 1 <= c.usage.completion_tokens <= 8
    memories = c.to_dict()["memories"]  # explicit memory is the default mode
    assert memories[0]["id"] == "city-1#0" and memories[0]["windows"] == [0]  # Osaka's own reference first
    assert memories[0]["text"] == city_documents()[1]["text"][:LIMITS["snippet_chars"]]

    chat = server.client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "Answer briefly."},
                               {"role": "user", "content": "Which country is Osaka in?"}],
        max_tokens=6, temperature=0.8, top_p=0.9, extra_body={"memory_mode": "none"})
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.to_dict()["memories"] == [] and chat.usage.completion_tokens <= 6
    assert [m.id for m in server.client.models.list()] == [MODEL]


def test_streaming_matches_non_streaming(server):
    full = server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    chunks = list(server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == full.choices[0].text
    final = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(final) == 1 and memory_ids(final[0]) == memory_ids(full)
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens

    messages = [{"role": "user", "content": "Tell me about Perth."}]
    chat = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    stream = list(server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                                        temperature=0, stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in stream) == chat.choices[0].message.content
    assert memory_ids(stream[-1]) == memory_ids(chat) and "city-3#0" in memory_ids(chat)


def test_search_batch_calls_that_arrive_together_are_searched_together(server):
    """A generator sends each group of prompt windows as one `search_batch` call, and groups reach the retriever
    apart (requests that arrived apart, other generators' windows): the calls that come while a search runs join
    the next search instead of queueing one search each behind the replica's lock; each caller gets its own
    queries' hits, in order."""
    retriever = serve.get_deployment_handle("Retriever", APP)
    before = retriever.info.remote().result()
    groups = [[f"Which country is {city} in?", f"{city} is a city"] for city in
              ("Osaka", "Lyon", "Perth", "Kraków", "Quito", "Osaka", "Lyon", "Perth")] * 2
    calls = [retriever.search_batch.remote(g, 3, [None] * len(g)) for g in groups]
    got = [call.result() for call in calls]
    after = retriever.info.remote().result()
    assert after["queries"] - before["queries"] == sum(map(len, groups))
    assert after["searches"] - before["searches"] <= len(groups) // 2, "the calls were searched one by one"
    for group, hits in zip(groups, got):
        alone = [retriever.search.remote(query, 3).result() for query in group]
        assert [[h["id"] for h in found] for found in hits] == [[h["id"] for h in found] for found in alone]


def test_memory_modes_and_decode_time_retrieval(server):
    long_prompt = " ".join(d["text"] for d in city_documents()[:3])  # > one 64-token window
    before = server.generator_stats()["retrieve_s"]["n"]
    memory = server.complete(prompt=long_prompt, max_tokens=90, temperature=0, memory_mode="memory")
    after_memory = server.generator_stats()["retrieve_s"]["n"]
    none = server.complete(prompt=long_prompt, max_tokens=90, temperature=0, memory_mode="none")
    # the generator times each group of windows' retrieval: the prompt's, then the decoded windows'; none has none
    assert after_memory - before >= 2 and server.generator_stats()["retrieve_s"]["n"] == after_memory
    rag = server.complete(prompt=PROMPT, max_tokens=4, temperature=0, memory_mode="rag")
    plain = server.complete(prompt=PROMPT, max_tokens=4, temperature=0, memory_mode="none")
    windows = sorted({w for m in memory["memories"] for w in m["windows"]})
    n_windows = (memory["usage"]["total_tokens"] - 4) // 64 + 1  # windows of the fed tokens, after the 2-token sink
    assert windows == list(range(n_windows)) and n_windows >= 3  # prompt windows, then every 64 generated tokens
    assert none["memories"] == [] and none["choices"][0]["text"] != memory["choices"][0]["text"]
    assert memory_ids(rag)[0] == "city-1#0" and all(m["windows"] == [] for m in rag["memories"])
    assert rag["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"] + 20  # reference texts in the prompt


def test_seed_reproduces_sampling(server):
    first, again, other = (server.complete(prompt=PROMPT, max_tokens=16, temperature=1.0, memory_mode="none",
                                           seed=seed)["choices"][0]["text"] for seed in (5, 5, 6))
    assert first == again and first != other


@pytest.mark.parametrize("mode", ["memory", "none"])
def test_greedy_tokens_are_the_argmax_of_their_logprobs(server, mode):
    r = server.complete(prompt=PROMPT, max_tokens=12, temperature=0, logprobs=3, memory_mode=mode, stop=["zz"])
    choice = r["choices"][0]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"] and len(lp["tokens"]) == r["usage"]["completion_tokens"]
    assert lp["text_offset"][0] == len(PROMPT)
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        best = max(top, key=top.get)
        assert len(top) <= 3 and best == token and top[best] == pytest.approx(logprob)

    chat = server.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Which country is Osaka in?"}], max_tokens=6,
        temperature=0, logprobs=True, top_logprobs=2, extra_body={"memory_mode": mode})
    content = chat.choices[0].logprobs.content
    assert "".join(t.token for t in content).lstrip() == chat.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token for t in content)


@pytest.mark.parametrize("mode", ["memory", "none"])
def test_echo_scores_the_prompt_as_decoding_saw_it(server, mode):
    """`echo` + `max_tokens: 0` + `logprobs` (how harnesses score log-likelihood): the prompt's token logprobs.
    Scoring prompt + greedy continuation gives the continuation the logprobs decoding reported (the continuation
    stays in the prompt's 64-token window, whose memories then come from the same text)."""
    decoded = server.complete(prompt=PROMPT, max_tokens=6, temperature=0, logprobs=1, memory_mode=mode)["choices"][0]
    text = PROMPT + decoded["text"]
    scored = server.complete(prompt=text, max_tokens=0, echo=True, logprobs=1, memory_mode=mode)
    choice = scored["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == text and "".join(lp["tokens"]) == text and lp["text_offset"][0] == 0
    assert scored["usage"]["completion_tokens"] == 0 and choice["finish_reason"] == "length"
    n = len(decoded["logprobs"]["tokens"])
    assert lp["tokens"][-n:] == decoded["logprobs"]["tokens"]
    if mode == "none":
        assert lp["token_logprobs"][-n:] == pytest.approx(decoded["logprobs"]["token_logprobs"], abs=1e-4)
    assert all(v <= 0 for v in lp["token_logprobs"]) and all(len(t) == 1 for t in lp["top_logprobs"])
    # lm-eval's request: echo with one generated token, whose logprob comes last
    harness = server.complete(prompt=text, max_tokens=1, temperature=0, echo=True, logprobs=1, seed=1234,
                              memory_mode=mode)["choices"][0]["logprobs"]
    assert harness["token_logprobs"][:-1] == pytest.approx(lp["token_logprobs"], abs=1e-4)


def test_echo_logprobs_depend_on_the_memory_mode(server):
    scores = {mode: server.complete(prompt=PROMPT + " Osaka is in Japan.", max_tokens=0, echo=True, logprobs=0,
                                    memory_mode=mode)["choices"][0]["logprobs"]["token_logprobs"]
              for mode in ("memory", "none")}
    assert len(scores["memory"]) == len(scores["none"]) and scores["memory"] != pytest.approx(scores["none"])
    by_url = server.http.post("/v1/completions?memory_mode=none", json=_body(
        prompt=PROMPT + " Osaka is in Japan.", max_tokens=0, echo=True, logprobs=0)).json()  # lm-eval's way
    assert by_url["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(scores["none"])
    assert by_url["memories"] == []


def test_a_list_of_prompts_answers_each_in_order(server):
    prompts = [f"{city} is a city in" for city, _, _ in CITIES[:3]] + [PROMPT]
    batch = server.complete(prompt=prompts, max_tokens=5, temperature=0, logprobs=0)
    singles = [server.complete(prompt=p, max_tokens=5, temperature=0, logprobs=0) for p in prompts]
    assert [c["index"] for c in batch["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in batch["choices"]] == [s["choices"][0]["text"] for s in singles]
    assert batch["usage"]["total_tokens"] == sum(s["usage"]["total_tokens"] for s in singles)
    assert set(memory_ids(batch)) == {i for s in singles for i in memory_ids(s)}
    echoed = server.complete(prompt=prompts[:2], max_tokens=0, echo=True)
    assert [c["text"] for c in echoed["choices"]] == prompts[:2] and echoed["choices"][0]["logprobs"] is None


def test_stop_strings_cut_the_text_streaming_or_not(server):
    base = server.complete(prompt=PROMPT, max_tokens=30, temperature=0)["choices"][0]["text"]
    assert len(base) >= 12, base
    stop = base[6:9]
    expected = base[:base.index(stop)]
    cut = server.complete(prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop, "never-appears"])
    assert cut["choices"][0] == {"index": 0, "text": expected, "logprobs": None, "finish_reason": "stop"}
    streamed = server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0,
                                                stop=stop, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == expected


def test_admin_add_then_retrieve_then_delete(server):
    doc = {"id": "zorbia", "text": "Zorbia is a tiny island nation famous for its purple goats and copper bells."}
    added = server.http.post("/v1/memories", json={"documents": [doc]}, headers=ADMIN)
    assert added.status_code == 200, added.text
    assert added.json()["ids"] == ["zorbia#0"]
    answer = server.client.completions.create(model=MODEL, prompt=doc["text"], max_tokens=3)
    assert memory_ids(answer)[0] == "zorbia#0"  # the very next request reads the new memory
    assert memory_ids(server.complete(prompt=doc["text"], max_tokens=2, memory_mode="rag"))[0] == "zorbia#0"
    clash = server.http.post("/v1/memories", json={"documents": [doc]}, headers=ADMIN)
    assert clash.status_code == 409 and "already" in clash.json()["error"]["message"]

    deleted = server.http.delete("/v1/memories/zorbia%230", headers=ADMIN)
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert "zorbia#0" not in memory_ids(server.complete(prompt=doc["text"], max_tokens=2))
    assert "zorbia#0" not in memory_ids(server.complete(prompt=doc["text"], max_tokens=2, memory_mode="rag"))
    again = server.http.delete("/v1/memories/zorbia%230", headers=ADMIN)
    assert again.status_code == 404 and again.json()["error"]["param"] == "memory_id"


def test_admin_compact_erases_deleted_memories_while_requests_are_answered(server):
    doc = {"id": "erasable", "text": "Quillmoor is a hidden valley where the river glows green every winter."}
    assert server.http.post("/v1/memories", json={"documents": [doc]}, headers=ADMIN).status_code == 200
    assert server.http.delete("/v1/memories/erasable%230", headers=ADMIN).status_code == 200
    statuses, stop = [], threading.Event()

    def traffic():
        with httpx.Client(base_url=server.url, timeout=120) as http:
            while not stop.is_set():
                for mode in ("memory", "rag"):
                    r = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 70,
                                                           "memory_mode": mode})
                    statuses.append((r.status_code, memory_ids(r.json()) if r.status_code == 200 else r.text))

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        while not statuses:
            time.sleep(0.05)
        compacted = server.http.post("/v1/memories:compact", headers=ADMIN)
        time.sleep(1)  # let requests that took the old bank version run on
    finally:
        stop.set()
        thread.join()
    assert compacted.status_code == 200, compacted.text
    body = compacted.json()
    assert body["ok"] and body["removed_references"] >= 1 and body["generation"] >= 1
    assert body["bank_version"].startswith(f"{body['generation']}.")
    assert all(status == 200 and "city-1#0" in ids for status, ids in statuses), statuses
    # the next request reads the compacted bank: renumbered rows still name the right memories
    assert memory_ids(server.complete(prompt=PROMPT, max_tokens=70))[0] == "city-1#0"
    for path in Path(server.bank).rglob("*"):
        if path.suffix == ".parquet":
            assert "erasable" not in str(pq.read_table(path).to_pydict()), path
        elif path.is_file():
            assert b"Quillmoor" not in path.read_bytes() and b"erasable" not in path.read_bytes(), path


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}])
def test_admin_needs_the_token(server, headers):
    for r in (server.http.post("/v1/memories", json={"documents": [{"id": "x", "text": "y"}]}, headers=headers),
              server.http.post("/v1/memories", content=b"{broken", headers=headers),  # auth before validation
              server.http.delete("/v1/memories/city-1%230", headers=headers),
              server.http.post("/v1/memories:compact", headers=headers)):
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert "city-1#0" in memory_ids(server.complete(prompt=PROMPT, max_tokens=1))


def test_admin_is_off_without_a_token():
    """The same dependency the replicas run, on the ingress's FastAPI app without a configured token."""
    from fastapi.testclient import TestClient

    from serve.ingress import app

    app.state.admin_token = None
    with TestClient(app) as client:
        for r in (client.post("/v1/memories", json={"documents": []}, headers=ADMIN),
                  client.delete("/v1/memories/a%230", headers=ADMIN),
                  client.post("/v1/memories:compact", headers=ADMIN)):
            assert r.status_code == 403 and "MEMORY3_ADMIN_TOKEN" in r.json()["error"]["message"]


def _body(**extra):
    return {"model": MODEL, "prompt": "Lyon", "max_tokens": 2, **extra}


BAD_REQUESTS = [  # (name, method, path, json body or raw bytes, status, param)
    ("invalid json", "POST", "/v1/completions", b'{"model": "memory3", "prompt": ', 400, None),
    ("not an object", "POST", "/v1/completions", [1, 2], 400, None),
    ("unknown field", "POST", "/v1/completions", _body(best_of=2), 400, "best_of"),
    ("logprobs over OpenAI's 5", "POST", "/v1/completions", _body(logprobs=6), 400, "logprobs"),
    ("token-id prompt", "POST", "/v1/completions", _body(prompt=[[1, 2]]), 400, "prompt"),
    ("stream a prompt list", "POST", "/v1/completions", _body(prompt=["a", "b"], stream=True), 400, "stream"),
    ("stream logprobs", "POST", "/v1/completions", _body(logprobs=1, stream=True), 400, "stream"),
    ("float seed", "POST", "/v1/completions", _body(seed=1.5), 400, "seed"),
    ("memory_mode body vs URL", "POST", "/v1/completions?memory_mode=none", _body(memory_mode="memory"), 400,
     "memory_mode"),
    ("unknown URL memory_mode", "POST", "/v1/chat/completions?memory_mode=both",
     {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, 400, "memory_mode"),
    ("string for int", "POST", "/v1/completions", _body(max_tokens="2"), 400, "max_tokens"),
    ("bool for int", "POST", "/v1/completions", _body(max_tokens=True), 400, "max_tokens"),
    ("missing prompt", "POST", "/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("empty prompt", "POST", "/v1/completions", _body(prompt=""), 400, "prompt"),
    ("too many prompts", "POST", "/v1/completions", _body(prompt=["a"] * 65), 400, "prompt"),
    ("oversized prompt", "POST", "/v1/completions", _body(prompt="x" * 2500), 400, "prompt"),
    ("prompt over the context", "POST", "/v1/completions", _body(prompt="Lyon " * 300, max_tokens=10), 400, "prompt"),
    ("max_tokens -1", "POST", "/v1/completions", _body(max_tokens=-1), 400, "max_tokens"),
    ("chat max_tokens 0", "POST", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ("chat top_logprobs without logprobs", "POST", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ("chat top_logprobs over 20", "POST", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
     400, "top_logprobs"),
    ("max_tokens over the limit", "POST", "/v1/completions", _body(max_tokens=5000), 400, "max_tokens"),
    ("temperature 3", "POST", "/v1/completions", _body(temperature=3.0), 400, "temperature"),
    ("top_p 0", "POST", "/v1/completions", _body(top_p=0), 400, "top_p"),
    ("n 2", "POST", "/v1/completions", _body(n=2), 400, "n"),
    ("five stops", "POST", "/v1/completions", _body(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("empty stop", "POST", "/v1/completions", _body(stop=[""]), 400, "stop.0"),
    ("unknown mode", "POST", "/v1/completions", _body(memory_mode="both"), 400, "memory_mode"),
    ("unknown model", "POST", "/v1/completions", _body(model="gpt-4"), 404, "model"),
    ("no messages", "POST", "/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("bad role", "POST", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    ("content parts", "POST", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, 400,
     "messages.0.content"),
    ("body too large", "POST", "/v1/completions", _body(prompt="x" * 250_000), 413, None),
    ("no documents", "POST", "/v1/memories", {"documents": []}, 400, "documents"),
    ("bad document id", "POST", "/v1/memories", {"documents": [{"id": "a b/c", "text": "t"}]}, 400,
     "documents.0.id"),
    ("duplicate document ids", "POST", "/v1/memories",
     {"documents": [{"id": "d", "text": "t"}, {"id": "d", "text": "u"}]}, 400, "documents"),
    ("too many documents", "POST", "/v1/memories",
     {"documents": [{"id": f"d{i}", "text": "t"} for i in range(9)]}, 400, "documents"),
    ("unknown memory id", "DELETE", "/v1/memories/no-such-doc%230", None, 404, "memory_id"),
    ("unknown route", "GET", "/v1/embeddings", None, 404, None),
]


@pytest.mark.parametrize("name,method,path,body,status,param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_is_an_openai_style_4xx(server, name, method, path, body, status, param):
    if isinstance(body, bytes):
        kwargs = {"content": body, "headers": {"content-type": "application/json", **ADMIN}}
    else:
        kwargs = {"headers": ADMIN, **({} if body is None else {"json": body})}
    r = server.http.request(method, path, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


def test_bad_input_left_the_replicas_serving(server):
    assert server.http.get("/healthz").status_code == 200
    stats = server.generator_stats()
    assert stats["alive"] and stats["failed"] == 0


def test_client_disconnect_frees_the_decode_slot(server):
    before = server.generator_stats()
    with server.http.stream("POST", "/v1/completions", json=_body(prompt="Lyon", max_tokens=200, stream=True)) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # decoding has started; now hang up
    deadline = time.monotonic() + 60
    while (stats := server.generator_stats())["active"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stats["active"] == 0 and stats["cancelled"] == before["cancelled"] + 1
    assert stats["completed"] == before["completed"]


def rejects_invalid_data(ctx, response, case):
    """Schemathesis' negative-data check, with 413 also counting as a rejection (an oversized body is refused
    before it is read, so before it can be validated)."""
    if response.status_code == 413:
        return None
    return negative_data_rejection(ctx, response, case)


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_openapi_schema_fuzz_never_5xx(server, mode):
    """Schemathesis against the live OpenAPI schema, every operation, valid and invalid data (with the admin
    token, so the admin routes are exercised past their auth)."""
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    if mode == "negative":
        checks.append(rejects_invalid_data)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 7
    for operation in operations:
        if mode == "negative" and (operation.method.upper() == "GET" or operation.path.endswith(":compact")):
            continue  # no parameters, so no invalid data to send
        @given(case=operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode), headers=ADMIN))
        @settings(max_examples=30 if mode == "positive" else 15, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case):
            case.call_and_validate(base_url=server.url, checks=checks, timeout=120)

        fuzz()
    assert server.http.get("/healthz").status_code == 200


async def run_load(url: str, n: int, concurrency: int, on_progress=None) -> list[tuple[int, float]]:
    """n completion requests, `concurrency` at a time, modes mixed; returns (status, seconds) per request."""
    modes = ["memory", "none", "rag"]
    results: list[tuple[int, float]] = []
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def worker(client: httpx.AsyncClient):
        while not queue.empty():
            i = queue.get_nowait()
            city = CITIES[i % len(CITIES)][0]
            body = _body(prompt=f"{city} is a city in", max_tokens=4, temperature=0.7, memory_mode=modes[i % 3],
                         stream=i % 4 == 0)
            t0 = time.perf_counter()
            try:
                r = await client.post("/v1/completions", json=body)
                ok = r.status_code == 200 and (not body["stream"] or ('"finish_reason": "' in r.text
                                                                       and '"error"' not in r.text))
                results.append((r.status_code if ok else 599, time.perf_counter() - t0))
            except httpx.HTTPError:
                results.append((0, time.perf_counter() - t0))
            if on_progress:
                on_progress(len(results))

    async with httpx.AsyncClient(base_url=url, timeout=120,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return results


def test_load_300_requests_at_concurrency_16(server):
    t0 = time.perf_counter()
    results = asyncio.run(run_load(server.url, 300, 16))
    seconds = time.perf_counter() - t0
    errors = [s for s, _ in results if s != 200]
    print(json.dumps({"requests": len(results), "errors": len(errors), "seconds": round(seconds, 1),
                      "requests_per_second": round(len(results) / seconds, 1)}))
    assert len(results) == 300 and not errors
    assert server.generator_stats()["active"] == 0


def test_killing_the_generator_replica_mid_load_loses_at_most_the_in_flight(server):
    import ray

    victim = server.generator_stats()["replica"]
    concurrency, killed = 8, []

    def kill_once(done: int) -> None:
        if done >= 20 and not killed:
            ray.kill(ray.get_actor(victim, namespace="serve"))
            killed.append(done)

    results = asyncio.run(run_load(server.url, 80, concurrency, on_progress=kill_once))
    failures = [s for s, _ in results if s != 200]
    print(json.dumps({"requests": len(results), "failures": len(failures), "killed_after": killed}))
    assert killed and len(results) == 80
    assert len(failures) <= concurrency  # only requests in flight at the kill may fail (most are retried)
    assert results[-1][0] == 200
    wait_healthy(server.url, 120)
    assert server.generator_stats()["replica"] != victim  # Serve replaced the replica
    assert server.complete(prompt=PROMPT, max_tokens=2)["choices"][0]["finish_reason"] in ("length", "stop")
