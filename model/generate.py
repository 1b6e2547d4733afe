"""Decoding with explicit memory (paper §3.2): prompt windows read their own memories; while generating, every
new 64-token window drops the memories and retrieves new ones using the previous window's tokens as query. The
first window that starts after a prompt ending on a window boundary keeps the prompt's last memories (so a
128-in/128-out request retrieves 3 times, as the paper counts).

Pure PyTorch: retrieval is a callback, so serving (FAISS + MemoryStore) and tests (fixed memories) share this loop.
`DecodeStep` is the one-token step that this loop and the serving engine (serve/engine.py) both run: static token,
position and memory buffers, memories written into reserved cache slots once per window, attention bounded by a
length bucket, and on CUDA one CUDA graph per (batch bucket, length bucket, memory or not). `Prefill` is the prompt
forward they both run: in the engine on CUDA replayed from a CUDA graph per (batch bucket, length bucket, memory or
not) for short prompts; opt-in, `torch.compile`d with prompt lengths padded to a bucket.
"""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor

from model.transformer import KVCache, MemoryBatch, Transformer, rank_memory_positions


@dataclass
class Retrieved:
    """Memories for one window of one sequence: memories (M, n_mem_layer, 2, Hkv, k, D), n_valid (M,)."""

    memories: Tensor
    n_valid: Tensor
    ids: list = field(default_factory=list)


Retriever = Callable[[int, list[int]], "Retrieved | None"]
"""retrieve(row, query_token_ids) -> memories for that row's window (None: no memory)."""
BatchRetriever = Callable[[list[tuple[int, list[int]]]], "list[Retrieved | None | Exception]"]
"""retrieve_many([(row, query_token_ids), ...]) -> per ask its memories, None, or the exception its retrieval
raised: the retrievals that fall due together as one call (a served retriever: one round trip for them all)."""


@dataclass
class Step:
    tokens: list[int | None]  # the new token of each row, None for a finished row
    finished: list[bool]
    retrievals: list[tuple[int, int, list]] = field(default_factory=list)  # (row, window, ids) done this step
    logits: Tensor | None = None  # (B, V) the distribution each row's token was drawn from


