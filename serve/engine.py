"""Continuous batching for decoding with explicit memory.

The paper's schedule (§3.1-3.2: prompt windows read their own memories, every 64 generated tokens re-retrieve with
the previous window's text, the first decoded window inherits the last prompt window's memories) is model.generate's
`MemoryWindows`; this module only changes *when* sequences join and leave the batch. Instead of running a fixed
batch to completion (`model.generate.generate`), the engine keeps `max_batch` decode slots, each a row of one
static KV cache. Waiting requests are prefilled together into free slots (their prompt windows each with their own
memories, written straight into those cache rows); then every slot decodes in one shared batch step until it
finishes, is cancelled or fails, and its slot is reused at once (Orca/vLLM-style iteration-level scheduling).
A request whose prefill fails (e.g. its retrieval) is isolated by prefilling the others one by one.

Logprobs come from the logits the sampler draws from (decode) and from the prefill forward (prompt tokens, each
window with its own memories): no second forward, so a greedy token is always the argmax of its reported logprobs.

The decode step is model.generate's `DecodeStep`: memories sit in reserved slots of each row's cache (written
once per window), attention reads the batch's length bucket only, and on CUDA the step replays a CUDA graph per
batch-size bucket; greedy batches take the argmax on the device, and the step's one host sync is reading the tokens,
which happens after the next forward is launched (as in `generate`), so the host's work per token overlaps it.

The retrievals that fall due together (the prompt windows of the requests that arrived since the last step, the
rows that start a window in the same step) go to the server's `retrieve_many` as one call (serve/generator.py:
one retriever round trip and one memory-tier fetch for them all), or without one run at once on a thread pool,
one request's `retrieve` each. Neither kind holds up the batch's decoding: a waiting request's prompt windows are
retrieved on the pool while the batch decodes, and it is prefilled once they are back (requests submitted
together are admitted together); a decode window's query (the window before it) is complete a step before its
memories are needed, so its retrieval begins then and overlaps that step's forward.

Pure PyTorch plus threads: the Ray Serve replica (serve/generator.py) feeds it and reads its events.
Events, delivered by `request.emit` from the engine thread:
    {"type": "retrieval", "window": w, "ids": [...]}      memories read from window w on
    {"type": "prompt_logprobs", "logprobs": [...], "top": [[[id, logprob], ...], ...]}   prompt tokens 1.. (if asked)
    {"type": "token", "token": id}                        + "logprob", "top" when the request asks for logprobs
    {"type": "finish", "reason": "stop" | "length"}
    {"type": "error", "message": str}
"""
from __future__ import annotations

import gc
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable

import torch

from model.generate import (BatchRetriever, DecodeStep, MemoryWindows, Prefill, Retrieved, TokenReadback,
                            compile_prefill, sample, token_logprobs)
from model.transformer import KVCache, Transformer
from serve.timings import CollectorPauses, Timings

log = logging.getLogger(__name__)

RequestsRetriever = Callable[[list[tuple[Callable[[list[int]], Retrieved | None], list[int]]]],
                             list[Retrieved | None | Exception]]
"""retrieve_many([(request.retrieve, query_token_ids), ...]) -> per ask its memories, None, or its exception."""


@dataclass
class DecodeRequest:
    prompt: list[int]  # a full model sequence: sink first (Tokenizer.context_ids)
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop_ids: frozenset[int] = frozenset()
    retrieve: Callable[[list[int]], Retrieved | None] | None = None
    """retrieve(query_token_ids) for this request's windows; None decodes without memory."""
    emit: Callable[[dict], None] = lambda event: None
    seed: int | None = None
    """Sampling seed of this request alone (OpenAI `seed`): the same seed draws the same tokens whatever else is
    in the batch. None: the engine's shared generator."""
    logprobs: int | None = None
    """Report every token's logprob and its `logprobs` most likely alternatives; None reports nothing."""
    prompt_logprobs: bool = False
    """Report the prompt's own token logprobs (OpenAI `echo`), from the prefill forward. With max_new_tokens=0
    the request ends after prefill: scoring a text costs one forward."""
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default=0.0, init=False, repr=False)
    """When `DecodeEngine.submit` took it (time.perf_counter): its waits in `stats()` are measured from here."""
    prompt_retrieval: PromptRetrieval | None = field(default=None, init=False, repr=False)
    """Its prompt windows' retrievals, begun while it waits (None: not begun, or retrieved at its prefill)."""

    def cancel(self) -> None:
        """Thread-safe: the engine frees the request's slot before its next step."""
        self.cancelled.set()


