"""The generator deployment: the model, decoding many requests at once with explicit memory.

Requests arrive as token ids (the ingress owns text) and leave as a stream of engine events. Continuous batching
(serve/engine.py) shares the model between all concurrent requests. Memory is read as the paper decodes
(§3.1-3.2): each 64-token window's decoded text is the retrieval query (retriever deployment: embedder + FAISS),
the hits' sparse memories come from the replica's own memory tier (on GPUs: decoded memories on the device over
stored bytes in host RAM) or from the memory-store deployment (serve/memory_store.py), and the memory layers
attend to them. The windows that fall due together, across requests, cost one retriever call and one memory
fetch. `bank_version` in a job makes both see any admin write that preceded the request.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator

import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from bank.checkpoints import load_model
from model.generate import Retrieved
from serve.engine import DecodeEngine, DecodeRequest
from serve.memory_store import BankMemories
from serve.timings import Timings


class EventInbox:
    """One request's engine events, from the engine thread to the replica's event loop. The engine thread appends
    and wakes the loop only for the first event since the loop last took them: a batch-32 step then costs the loop
    one wake-up per request that is waiting, not one per event, and events that pile up meanwhile leave as one
    stream item (each costs a Ray Serve replica a fraction of a millisecond of its GIL). The request's end also
    sets `ended`, so a loop that lets tokens gather (`gather`) sends it at once."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.ready, self.lock = loop, asyncio.Event(), threading.Lock()
        self.ended = asyncio.Event()
        self.events: deque[dict] = deque()
        self.idle = True  # the loop has taken every event: the next one must wake it

    def put(self, event: dict) -> None:
        """Engine thread."""
        with self.lock:
            self.events.append(event)
            wake, self.idle = self.idle, False
        if wake:
            self.loop.call_soon_threadsafe(self.ready.set)
        if event["type"] in ("finish", "error"):
            self.loop.call_soon_threadsafe(self.ended.set)

    async def take(self) -> list[dict]:
        """Event loop: every event so far (at least one)."""
        await self.ready.wait()
        with self.lock:
            self.ready.clear()
            events, self.idle = list(self.events), True
            self.events.clear()
        return events

    async def gather(self, seconds: float) -> None:
        """Event loop: let events gather for `seconds`, or less if the request ends meanwhile (its last tokens and
        its end leave at once: a client waits for the end, and in a closed loop sends its next request then)."""
        try:
            await asyncio.wait_for(self.ended.wait(), seconds)
        except asyncio.TimeoutError:
            pass


@dataclass
class RequestMemory:
    """One request's retrieve callback: the bank version it must see, and the texts of the references it read
    (its events list them). The engine hands these back to `Generator._retrieve_many` in batches."""

    generator: "Generator"
    bank_version: str | None
    texts: dict[str, str]

    def __call__(self, query_ids: list[int]) -> Retrieved | None:
        got, = self.generator._retrieve_many([(self, query_ids)])
        if isinstance(got, Exception):
            raise got
        return got


