"""Decoding with explicit memory (paper §3.2): prompt windows read their own memories; while generating, every
new 64-token window drops the memories and retrieves new ones using the previous window's tokens as query. The
first window that starts after a prompt ending on a window boundary keeps the prompt's last memories (so a
128-in/128-out request retrieves 3 times, as the paper counts).

Pure PyTorch: retrieval is a callback, so serving (FAISS + MemoryStore) and tests (fixed memories) share this loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor

from model.transformer import MemoryBatch, Transformer


@dataclass
class Retrieved:
    """Memories for one window of one sequence: memories (M, n_mem_layer, 2, Hkv, k, D), n_valid (M,)."""

    memories: Tensor
    n_valid: Tensor
    ids: list = field(default_factory=list)


Retriever = Callable[[int, list[int]], "Retrieved | None"]
"""retrieve(row, query_token_ids) -> memories for that row's window (None: no memory)."""


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

    def __init__(self, model: Transformer, retrieve: Retriever | None, batch: int):
        self.cfg = model.cfg
        self.retrieve = retrieve
        c, dev, dtype = self.cfg, model.device, model.embed_tokens.weight.dtype
        self.slots = c.refs_per_window
        self.current = torch.zeros(batch, self.slots, c.n_mem_layer, 2, c.n_kv_head, c.mem_tokens, c.head_dim,
                                   device=dev, dtype=dtype)
        self.n_valid = torch.zeros(batch, self.slots, dtype=torch.long, device=dev)
        self._decode_batch: tuple[int, MemoryBatch] | None = None  # (rows, batch): rebuilt when memories change

    def fetch(self, row: int, query: list[int]) -> tuple[Tensor, Tensor, list]:
        got = self.retrieve(row, query) if self.retrieve else None
        mem = torch.zeros_like(self.current[0])
        n_valid = torch.zeros(self.slots, dtype=torch.long, device=mem.device)
        if got is None or len(got.n_valid) == 0:
            return mem, n_valid, []
        m = min(len(got.n_valid), self.slots)
        mem[:m] = got.memories[:m].to(mem)
        n_valid[:m] = got.n_valid[:m]
        return mem, n_valid, list(got.ids[:m])

    def prompt_memory(self, prompts: list[list[int]], total_len: int) -> tuple[MemoryBatch | None, list]:
        """Memories for prefill: each prompt window retrieves with its own tokens and is visible to itself only."""
        if self.retrieve is None:
            return None, []
        B, W = len(prompts), self.cfg.n_windows(total_len)
        mems = torch.zeros(B, W, *self.current.shape[1:], dtype=self.current.dtype, device=self.current.device)
        n_valid = torch.zeros(B, W, self.slots, dtype=torch.long, device=self.current.device)
        events = []
        for b, p in enumerate(prompts):
            for w in range(self.cfg.n_windows(len(p))):
                lo, hi = self.cfg.window_span(w)
                mems[b, w], n_valid[b, w], ids = self.fetch(b, p[max(lo, self.cfg.sink_len):hi])
                events.append((b, w, ids))
            self.current[b], self.n_valid[b] = mems[b, w], n_valid[b, w]
        self._decode_batch = None
        visible = torch.eye(W, dtype=torch.bool, device=mems.device).repeat_interleave(self.slots, dim=1)
        pos = torch.arange(total_len, device=mems.device).expand(B, -1)
        batch = MemoryBatch.from_references(mems.flatten(1, 2), n_valid.flatten(1), visible.expand(B, -1, -1), pos,
                                            self.cfg)
        return batch, events

    def before_token(self, row: int, index: int, sequence: list[int], prompt_len: int) -> list | None:
        """Called before decoding the token at `index`: re-retrieve when a new window starts after generated text."""
        if self.retrieve is None or not self.cfg.starts_window(index):
            return None
        lo, hi = self.cfg.window_span(self.cfg.window_of(index) - 1)
        if hi <= prompt_len:  # the previous window was all prompt: its memories stay (paper §3.2)
            return None
        self.current[row], self.n_valid[row], ids = self.fetch(row, sequence[lo:hi])
        self._decode_batch = None
        return ids

    def take_rows(self, start: int, other: "MemoryWindows") -> None:
        """Rows start.. take the current memories of `other` (a prefill of some rows, e.g. into free engine slots)."""
        rows = slice(start, start + len(other.n_valid))
        self.current[rows], self.n_valid[rows] = other.current, other.n_valid
        self._decode_batch = None

    def clear_row(self, row: int) -> None:
        """The row reads no memory until it is given some again."""
        self.n_valid[row] = 0
        self._decode_batch = None

    def decode_memory(self, input_pos: Tensor) -> MemoryBatch | None:
        """One token for each of the first input_pos.shape[0] rows: every valid slot of a row's current memories is
        visible, whatever the position."""
        if self.retrieve is None:
            return None
        B = input_pos.shape[0]
        if self._decode_batch is None or self._decode_batch[0] != B:
            visible = torch.ones(B, 1, self.slots, dtype=torch.bool, device=input_pos.device)
            batch = MemoryBatch.from_references(self.current[:B], self.n_valid[:B], visible,
                                                torch.full_like(input_pos, self.cfg.sink_len), self.cfg)
            self._decode_batch = (B, batch)
        return self._decode_batch[1]