def sample(logits: Tensor, temperature: Tensor, top_p: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Per-row temperature (0 = greedy) and nucleus sampling. logits (B, V) -> (B,)."""
    greedy = logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature.clamp(min=1e-5)[:, None], dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    drop = (sorted_p.cumsum(-1) - sorted_p) > top_p[:, None]  # keep the smallest set reaching top_p
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    choice = torch.multinomial(sorted_p, 1, generator=generator).squeeze(-1)
    sampled = order.gather(-1, choice[:, None]).squeeze(-1)
    return torch.where(temperature > 0, sampled, greedy)


def token_logprobs(logits: Tensor, chosen: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """What OpenAI's `logprobs` report: the model's own distribution (before temperature and top-p). logits (N, V),
    chosen (N,) -> the chosen tokens' logprobs (N,), the k most likely tokens' logprobs (N, k) and ids (N, k)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = logp.topk(k, dim=-1)
    return logp.gather(-1, chosen[:, None]).squeeze(-1), top.values, top.indices


class MemoryWindows:
    """Per-row bookkeeping of which window's memories each sequence currently reads."""

    def __init__(self, model: Transformer, retrieve: Retriever | None, batch: int,
                 pool: ThreadPoolExecutor | None = None, retrieve_many: BatchRetriever | None = None):
        self.cfg = model.cfg
        self.retrieve = retrieve
        self.retrieve_many = retrieve_many
        """When given, the retrievals that fall due together (a prefill's windows, the rows that start a window in
        one step) go to it as one call instead of one `retrieve` each."""
        self.reads = retrieve is not None or retrieve_many is not None
        self.pool = pool
        """Where retrievals run beside the caller: those of one call at once (one `retrieve` each), and those begun
        a step early (`prefetch`). None: one after another, on the calling thread, when due."""
        c, dev, dtype = self.cfg, model.device, model.embed_tokens.weight.dtype
        self.slots = c.refs_per_window
        self.current = torch.zeros(batch, self.slots, c.n_mem_layer, 2, c.n_kv_head, c.mem_tokens, c.head_dim,
                                   device=dev, dtype=dtype)
        self.n_valid = torch.zeros(batch, self.slots, dtype=torch.long, device=dev)
        self.reserved = self.slots * c.mem_tokens
        """Cache slots the current memories take in each memory layer (`Transformer.setup_caches(memory_slots=)`)."""
        self.valid = torch.zeros(batch, self.reserved, dtype=torch.bool, device=dev)
        """(B, reserved) which reserved slots hold a memory token: the static buffer `Transformer.decode` reads."""
        self.changed: set[int] = set()  # rows whose memories are not yet in the caches
        self.ahead: dict[int, tuple[int, Future]] = {}
        """row -> (index of the token that starts its next window, that window's retrieval, begun a step early)."""
        self.dropped: list[Future] = []
        """Retrievals begun early whose row ended or moved on; `settle` waits for them."""

    def fetch(self, row: int, query: list[int]) -> tuple[Tensor, Tensor, list]:
        """The memories of one row's window, shaped for `current` (zeros where fewer came back)."""
        return self._place(self.retrieve(row, query) if self.retrieve else None)

    def _place(self, got: Retrieved | None) -> tuple[Tensor, Tensor, list]:
        if got is not None and len(got.n_valid) == self.slots:  # every slot filled: no zeroed buffer to copy into
            return got.memories.to(self.current), got.n_valid.to(self.n_valid), list(got.ids)
        mem = torch.zeros_like(self.current[0])
        n_valid = torch.zeros(self.slots, dtype=torch.long, device=mem.device)
        if got is None or len(got.n_valid) == 0:
            return mem, n_valid, []
        m = min(len(got.n_valid), self.slots)
        mem[:m] = got.memories[:m].to(mem)
        n_valid[:m] = got.n_valid[:m]
        return mem, n_valid, list(got.ids[:m])

    def _fetch(self, asks: list[tuple[int, list[int]]], on_pool: bool = False
               ) -> list[tuple[Tensor, Tensor, list] | Exception]:
        """`fetch` for each (row, query), a failure returned as its exception (one request's failure leaves the
        others' results); through `retrieve_many` in one call when there is one. On the pool, the copies are done
        before the results are: the caller's stream is not this thread's."""
        if not asks:
            return []
        if self.retrieve_many is not None:
            try:
                got = self.retrieve_many(asks)
            except Exception as e:  # noqa: BLE001 - the whole call failed: every ask reports it
                got = [e] * len(asks)
        else:
            got = []
            for row, query in asks:
                try:
                    got.append(self.retrieve(row, query) if self.retrieve else None)
                except Exception as e:  # noqa: BLE001 - reported per row by the caller
                    got.append(e)
        placed = []
        for result in got:
            try:
                placed.append(result if isinstance(result, Exception) else self._place(result))
            except Exception as e:  # noqa: BLE001
                placed.append(e)
        if on_pool and self.current.is_cuda:
            torch.cuda.current_stream(self.current.device).synchronize()
        return placed

    def fetch_many(self, asks: list[tuple[int, list[int]]]) -> list[tuple[Tensor, Tensor, list] | Exception]:
        """`_fetch` for each (row, query), in order: in one call through `retrieve_many`, else at once on the pool
        when there is one."""
        if self.retrieve_many is not None or self.pool is None or len(asks) < 2:
            return self._fetch(asks)
        return list(self.pool.map(lambda ask: self._fetch([ask], on_pool=True)[0], asks))

    def window_query(self, index: int, sequence: list[int], prompt_len: int) -> list[int] | None:
        """The retrieval query due before the token at `index` is fed: the previous window's tokens when a new window
        starts there after generated text (paper §3.1), else None (a previous window that was all prompt keeps its
        memories, §3.2)."""
        if not self.reads or not self.cfg.starts_window(index):
            return None
        lo, hi = self.cfg.window_span(self.cfg.window_of(index) - 1)
        return list(sequence[lo:hi]) if hi > prompt_len else None

    def prompt_asks(self, prompts: list[list[int]]) -> list[tuple[int, list[int]]]:
        """(row, query) of every prompt window, row by row: each window retrieves with its own tokens, the sink
        excepted (§3.2)."""
        return [(b, p[max(lo, self.cfg.sink_len):hi]) for b, p in enumerate(prompts)
                for lo, hi in map(self.cfg.window_span, range(self.cfg.n_windows(len(p))))]

    def prompt_memory(self, prompts: list[list[int]], total_len: int,
                      fetched: list[list | None] | None = None) -> tuple[MemoryBatch | None, list]:
        """Memories for prefill: each prompt window retrieves with its own tokens and is visible to itself only.
        fetched[row], where given, holds that row's windows' results already retrieved (`begin`'s, resolved); the
        other rows retrieve now."""
        if not self.reads:
            return None, []
        B, W = len(prompts), self.cfg.n_windows(total_len)
        mems = torch.zeros(B, W, *self.current.shape[1:], dtype=self.current.dtype, device=self.current.device)
        n_valid = torch.zeros(B, W, self.slots, dtype=torch.long, device=self.current.device)
        asks = [(b, w) for b, p in enumerate(prompts) for w in range(self.cfg.n_windows(len(p)))]
        fetched = fetched or [None] * B
        due = [ask for ask in self.prompt_asks(prompts) if fetched[ask[0]] is None]
        now = iter(self.fetch_many(due))
        got = [fetched[b][w] if fetched[b] is not None else next(now) for b, w in asks]
        for result in got:
            if isinstance(result, Exception):
                raise result
        rows, windows = (torch.tensor(i, device=mems.device) for i in zip(*asks))
        mems[rows, windows] = torch.stack([mem for mem, _, _ in got])  # one copy for all windows, not one each
        n_valid[rows, windows] = torch.stack([valid for _, valid, _ in got])
        last = (torch.arange(B, device=mems.device),
                torch.tensor([self.cfg.n_windows(len(p)) - 1 for p in prompts], device=mems.device))
        self.current[:B], self.n_valid[:B] = mems[last], n_valid[last]  # each prompt's last window's memories stay
        events = [(b, w, ids) for (b, w), (_, _, ids) in zip(asks, got)]
        self.changed.update(range(B))
        visible = torch.eye(W, dtype=torch.bool, device=mems.device).repeat_interleave(self.slots, dim=1)
        pos = torch.arange(total_len, device=mems.device).expand(B, -1)
        batch = MemoryBatch.from_references(mems.flatten(1, 2), n_valid.flatten(1), visible.expand(B, -1, -1), pos,
                                            self.cfg)
        return batch, events

    def before_tokens(self, rows: list[tuple[int, int, list[int], int]]) -> dict[int, list | Exception]:
        """Called before decoding one token in each of `rows` (row, index of the token, its sequence, prompt
        length): the rows where a new window starts after generated text take that window's memories, retrieved
        with the previous window's tokens as query: begun a step early (`prefetch`), or now, all at once.
        Returns {row: the retrieved ids, or the exception its retrieval raised}, in the order of `rows`."""
        due, asks = {}, []
        for row, index, sequence, prompt_len in rows:
            query = self.window_query(index, sequence, prompt_len)
            if query is not None and row in self.ahead and self.ahead[row][0] == index:
                due[row] = self.ahead.pop(row)[1]
                continue
            self._drop(row)
            if query is not None:
                due[row] = None
                asks.append((row, query))
        now = dict(zip((row for row, _ in asks), self.fetch_many(asks)))
        done = {}
        for row, early in due.items():
            result = early.result() if early is not None else now[row]
            if not isinstance(result, Exception):
                self.current[row], self.n_valid[row], result = result
                self.changed.add(row)
            done[row] = result
        return done

    def prefetch(self, rows: list[tuple[int, int, list[int], int]]) -> None:
        """Begin on the pool the retrievals `before_tokens` will take at the next step, for each of `rows` (row,
        index of the token fed at the next step, its sequence, prompt length): the query, the window before
        `index`, is known a step before the memories are needed, so the retrieval overlaps this step's forward and
        the next step need not wait for it. Without a pool, nothing: `before_tokens` retrieves then."""
        if self.pool is None:
            return
        due = [(row, index, query) for row, index, sequence, prompt_len in rows
               if (query := self.window_query(index, sequence, prompt_len)) is not None]
        for (row, index, _), future in zip(due, self.begin([(row, query) for row, _, query in due])):
            self.ahead[row] = (index, future)

    def begin(self, asks: list[tuple[int, list[int]]]) -> list[Future]:
        """Begin the retrievals of `asks` (row, query) on the pool: one call through `retrieve_many` (the asks that
        fall due together), else one task each, all at once. A future per ask of what `fetch_many` returns for
        it (its placed memories, or the exception its retrieval raised)."""
        if not asks:
            return []
        if self.retrieve_many is not None:
            batch = self.pool.submit(self._fetch, asks, True)
            return [_item(batch, j) for j in range(len(asks))]
        return [_item(self.pool.submit(self._fetch, [ask], True), 0) for ask in asks]

    def _drop(self, row: int) -> None:
        early = self.ahead.pop(row, None)
        if early is not None:
            self.dropped = [f for f in self.dropped if not f.done()] + [early[1]]

    def settle(self) -> None:
        """Wait for every retrieval begun early, dropped or still to be taken: a step about to compile and capture a
        CUDA graph runs with no other thread's work on the device."""
        for future in self.dropped + [future for _, future in self.ahead.values()]:
            future.result()  # _fetch returns its failures
        self.dropped.clear()

    def take_rows(self, start: int, other: "MemoryWindows") -> None:
        """Rows start.. take the current memories of `other` (a prefill of some rows, e.g. into free engine slots)."""
        rows = slice(start, start + len(other.n_valid))
        self.current[rows], self.n_valid[rows] = other.current, other.n_valid
        self.changed.update(range(rows.start, rows.stop))
        for row in range(rows.start, rows.stop):
            self._drop(row)

    def clear_row(self, row: int) -> None:
        """The row reads no memory until it is given some again (a retrieval begun for it is dropped)."""
        self.n_valid[row] = 0
        self.changed.add(row)
        self._drop(row)

    def write_caches(self, caches: list[KVCache]) -> None:
        """Memories that changed since the last call into the reserved slots of the memory layers' caches: once
        per window, not once per step. Slot order is the concatenated form's (`MemoryBatch.from_references`)."""
        if not self.changed:
            return
        rows = torch.tensor(sorted(self.changed), device=self.current.device)
        self.changed.clear()
        ranked = rank_memory_positions(self.current[rows], self.cfg)
        kv = ranked.permute(2, 3, 0, 4, 1, 5, 6).flatten(4, 5)  # (L, 2, n, Hkv, M*k, D)
        for layer, cache in enumerate(caches[:self.cfg.n_mem_layer]):
            cache.write_memory(rows, kv[layer, 0], kv[layer, 1])
        token_ok = torch.arange(self.cfg.mem_tokens, device=rows.device) < self.n_valid[..., None]  # (B, M, k)
        self.valid.copy_(token_ok.flatten(1))


def _item(batch: Future, j: int) -> Future:
    """A future of item j of `batch`'s list: one row's share of a retrieval done for several."""
    item: Future = Future()

    def resolve(done: Future) -> None:
        try:
            item.set_result(done.result()[j])
        except Exception as e:  # noqa: BLE001 - as `_fetch` does: the failure is the row's result
            item.set_result(e)

    batch.add_done_callback(resolve)
    return item


class Prefill:
    """Prompts into rows of static KV caches in one forward, each prompt window reading its own memories (§3.2);
    returns the logits of every prompt's last token (what the first new token is drawn from).

    With `compiled` the forward is `torch.compile`d (norms, rotary, masks and cache writes fuse; no per-op
    launches) and the vocabulary projection runs only at the last tokens. Prompts are right-padded to a multiple
    of LENGTH_BUCKET and batch, length and cache rows are marked dynamic, so whatever batches requests arrive in,
    it compiles twice per (memory or not): one prompt, and 2 or more (torch specializes size 1). Padding sits
    after every real token: no real token attends to it, and decoding masks its cache positions until it
    overwrites them. Opt-in (`MEMORY3_COMPILE_PREFILL=1`, read by `compile_prefill`): it is right on an H200
    (tests/model/test_gpu.py), but its speed is not yet measured and its compilations outlasted a 240 s benchmark
    there (BENCHMARKS.md), so the engine and `generate` run the prefill eager and unpadded by default.

    With `graphs` (the serving engine's default on CUDA) a short prompt batch (up to GRAPH_MAX_LEN tokens, no
    per-position logits asked) runs a CUDA graph per (batch bucket, GRAPH_LENGTH_BUCKET multiple, memory or not),
    captured from the eager forward on first use: one launch instead of thousands, so a prefill costs the batch it
    interrupts its GPU time, not the host's Python for every kernel (slowed further by a serving process's other
    threads). The graph writes a scratch cache of fixed rows, whose first positions are then copied into the
    destination rows (the prefill's rows move from request to request; a graph's addresses cannot). Off CUDA the
    same padded, scratch-cache path runs eagerly (what the CPU tests check against the plain prefill)."""

    LENGTH_BUCKET = 16
    DYNAMIC = ((0, 1), (0,), (0, 3), (0, 3), (0, 1, 2))
    """The dims of (idx, last, keys, values, mask) that vary: batch, prompt length, memory tokens."""
    GRAPH_LENGTH_BUCKET = 32
    GRAPH_MAX_LEN = 256
    """Longer prompts run eager: their GEMMs outweigh the launches, and the scratch cache stays small (2.4B, 32
    rows: 0.9 GB)."""

    def __init__(self, model: Transformer, compiled: bool = False, graphs: bool = False, max_batch: int = 1):
        self.model = model
        self.compiled = compiled
        self._forward = _compiled(model, "_compiled_prefill", _prefill_forward) if self.compiled else _prefill_forward
        self.bucket = self.LENGTH_BUCKET if self.compiled else 1
        self.graphs = graphs and not compiled
        self.replay = self.graphs and model.device.type == "cuda"
        model.weights_captured |= self.replay
        self.rows = next(b for b in DecodeStep.BATCH_BUCKETS if b >= max_batch)
        self._scratch: list[KVCache] | None = None
        self._static: dict[tuple[int, int, bool], dict] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.replay else None
        self._side = torch.cuda.Stream(device=model.device) if self.replay else None

    def _shape(self, n: int, length: int, all_logits: bool, max_len: int) -> tuple[int, int] | None:
        """(batch bucket, padded length) of the static path for n prompts of up to `length` tokens, or None."""
        P = min(-(-length // self.GRAPH_LENGTH_BUCKET) * self.GRAPH_LENGTH_BUCKET, max_len)
        if not self.graphs or all_logits or n > self.rows or P > self.GRAPH_MAX_LEN:
            return None
        return next(b for b in DecodeStep.BATCH_BUCKETS if b >= n), P

    def captures(self, prompts: list[list[int]], memory: bool, all_logits: bool, max_len: int) -> bool:
        """Whether this prefill captures a new CUDA graph: the caller keeps other threads' work off the device
        meanwhile (as for `DecodeStep.captured`)."""
        shape = self._shape(len(prompts), max(map(len, prompts)), all_logits, max_len)
        return self.replay and shape is not None and (*shape, memory) not in self._static

    def __call__(self, prompts: list[list[int]], caches: list[KVCache], windows: MemoryWindows,
                 all_logits: bool = False, fetched: list[list | None] | None = None
                 ) -> tuple[Tensor, Tensor | None, list]:
        """prompts (full model sequences) into `caches` (one row each); windows retrieves their memories, apart
        from the rows whose `fetched` results are given (`MemoryWindows.prompt_memory`).
        Returns the last tokens' logits (n, V), every position's logits (n, P, V) if `all_logits` (else None), and
        the retrieval events (row, window, ids)."""
        dev = self.model.device
        lengths = [len(p) for p in prompts]
        static = self._shape(len(prompts), max(lengths), all_logits, caches[0].max_len)
        P = static[1] if static else min(-(-max(lengths) // self.bucket) * self.bucket, caches[0].max_len)
        memory, events = windows.prompt_memory(prompts, P, fetched)
        idx = torch.tensor([p + [0] * (P - len(p)) for p in prompts], device=dev)  # (n, P), right-padded
        last = torch.tensor(lengths, device=dev) - 1
        args = (idx, last) + (() if memory is None else (memory.keys, memory.values, memory.mask))
        if static:
            return self._run_static(static[0], args, caches), None, events
        self.model.use_caches(caches)
        if self.compiled:  # batch, prompt length and memory tokens vary without a recompilation
            for t, dims in zip(args, self.DYNAMIC):
                for dim in dims:
                    torch._dynamo.maybe_mark_dynamic(t, dim)
            for cache in caches:  # the cache rows too (module buffers: static unless these flags say otherwise)
                torch._dynamo.maybe_mark_dynamic(cache.k, 0), torch._dynamo.maybe_mark_dynamic(cache.v, 0)
            with torch._dynamo.config.patch(force_parameter_static_shapes=False,
                                            force_nn_module_property_static_shapes=False):
                hidden, logits = self._forward(self.model, *args)
        else:
            hidden, logits = self._forward(self.model, *args)
        full = self.model.lm_head(self.model.norm(hidden)) if all_logits else None
        return logits, full, events

    def _run_static(self, rows: int, args: tuple[Tensor, ...], caches: list[KVCache]) -> Tensor:
        """The forward over static buffers of `rows` rows (args copied into their first n) into the scratch cache,
        replayed from its graph on CUDA; then the scratch's first positions into `caches`. Last logits (n, V)."""
        n, P = args[0].shape
        key = (rows, P, len(args) > 2)
        if self._scratch is None:
            c = self.model.cfg
            self._scratch = [KVCache(self.rows, c.n_kv_head, self.GRAPH_MAX_LEN, c.head_dim, caches[0].k.dtype,
                                     self.model.device) for _ in range(c.n_layer)]
        new = key not in self._static
        if new:
            self._static[key] = {"args": [torch.zeros((rows, *a.shape[1:]), dtype=a.dtype, device=a.device)
                                          for a in args], "caches": [cache.rows(0, rows) for cache in self._scratch]}
        static = self._static[key]
        for buffer, a in zip(static["args"], args):
            buffer[:n].copy_(a)
        if new and self.replay:
            self._capture(static)
        if self.replay:
            static["graph"].replay()
            logits = static["logits"]
        else:
            self.model.use_caches(static["caches"])
            logits = _prefill_forward(self.model, *static["args"])[1]
        for scratch, cache in zip(static["caches"], caches):
            cache.k[:, :, cache.reserved:cache.reserved + P] = scratch.k[:n, :, :P]
            cache.v[:, :, cache.reserved:cache.reserved + P] = scratch.v[:n, :, :P]
        return logits[:n].clone()

    def _capture(self, static: dict) -> None:
        self.model.use_caches(static["caches"])
        self._side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._side):  # warm-up off the capture (library handles, kernel choices)
            _prefill_forward(self.model, *static["args"])
        torch.cuda.current_stream().wait_stream(self._side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            static["logits"] = _prefill_forward(self.model, *static["args"])[1]
        static["graph"] = graph


def compile_prefill(device: torch.device) -> bool:
    """Whether the engine and `generate` compile their prefill: on CUDA with MEMORY3_COMPILE_PREFILL=1."""
    return device.type == "cuda" and os.environ.get("MEMORY3_COMPILE_PREFILL", "0") == "1"


def _prefill_forward(model: Transformer, idx: Tensor, last: Tensor, keys: Tensor | None = None,
                     values: Tensor | None = None, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The prefill forward over the caches in use: final hidden states (B, T, dim) and the logits at `last`
    (B,) of each row (B, V), without projecting every position onto the vocabulary."""
    memory = None if keys is None else MemoryBatch(keys, values, mask)
    hidden = model(idx, memory=memory, return_hidden=True)
    return hidden, model.lm_head(model.norm(hidden[torch.arange(idx.shape[0], device=idx.device), last]))


class DecodeStep:
    """One token for the first n rows of the caches: `model.decode` over static buffers (`tokens`, `pos` and
    `MemoryWindows.valid`), reading `key_len` rounded up to a LENGTH_BUCKET multiple. With `graphs` (CUDA), each
    (batch bucket, length bucket, memory) is captured once in a CUDA graph and replayed: one launch per step
    instead of thousands. Rows past n in a batch bucket decode too and are dropped (they write only their own
    cache rows, at positions a later prefill overwrites)."""

    LENGTH_BUCKET = 128
    BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

    def __init__(self, model: Transformer, caches: list[KVCache], valid: Tensor, graphs: bool = False,
                 compiled: bool | None = None):
        self.model, self.caches, self.valid = model, caches, valid
        self.batch, self.max_len = caches[0].k.shape[0], caches[0].max_len
        self.tokens = torch.zeros(self.batch, 1, dtype=torch.long, device=model.device)  # (B, 1) fed next
        self.pos = torch.zeros(self.batch, 1, dtype=torch.long, device=model.device)  # (B, 1) their positions
        self.graphs = graphs and model.device.type == "cuda"
        model.weights_captured |= self.graphs
        self._graphs: dict[tuple, tuple] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self._side = torch.cuda.Stream(device=model.device) if self.graphs else None
        """Every capture's warm-up runs on this one stream: the caching allocator keeps freed blocks per stream, so
        warm-ups on a new stream each could not reuse each other's memory."""
        if compiled is None:
            compiled = self.graphs and os.environ.get("MEMORY3_FUSE_DECODE", "1") == "1"
        self.compiled = compiled
        """With graphs (by default), the captured step is `torch.compile`d first: norms, rotary and cache writes
        fuse into a few kernels per layer, so a replay launches hundreds of kernels instead of thousands."""
        self._decode = _compiled(model, "_fused_decode", model.decode) if compiled else model.decode

    def _bucket(self, n: int, key_len: int) -> tuple[int, int]:
        # compiled, a single row runs in the 2-row bucket: torch specializes a size of 1, so a 1-row bucket
        # would be a compilation of its own (a minute or more at 2.4B) for a step that costs about the same
        smallest = 2 if self.compiled else 1
        rows = next((b for b in self.BATCH_BUCKETS if max(n, smallest) <= b <= self.batch), self.batch)
        return rows, min(-(-key_len // self.LENGTH_BUCKET) * self.LENGTH_BUCKET, self.max_len)

    def capture_all(self, memory: tuple[bool, ...] = (False, True)) -> int:
        """Compile and capture every (batch bucket, length bucket, memory) graph now; returns how many were new.
        A server calls this before taking traffic: a shape first met mid-traffic compiles and captures on the
        spot, and every request in flight waits for it (a minute or more for a 2.4B model). Two compilations
        (with memory and without, `_step`), then one capture per shape. Call only while no row is live: each
        capture decodes every row of its bucket."""
        if not self.graphs:
            return 0
        before = len(self._graphs)
        batches = sorted({self._bucket(b, 1)[0] for b in range(1, self.batch + 1)}, reverse=True)
        for mem in memory:
            for rows in batches:
                for key_len in range(self.LENGTH_BUCKET, self.max_len + self.LENGTH_BUCKET, self.LENGTH_BUCKET):
                    self(rows, min(key_len, self.max_len), mem)
        torch.cuda.synchronize()
        return len(self._graphs) - before

    def _step(self, *args) -> Tensor:
        """The step; compiled, it is generic in the batch and the length from its first shape on: one compilation
        per memory-or-not serves every bucket. Torch's automatic dynamic shapes compiled the first shape static
        and again as each dimension first changed: 5 compilations in a server's warm-up instead of 2, each one
        stalling every request in flight. Parameters stay static (torch's default)."""
        if not self.compiled:
            return self._decode(*args)
        import torch._dynamo

        with torch._dynamo.config.patch(assume_static_by_default=False):
            return self._decode(*args)

    def shapes(self) -> set[tuple[int, int, bool]]:
        """(batch bucket, length bucket, memory) of every graph captured so far."""
        return set(self._graphs)

    def captured(self, n: int, key_len: int, memory: bool) -> bool:
        """Whether a call with these arguments replays a graph (or runs eager) rather than compiling and capturing
        one: work on other threads (a retrieval begun early) then runs beside a replay, never beside a capture."""
        return not self.graphs or (*self._bucket(n, key_len), memory) in self._graphs

    def __call__(self, n: int, key_len: int, memory: bool) -> Tensor:
        """Logits (n, V) of the tokens in `tokens[:n]` at `pos[:n]`; key_len > every pos. The result is only
        valid until the next call (it lives in the graphs' memory)."""
        rows, key_len = self._bucket(n, key_len)
        args = (self.tokens[:rows], self.pos[:rows], key_len, self.valid[:rows] if memory else None)
        # the whole caches, whatever the bucket: the step reads their first `rows` rows, so the compiled step
        # sees one module per layer and stays generic in the batch size (a row view per bucket was a new module,
        # and every batch bucket compiled again)
        self.model.use_caches(self.caches)
        if not self.graphs:
            return self._step(*args)[:n]
        key = (rows, key_len, memory)
        if key not in self._graphs:
            self._side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._side):  # warm-up off the capture (compilation, library handles, kernels)
                self._step(*args)
            torch.cuda.current_stream().wait_stream(self._side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                out = self._step(*args)
            self._graphs[key] = (graph, out)
        graph, out = self._graphs[key]
        graph.replay()
        return out[:n]


class TokenReadback:
    """Sampled tokens (and any tensors beside them) copied to the host behind the step launched after them: on CUDA
    into pinned memory with an event, so waiting for them does not wait for that step (the one host sync per
    token overlaps it)."""

    def __init__(self, n: int, device: torch.device):
        self.cuda = device.type == "cuda"
        self.host = torch.empty(n, dtype=torch.long, pin_memory=self.cuda)
        self.event = torch.cuda.Event() if self.cuda else None
        self.count, self.extra = 0, ()

    def start(self, tokens: Tensor, *extra: Tensor) -> None:
        """Copies begin now, in stream order: call before launching the step that follows."""
        self.count = len(tokens)
        self.host[:self.count].copy_(tokens, non_blocking=True)
        self.extra = tuple(t.to("cpu", non_blocking=True) for t in extra)  # pinned on CUDA: an async copy
        if self.cuda:
            self.event.record()

    def wait(self) -> tuple[list[int], tuple[Tensor, ...]]:
        """The tokens as a list, and the extra tensors on the host."""
        if self.cuda:
            self.event.synchronize()
        return self.host[:self.count].tolist(), self.extra


def _compiled(model: Transformer, name: str, fn):
    """`fn` compiled once per model (kept on it as `name`). Callers say which dimensions vary (`Prefill` marks
    them, `DecodeStep._step` compiles generic), so new buckets do not pay a compilation each."""
    compiled = model.__dict__.get(name)
    model.weights_captured = True
    if compiled is None:
        import torch._dynamo

        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, limit, max(64, getattr(torch._dynamo.config, limit)))
        compiled = model.__dict__[name] = torch.compile(fn, fullgraph=True)
    return compiled


def _decode_step(model: Transformer, batch: int, max_len: int, memory_slots: int, valid: Tensor,
                 graphs: bool) -> DecodeStep:
    """Caches and step for one generate call; with graphs, kept on the model per shape, so later calls of the
    same shape replay the graphs captured by the first (they are bound to these cache buffers)."""
    kept = model.__dict__.setdefault("_decode_steps", {}) if graphs else {}
    key = (batch, max_len, memory_slots)
    if key not in kept:
        model.setup_caches(batch, max_len, memory_slots=memory_slots)
        kept[key] = DecodeStep(model, model.caches(), valid, graphs=graphs)
    return kept[key]


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: list[int] | int,
             retrieve: Retriever | None = None, temperature: float | list[float] = 0.0,
             top_p: float | list[float] = 1.0, stop_ids: set[int] | None = None,
             generator: torch.Generator | None = None, compile: bool = False) -> Iterator[Step]:
    """Batched decoding; yields one Step per generated position. Prompts are full model sequences (sink first).

    compile=True replays the one-token step from CUDA graphs (`DecodeStep`) and compiles the prompt forward
    (`Prefill`); CUDA only, the first step of each batch and length bucket pays the capture. Each step is launched
    before the previous token reaches the host (`TokenReadback`): the host's work per token runs beside the
    device's instead of between two steps."""
    B, dev = len(prompts), model.device
    max_new = [max_new_tokens] * B if isinstance(max_new_tokens, int) else list(max_new_tokens)
    lengths = [len(p) for p in prompts]
    total = max(l + n for l, n in zip(lengths, max_new))
    if total > model.cfg.max_seq_len:
        raise ValueError(f"prompt + max_new_tokens = {total} exceeds max_seq_len={model.cfg.max_seq_len}")
    temps = temperature if isinstance(temperature, list) else [temperature] * B
    temp = torch.tensor(temps, device=dev)
    top_p = torch.tensor(top_p if isinstance(top_p, list) else [top_p] * B, device=dev)
    stop_ids = stop_ids or set()

    windows = MemoryWindows(model, retrieve, B)
    step_fn = _decode_step(model, B, total, windows.reserved if retrieve else 0, windows.valid, compile)
    caches, windows.valid = step_fn.caches, step_fn.valid
    try:
        last, _, events = Prefill(model, compiled=compile and compile_prefill(dev))(prompts, caches, windows)
        sequences = [list(p) for p in prompts]
        done = [n == 0 for n in max_new]
        readback = TokenReadback(B, dev)
        for _ in range(max(max_new)):
            chosen = sample(last, temp, top_p, generator) if any(temps) else last.argmax(dim=-1)
            readback.start(chosen)
            # The next step is launched before these tokens reach the host, so the host's work below overlaps its
            # forward. Its inputs need no token values: positions advance by one, and a window's query ends
            # before the token fed. A row that ends with this token (by length: known now; by a stop token: known
            # after the read) decodes once more for nothing, and a retrieval begun for it is dropped.
            ending = [done[b] or len(sequences[b]) + 1 - lengths[b] >= max_new[b] for b in range(B)]
            pos = [min(len(s), total - 1) for s in sequences]  # index of the token fed next: this one
            launched, following = {}, None
            if not all(ending):
                launched = windows.before_tokens([(b, pos[b], sequences[b], lengths[b]) for b in range(B)
                                                  if not ending[b]])
                windows.write_caches(caches)
                step_fn.tokens.copy_(chosen[:, None])
                step_fn.pos.copy_(torch.tensor(pos)[:, None], non_blocking=True)
                following = step_fn(B, max(pos) + 1, memory=retrieve is not None).clone()
            nxt, _ = readback.wait()
            step = Step(tokens=[None] * B, finished=list(done), retrievals=events, logits=last)
            for b in range(B):
                if done[b]:
                    continue
                sequences[b].append(nxt[b])
                step.tokens[b] = nxt[b]
                done[b] = nxt[b] in stop_ids or len(sequences[b]) - lengths[b] >= max_new[b]
                step.finished[b] = done[b]
            yield step
            if all(done):
                break
            events = []
            for b, ids in launched.items():
                if done[b]:  # stopped by the token just read: the sequential loop never retrieved for it
                    continue
                if isinstance(ids, Exception):
                    raise ids
                events.append((b, model.cfg.window_of(pos[b]), ids))
            last = following
    finally:
        model.clear_caches()