@serve.deployment(name="Generator")
class Generator:
    def __init__(self, checkpoint: str, decoding: dict, retriever: DeploymentHandle | None = None,
                 memory_store: DeploymentHandle | None = None, bank: str | None = None, memory: dict | None = None):
        if decoding.get("torch_threads"):
            torch.set_num_threads(decoding["torch_threads"])
        self.model, self.tokenizer = load_model(checkpoint, decoding["device"], decoding["dtype"])
        if decoding.get("fuse_projections", True):
            self.model.fuse_projections()
        self.engine = DecodeEngine(self.model, max_batch=decoding["max_batch_size"], seed=decoding.get("seed"),
                                   retrieval_concurrency=decoding.get("retrieval_concurrency", 0),
                                   capture_at_start=decoding.get("capture_at_start", False),
                                   prefill_graphs=decoding.get("prefill_graphs", True),
                                   retrieve_many=self._retrieve_many)
        self.retriever, self.memory_store = retriever, memory_store
        self.memories = self._memory_tier(bank, memory or {}, decoding["device"])
        self.timeout_s = decoding["retrieval_timeout_s"]
        self.stream_interval_s = decoding.get("stream_interval_s", 0.0)
        self.top_k = self.model.cfg.refs_per_window
        self.retrieve_s = Timings()
        """Each group of windows' retrieval: the retriever call and the memory fetch (`stats()`)."""

    async def generate(self, job: dict) -> AsyncIterator[list[dict]]:
        """job: prompt (token ids), max_tokens, temperature, top_p, memory (bool), bank_version (str | None), and
        optionally seed, logprobs (top-k) and prompt_logprobs (bool): see DecodeRequest.
        Yields lists of engine events; retrieval events gain `memories` [{"id", "text"}]. Ends after the
        request's finish or error event. Cancelling the stream (client gone, stop string) frees the slot."""
        inbox = EventInbox(asyncio.get_running_loop())
        texts: dict[str, str] = {}
        retrieve = None
        if job.get("memory"):
            if self.retriever is None or self.memory_store is None:
                yield [{"type": "error", "status": 400, "message": "this deployment has no memory bank"}]
                return
            retrieve = RequestMemory(self, job.get("bank_version"), texts)
        request = DecodeRequest(
            prompt=list(job["prompt"]), max_new_tokens=int(job["max_tokens"]), temperature=float(job["temperature"]),
            top_p=float(job["top_p"]), stop_ids=frozenset([self.tokenizer.eos_id]), retrieve=retrieve,
            emit=inbox.put, seed=job.get("seed"),
            logprobs=job.get("logprobs"), prompt_logprobs=bool(job.get("prompt_logprobs")))
        try:
            self.engine.submit(request)
        except ValueError as e:
            yield [{"type": "error", "status": 400, "message": str(e)}]
            return
        try:
            while True:
                events = await inbox.take()
                for event in events:
                    if event["type"] == "retrieval":
                        event["memories"] = [{"id": i, "text": texts.get(i, "")} for i in event["ids"]]
                yield events
                if any(e["type"] in ("finish", "error") for e in events):
                    return
                if self.stream_interval_s and any(e["type"] == "token" for e in events):
                    await inbox.gather(self.stream_interval_s)  # the first token left at once; later ones gather
        finally:
            request.cancel()

    def _retrieve_many(self, asks: list[tuple["RequestMemory", list[int]]]) -> list[Retrieved | None | Exception]:
        """The engine's retrieve_many (runs on its threads, so it may block): every query that falls due together
        (a prefill's prompt windows, the windows that start in one decode step) in one retriever call (one
        embedding, one search) and one memory fetch, rather than a round trip each."""
        queries = [self.tokenizer.decode(query_ids) for _, query_ids in asks]
        asked = [j for j, query in enumerate(queries) if query.strip()]
        got: list[Retrieved | None | Exception] = [None] * len(asks)
        if not asked:
            return got
        began = time.perf_counter()
        try:
            found = self.retriever.search_batch.remote(
                [queries[j] for j in asked], self.top_k, [asks[j][0].bank_version for j in asked]
            ).result(timeout_s=self.timeout_s)
            hits = [h for found_j in found for h in found_j]
            if not hits:
                return got
            # one version for all: rows are numbered in the version the retriever searched (at least every bank_version)
            version, unique = hits[0]["bank_version"], list(dict.fromkeys((h["row"], h["id"]) for h in hits))
            rows, ids = [row for row, _ in unique], [i for _, i in unique]
            if self.memories is not None:
                memories, n_valid = self.memories.fetch(rows, version, ids)
            else:
                memories, n_valid = self.memory_store.fetch.remote(rows, version, ids).result(timeout_s=self.timeout_s)
            where = {key: n for n, key in enumerate(unique)}
            for j, found_j in zip(asked, found):
                if not found_j:
                    continue
                take = torch.tensor([where[(h["row"], h["id"])] for h in found_j])
                for h in found_j:
                    asks[j][0].texts[h["id"]] = h["text"]
                got[j] = Retrieved(memories[take.to(memories.device)], n_valid[take.to(n_valid.device)],
                                   ids=[h["id"] for h in found_j])
            return got
        finally:
            self.retrieve_s.add(time.perf_counter() - began)

    def _memory_tier(self, bank: str | None, memory: dict, device: str) -> BankMemories | None:
        """The replica's own MemoryStore, where `memory.generator_tier` (null: on GPUs) asks for one."""
        wanted = memory.get("generator_tier")
        if bank is None or not (wanted if wanted is not None else torch.device(device).type == "cuda"):
            return None
        return BankMemories(bank, memory["generator_cache_size"], device=device,
                            dtype=next(self.model.parameters()).dtype,
                            host_cache_size=memory["generator_host_cache_size"])

    def stats(self) -> dict:
        return {**self.engine.stats(), "replica": serve.get_replica_context().replica_id.to_full_id_str(),
                "retrieve_s": self.retrieve_s.summary(),
                "memory_tier": self.memories.stats() if self.memories is not None else None}

    def reset_timings(self) -> None:
        """Start the timings of `stats()` afresh (a load test's timed phase, after its warm-up)."""
        self.engine.reset_timings()
        self.retrieve_s.clear()

    def ping(self) -> bool:
        return True

    def check_health(self) -> None:
        """Serve restarts a replica whose engine thread has died."""
        if not self.engine.thread.is_alive():
            raise RuntimeError("decode engine thread is not running")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()