@dataclass
class PromptRetrieval:
    """One waiting request's prompt-window retrievals (a future per window of its placed memories or exception)
    and those of every request whose retrievals began with it: those are admitted together, once all are back."""

    windows: list[Future]
    group: list[Future]

    def done(self) -> bool:
        return all(future.done() for future in self.group)

    def results(self) -> list:
        return [future.result() for future in self.windows]


@dataclass
class _Slot:
    request: DecodeRequest
    sequence: list[int]
    generated: int = 0
    generator: torch.Generator | None = None  # the request's own, when it has a seed


class DecodeEngine:
    def __init__(self, model: Transformer, max_batch: int = 8, seed: int | None = None, idle_wait_s: float = 0.5,
                 cuda_graphs: bool = True, retrieval_concurrency: int = 0, capture_at_start: bool = False,
                 retrieve_many: RequestsRetriever | None = None, prefill_graphs: bool = True):
        cfg = model.cfg
        self.model, self.cfg, self.max_batch, self.idle_wait_s = model, cfg, max_batch, idle_wait_s
        self.device = model.device
        concurrency = retrieval_concurrency or max_batch
        self.retrievals = ThreadPoolExecutor(concurrency, thread_name_prefix="retrieval") if concurrency > 1 else None
        """Waiting requests' prompt-window retrievals and a step's run here at once (each request's retrieve may
        block) while the batch decodes; the next window's retrievals begin here a step early. None (concurrency
        1): each retrieval runs on the engine thread when due."""
        self.prompt_retrievals: list[Future] = []
        """Prompt-window retrievals in flight: a step that captures a CUDA graph waits for them first."""
        self.retrieve_many = retrieve_many
        """When given, the retrievals that fall due together (the prompt windows of the requests that arrived
        together, the rows that start a window in one step) go to it as one call of (request.retrieve, query)
        pairs instead of one request.retrieve each: a server that made those callbacks answers them all in one
        round trip."""
        self.windows = MemoryWindows(model, self._retrieve_for_slot, max_batch, self.retrievals,
                                     self._batched(lambda row: getattr(self.slots[row], "request", None)))
        model.setup_caches(max_batch, cfg.max_seq_len, memory_slots=self.windows.reserved)
        self.decode_caches = model.caches()
        model.clear_caches()
        self._views: dict[tuple[int, int], list[KVCache]] = {}
        self.decode = DecodeStep(model, self.decode_caches, self.windows.valid, graphs=cuda_graphs)
        """The one-token step (CUDA graphs on CUDA unless cuda_graphs=False; eager elsewhere)."""
        started = time.perf_counter()
        captured = self.decode.capture_all() if capture_at_start else 0
        if captured:
            self._freeze_heap()
        self.startup = {"graphs_captured": captured, "capture_s": round(time.perf_counter() - started, 1)}
        """With capture_at_start, every decode graph is compiled and captured before the first request, so no
        request waits for one (DecodeStep.capture_all)."""
        if self.device.type == "cuda":  # what the captures held at their peak (a replica must fit it)
            self.startup["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated(self.device) / 1e9, 2)
        self.prefill = Prefill(model, compiled=cuda_graphs and compile_prefill(self.device),
                               graphs=cuda_graphs and prefill_graphs and self.device.type == "cuda",
                               max_batch=max_batch)
        """The prompt forward: on CUDA replayed from a graph per shape bucket for short prompts (unless
        prefill_graphs=False), else eager (compiled with MEMORY3_COMPILE_PREFILL=1)."""
        self.last_logits = torch.zeros(max_batch, cfg.vocab_size, device=self.device)
        self.readback = TokenReadback(max_batch, self.device)
        self.temperature = torch.zeros(max_batch, device=self.device)
        self.top_p = torch.ones(max_batch, device=self.device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed if seed is not None else int(time.time_ns()) % 2**63)
        self.slots: list[_Slot | None] = [None] * max_batch
        self.waiting: deque[DecodeRequest] = deque()
        self.wakeup = threading.Condition()
        self.counts = {"submitted": 0, "completed": 0, "cancelled": 0, "failed": 0, "steps": 0, "tokens": 0,
                       "prefills": 0, "prefilled": 0}
        """prefills: prompt forwards run; prefilled: requests they took (their ratio: requests per prefill)."""
        self.timings = {"queue_s": Timings(), "prefill_s": Timings(), "first_token_s": Timings(),
                        "step_s": Timings(), "gc_pause_s": CollectorPauses()}
        """Per request, from `submit`: until its prefill began (queue_s: a free slot and its prompt windows'
        memories waited for) and until its first token reached the host (first_token_s, the engine's own time to
        first token); per prefill, the host's time in it (prefill_s: the prompt windows' retrievals included only
        where they were not begun while the request waited). A served request's TTFT beyond first_token_s is the
        HTTP path's. Per decode step, its wall time (step_s: its max shows any stall); and the process's full
        garbage-collector passes (gc_pause_s), which stop every thread."""
        self.running = True
        self.thread = threading.Thread(target=self._run, name="decode-engine", daemon=True)
        self.thread.start()

    # --- API (any thread) ---
    def submit(self, *requests: DecodeRequest) -> None:
        """Queue requests; those submitted together are admitted together (one prefill where slots allow)."""
        for request in requests:
            total = len(request.prompt) + request.max_new_tokens
            if not request.prompt or request.max_new_tokens < 0 or total > self.cfg.max_seq_len:
                raise ValueError(f"prompt ({len(request.prompt)} tokens) + max_new_tokens "
                                 f"({request.max_new_tokens}) must be in 1..max_seq_len={self.cfg.max_seq_len}")
        now = time.perf_counter()
        for request in requests:
            request.submitted = now
        with self.wakeup:
            self.waiting.extend(requests)
            self.counts["submitted"] += len(requests)
            self.wakeup.notify()

    def stats(self) -> dict:
        return {**self.counts, "active": sum(s is not None for s in self.slots), "waiting": len(self.waiting),
                "max_batch": self.max_batch, "alive": self.thread.is_alive(), **self.startup,
                "graphs": len(self.decode.shapes()),
                **{name: timings.summary() for name, timings in self.timings.items()}}

    def reset_timings(self) -> None:
        """Start `stats()`' timings afresh (a load test's timed phase after its warm-up)."""
        for timings in self.timings.values():
            timings.clear()

    def stop(self) -> None:
        self.running = False
        with self.wakeup:
            self.wakeup.notify()
        self.thread.join(timeout=10)
        self.timings["gc_pause_s"].close()
        if self.retrievals is not None:
            self.retrievals.shutdown(wait=False, cancel_futures=True)

    # --- engine thread ---
    @torch.inference_mode()
    def _run(self) -> None:
        while self.running:
            try:
                self._admit()
                if not any(self.slots):
                    with self.wakeup:  # nothing to decode: sleep until a request arrives or its memories do
                        if not any(self._actionable(r) for r in self.waiting) and self.running:
                            self.wakeup.wait(self.idle_wait_s)
                    continue
                began = time.perf_counter()
                self._step()
                self.timings["step_s"].add(time.perf_counter() - began)
            except Exception as e:  # never let one bad step kill the replica: fail what was running, go on
                log.exception("decode step failed")
                for i, slot in enumerate(self.slots):
                    if slot is not None:
                        self._finish(i, error=f"decode failed: {e}")

    def _admit(self) -> None:
        """Move ready waiting requests (their prompt windows' memories back, or retrieved at prefill) into free
        slots, in arrival order: each contiguous run of free slots is prefilled in one forward. A request whose
        prompt retrieval failed fails alone, before any forward."""
        self._begin_prompt_retrievals()
        while None in self.slots:
            start = self.slots.index(None)
            stop = next((i for i in range(start, self.max_batch) if self.slots[i] is not None), self.max_batch)
            with self.wakeup:
                batch = [r for r in self.waiting if self._ready(r)][:stop - start]
                for request in batch:
                    self.waiting.remove(request)
            if not batch:
                return
            live = []
            for request in batch:
                if request.cancelled.is_set():
                    self.counts["cancelled"] += 1
                elif request.prompt_retrieval is not None and (failed := next(
                        (r for r in request.prompt_retrieval.results() if isinstance(r, Exception)), None)):
                    self._fail_prefill(request, failed)
                else:
                    live.append(request)
            if not live:
                continue
            try:
                self._prefill(live, start)
            except Exception as e:
                if len(live) == 1:
                    self._fail_prefill(live[0], e)
                else:  # find the culprit: one by one, so only its request fails
                    self._prefill_each(live, start)

    def _ready(self, request: DecodeRequest) -> bool:
        """Under `wakeup`: whether `request` can be prefilled now."""
        return request.retrieve is None or self.retrievals is None or (
            request.prompt_retrieval is not None and request.prompt_retrieval.done())

    def _actionable(self, request: DecodeRequest) -> bool:
        """Under `wakeup`: whether the engine has something to do for a waiting request (admit it, or begin its
        retrievals) rather than wait for its memories."""
        return request.prompt_retrieval is None or request.prompt_retrieval.done()

    def _begin_prompt_retrievals(self) -> None:
        """The prompt windows of the requests that arrived since the last step, retrieved on the pool as one group
        (one `retrieve_many` call): the batch goes on decoding meanwhile, instead of stalling for them in the
        prefill."""
        if self.retrievals is None:
            return
        with self.wakeup:
            new = [r for r in self.waiting if r.retrieve is not None and r.prompt_retrieval is None]
        if not new:
            return
        windows = MemoryWindows(self.model, lambda row, query: new[row].retrieve(query), 1, self.retrievals,
                                self._batched(lambda row: new[row]))  # one row: it only retrieves and places
        group = windows.begin(windows.prompt_asks([r.prompt for r in new]))
        self.prompt_retrievals = [f for f in self.prompt_retrievals if not f.done()] + group
        first = 0
        for request in new:  # each request's windows, in the asks' order
            n_windows = self.cfg.n_windows(len(request.prompt))
            request.prompt_retrieval = PromptRetrieval(group[first:first + n_windows], group)
            first += n_windows
        for future in group:
            future.add_done_callback(self._wake)

    def _settle(self) -> None:
        """Nothing else on the device while a graph is compiled and captured: every retrieval in flight ends first."""
        self.windows.settle()
        wait(self.prompt_retrievals)

    @staticmethod
    def _freeze_heap() -> None:
        """After a compilation and capture (already a stall): what they left (graphs, guards, symbolic shapes:
        many objects, kept for good) moves out of the collector's reach, so its full passes stop walking them
        while requests decode (as vLLM freezes its heap after start-up)."""
        gc.collect()
        gc.freeze()

    def _wake(self, _: Future) -> None:
        with self.wakeup:
            self.wakeup.notify()

    def _fail_prefill(self, request: DecodeRequest, error: Exception) -> None:
        log.warning("prefill failed: %s", error)
        self.counts["failed"] += 1
        request.emit({"type": "error", "message": f"prefill failed: {error}"})

    def _prefill_each(self, requests: list[DecodeRequest], start: int) -> None:
        for i, request in enumerate(requests):
            try:
                self._prefill([request], start + i)
            except Exception as e:
                self._fail_prefill(request, e)

    def _prefill(self, requests: list[DecodeRequest], start: int) -> None:
        """Prompts of `requests` into slots start.. in one batched forward, writing the KV cache rows in place;
        each prompt window reads its own memories (paper §3.2), as in model.generate."""
        n = len(requests)
        self.counts["prefills"] += 1
        self.counts["prefilled"] += n
        began = time.perf_counter()
        for request in requests:
            self.timings["queue_s"].add(began - request.submitted)
        any_memory = any(r.retrieve for r in requests)
        retrieve = (lambda row, query: requests[row].retrieve(query) if requests[row].retrieve else None) \
            if any_memory else None
        windows = MemoryWindows(self.model, retrieve, n, self.retrievals,
                                self._batched(lambda row: requests[row]) if any_memory else None)
        fetched = [r.prompt_retrieval and r.prompt_retrieval.results() for r in requests]
        prompts, all_logits = [r.prompt for r in requests], any(r.prompt_logprobs for r in requests)
        captures = self.prefill.captures(prompts, any_memory, all_logits, self.cfg.max_seq_len)
        if captures:
            self._settle()
        last, logits, events = self.prefill(prompts, self._cache_views(start, n), windows, all_logits=all_logits,
                                            fetched=fetched)
        if captures:
            self._freeze_heap()
        self.windows.take_rows(start, windows)
        self.last_logits[start:start + n] = last.float()
        self.timings["prefill_s"].add(time.perf_counter() - began)
        for i, request in enumerate(requests):
            self.temperature[start + i], self.top_p[start + i] = request.temperature, request.top_p
            generator = None
            if request.seed is not None:
                generator = torch.Generator(device=self.device)
                generator.manual_seed(request.seed)
            self.slots[start + i] = _Slot(request, list(request.prompt), generator=generator)
        for row, window, ids in events:
            if requests[row].retrieve:
                requests[row].emit({"type": "retrieval", "window": window, "ids": list(ids)})
        for i, request in enumerate(requests):
            if request.prompt_logprobs:  # position t's logits score token t + 1 (the sink's first token has none)
                targets = torch.tensor(request.prompt[1:], device=self.device)
                logprob, top = self._logprobs(*token_logprobs(logits[i, :len(request.prompt) - 1], targets,
                                                              request.logprobs or 0))
                request.emit({"type": "prompt_logprobs", "logprobs": logprob, "top": top})
            if request.max_new_tokens == 0:
                self._finish(start + i, reason="length")

    def _retrieve_for_slot(self, slot: int, query: list[int]) -> Retrieved | None:
        return self.slots[slot].request.retrieve(query)

    def _batched(self, request_of: Callable[[int], DecodeRequest | None]) -> BatchRetriever | None:
        """MemoryWindows' retrieve_many over `retrieve_many`: rows -> their requests' callbacks, in one call; rows
        whose request reads no memory (or whose slot was freed meanwhile: its result is dropped) get None."""
        if self.retrieve_many is None:
            return None

        def retrieve(asks: list[tuple[int, list[int]]]) -> list[Retrieved | None | Exception]:
            got: list[Retrieved | None | Exception] = [None] * len(asks)
            callbacks = [getattr(request_of(row), "retrieve", None) for row, _ in asks]
            served = [(j, fn, query) for j, (fn, (_, query)) in enumerate(zip(callbacks, asks)) if fn is not None]
            if served:
                for (j, _, _), result in zip(served, self.retrieve_many([(fn, query) for _, fn, query in served])):
                    got[j] = result
            return got

        return retrieve

    def _step(self) -> None:
        """Sample one token for every slot and launch the next batched forward before reading the tokens back, so
        the host's work for this step (events, finishes, retrievals) runs beside the device's forward."""
        n = self._rows()
        live = [s for s in self.slots[:n] if s is not None]
        if all(s.request.temperature == 0 for s in live):  # greedy batch: no softmax, sort or generator draw
            chosen = self.last_logits[:n].argmax(dim=-1)
        else:
            chosen = sample(self.last_logits[:n], self.temperature[:n], self.top_p[:n], self.generator)
        for i, slot in enumerate(self.slots[:n]):
            if slot is not None and slot.generator is not None and slot.request.temperature > 0:
                # a seeded request draws from its own generator
                chosen[i] = sample(self.last_logits[i:i + 1], self.temperature[i:i + 1], self.top_p[i:i + 1],
                                   slot.generator)[0]
        self.decode.tokens[:n, 0] = chosen  # fed next, without a trip through the host
        asking = [i for i, s in enumerate(self.slots[:n]) if s is not None and s.request.logprobs is not None]
        k = max((self.slots[i].request.logprobs for i in asking), default=0)
        scores = token_logprobs(self.last_logits[asking], chosen[asking], k) if asking else ()  # before the launch
        self.readback.start(chosen, *scores)
        retrieved = self._launch(n)  # overwrites last_logits
        tokens, scores = self.readback.wait()  # the step's one host sync: the tokens, not the forward after them
        read = time.perf_counter()
        reported = {}  # row -> (logprob, top) for the rows that asked
        if asking:
            logprob, top = self._logprobs(*scores)
            reported = {i: (logprob[j], top[j][:self.slots[i].request.logprobs]) for j, i in enumerate(asking)}
        self.counts["steps"] += 1
        for i in range(n):
            slot = self.slots[i]
            if slot is None:
                continue
            if slot.request.cancelled.is_set():
                self._finish(i, cancelled=True)
                continue
            token = tokens[i]
            slot.sequence.append(token)
            slot.generated += 1
            if slot.generated == 1:
                self.timings["first_token_s"].add(read - slot.request.submitted)
            self.counts["tokens"] += 1
            event = {"type": "token", "token": token}
            if i in reported:
                event["logprob"], event["top"] = reported[i]
            slot.request.emit(event)
            if token in slot.request.stop_ids:
                self._finish(i, reason="stop")
            elif slot.generated >= slot.request.max_new_tokens:
                self._finish(i, reason="length")
        for i, ids in retrieved.items():
            if self.slots[i] is None:  # ended by the token just read: the memories it was given go unused
                continue
            if isinstance(ids, Exception):
                self._finish(i, error=f"retrieval failed: {ids}")
            else:
                window = self.cfg.window_of(len(self.slots[i].sequence) - 1)
                self.slots[i].request.emit({"type": "retrieval", "window": window, "ids": list(ids)})
        # the next step's windows: their queries end with the token just read, so their retrievals begin now and
        # overlap the forward in flight
        self.windows.prefetch([(i, len(s.sequence), s.sequence, len(s.request.prompt))
                               for i, s in enumerate(self.slots) if s is not None and s.request.retrieve
                               is not None and s.generated + 1 < s.request.max_new_tokens])

    def _launch(self, n: int) -> dict[int, list | Exception]:
        """The forward that feeds each row its sampled token (still on the device) into `last_logits`. It needs no
        token values: a row's position is its length, and a window's query (paper §3.1: the previous window's text)
        ends before the token fed. Rows that end with this token by length or cancellation are not retrieved for;
        one that a stop token ends decodes once more for nothing. Returns the retrievals done for the rows whose new
        window starts here: {row: ids, or the exception its retrieval raised}."""
        going_on = [i for i, s in enumerate(self.slots[:n]) if s is not None and not s.request.cancelled.is_set()
                    and s.generated + 1 < s.request.max_new_tokens]
        if not going_on:
            return {}
        retrieved = self.windows.before_tokens([(i, len(self.slots[i].sequence), self.slots[i].sequence,
                                                 len(self.slots[i].request.prompt)) for i in going_on
                                                if self.slots[i].request.retrieve is not None])
        pos = [len(s.sequence) if s else 0 for s in self.slots[:n]]  # free rows: position 0, output unused
        self.decode.pos[:n, 0].copy_(torch.tensor(pos), non_blocking=True)
        self.windows.write_caches(self.decode_caches)
        memory = any(s is not None and s.request.retrieve is not None for s in self.slots[:n])
        captures = not self.decode.captured(n, max(pos) + 1, memory)
        if captures:
            self._settle()
        self.last_logits[:n] = self.decode(n, max(pos) + 1, memory).float()  # (n, V)
        if captures:
            self._freeze_heap()
        return retrieved

    @staticmethod
    def _logprobs(logprob: torch.Tensor, top_values: torch.Tensor, top_ids: torch.Tensor
                  ) -> tuple[list[float], list[list]]:
        """`token_logprobs`' output -> each chosen token's logprob and its top-k [[id, logprob], ...], as lists."""
        return logprob.tolist(), [list(map(list, zip(ids, values)))
                                  for ids, values in zip(top_ids.tolist(), top_values.tolist())]

    def _rows(self) -> int:
        """Decode only up to the highest occupied slot (slots are filled lowest first)."""
        return max(i for i, s in enumerate(self.slots) if s is not None) + 1

    def _cache_views(self, start: int, n: int) -> list[KVCache]:
        """Caches whose buffers are rows start..start+n of the decode caches (views: writes land in place), so a
        forward runs over just those rows."""
        if (start, n) not in self._views:
            self._views[(start, n)] = [cache.rows(start, n) for cache in self.decode_caches]
        return self._views[(start, n)]

    def _finish(self, i: int, reason: str | None = None, cancelled: bool = False, error: str | None = None) -> None:
        request = self.slots[i].request
        self.slots[i] = None
        self.windows.clear_row(i)
        if cancelled:
            self.counts["cancelled"] += 1
        elif error is not None:
            self.counts["failed"] += 1
            request.emit({"type": "error", "message": error})
        else:
            self.counts["completed"] += 1
            request.emit({"type": "finish", "reason": reason})