def decode_step(model: Transformer, cache_len: int):
    """The compiled single-token forward, kept per cache length (CUDA graphs need static shapes)."""
    cache = model.__dict__.setdefault("_compiled_decode", {})
    if cache_len not in cache:
        cache[cache_len] = torch.compile(model, mode="reduce-overhead", dynamic=False)
    return cache[cache_len]


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: list[int] | int,
             retrieve: Retriever | None = None, temperature: float | list[float] = 0.0,
             top_p: float | list[float] = 1.0, stop_ids: set[int] | None = None,
             generator: torch.Generator | None = None, compile: bool = False) -> Iterator[Step]:
    """Batched decoding; yields one Step per generated position. Prompts are full model sequences (sink first).

    compile=True runs the one-token step through torch.compile with CUDA graphs (static cache and memory shapes
    make that possible); the first call per batch size pays the compilation."""
    B, dev = len(prompts), model.device
    max_new = [max_new_tokens] * B if isinstance(max_new_tokens, int) else list(max_new_tokens)
    lengths = [len(p) for p in prompts]
    total = max(l + n for l, n in zip(lengths, max_new))
    if total > model.cfg.max_seq_len:
        raise ValueError(f"prompt + max_new_tokens = {total} exceeds max_seq_len={model.cfg.max_seq_len}")
    temp = torch.tensor(temperature if isinstance(temperature, list) else [temperature] * B, device=dev)
    top_p = torch.tensor(top_p if isinstance(top_p, list) else [top_p] * B, device=dev)
    stop_ids = stop_ids or set()

    windows = MemoryWindows(model, retrieve, B)
    P = max(lengths)
    idx = torch.tensor([p + [0] * (P - len(p)) for p in prompts], device=dev)
    model.setup_caches(B, total)
    step_fn = decode_step(model, total) if compile else model
    try:
        memory, events = windows.prompt_memory(prompts, P)
        logits = model(idx, memory=memory)
        last = logits[torch.arange(B, device=dev), torch.tensor(lengths, device=dev) - 1]
        sequences = [list(p) for p in prompts]
        done = [n == 0 for n in max_new]
        for _ in range(max(max_new)):
            nxt = sample(last, temp, top_p, generator).tolist()
            step = Step(tokens=[None] * B, finished=list(done), retrievals=events, logits=last)
            events = []
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
            pos = [len(s) - 1 for s in sequences]  # index of the token fed next
            for b in range(B):
                if not done[b]:
                    ids = windows.before_token(b, pos[b], sequences[b], lengths[b])
                    if ids is not None:
                        events.append((b, model.cfg.window_of(pos[b]), ids))
            input_pos = torch.tensor(pos, device=dev)[:, None]
            cur = torch.tensor([s[-1] for s in sequences], device=dev)[:, None]
            last = step_fn(cur, input_pos=input_pos, memory=windows.decode_memory(input_pos))[:, -1].clone()
    finally:
        model.clear_caches()
