"""Retrieved references for every training window, computed once before the continual stage (paper §3.6).

Each `window`-token window of a training sequence retrieves with its own decoded tokens as the query (a prompt
record, prepare.py: with its prompt, the question without its answer, as at inference); the first
`refs_per_window` candidates that pass the leakage filter become that window's `ref_rows` (bank rows, -1 = none).
This runs as a Ray Data pass with an actor pool holding the Retriever, so the training workers never wait on
embedding or FAISS: a step only encodes the references it is handed.

Leakage filter (paper §3.6): a reference is never attached to a sequence when
  1. it comes from one of the sequence's own source documents (its doc_id is in the row's source_ids; the
     Retriever is asked to exclude them and the result is checked again here), or
  2. its overlap with the training sequence (eq. 6) exceeds `overlap_threshold` (paper: 0.9), where
     overlap(t, r) = max N of a common subsequence of t and r whose span in t is at most 2|r|, divided by |r|.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa

from model.config import ModelConfig
from model.tokenizer import Tokenizer


# ---------------------------------------------------------------- eq. 6
def lcs_length(pattern: Sequence[int], text: Sequence[int]) -> int:
    """Length of the longest common subsequence, bit-parallel (Allison-Dix / Hyyro): O(|text|) big-int steps
    over |pattern|-bit vectors instead of an O(|pattern| |text|) table."""
    m = len(pattern)
    if not m or not len(text):
        return 0
    masks: dict[int, int] = {}
    for i, c in enumerate(pattern):
        masks[c] = masks.get(c, 0) | (1 << i)
    full = (1 << m) - 1
    v = full
    for c in text:
        u = v & masks.get(c, 0)
        v = ((v + u) | (v - u)) & full
    return m - bin(v).count("1")


def overlap(train: Sequence[int], ref: Sequence[int]) -> float:
    """Paper eq. 6, exactly: max over start s of LCS(ref, train[s : s + 2|r| + 1]) / |r|.

    Windows of length 3|r| at stride |r| contain every allowed span, so their LCS bounds the exact value from
    above; only windows whose bound beats the best so far are refined start by start."""
    r = len(ref)
    if not r:
        return 0.0
    train = list(train)
    span = 2 * r + 1
    if len(train) <= span:
        return lcs_length(ref, train) / r
    starts = range(0, max(1, len(train) - span + 1), r)
    bounds = sorted(((lcs_length(ref, train[s:s + span + r]), s) for s in starts), reverse=True)
    best = 0
    for bound, s0 in bounds:
        if bound <= best:
            break
        for s in range(s0, min(s0 + r, len(train) - span + 1)):
            best = max(best, lcs_length(ref, train[s:s + span]))
            if best == bound:
                break
    return best / r


def leakage(train: Sequence[int], source_ids: set[str], record: dict, threshold: float) -> str | None:
    """Why `record` must not be attached to this training sequence, or None if it may."""
    if record["doc_id"] in source_ids:
        return "same_document"
    if overlap(train, record["tokens"]) > threshold:
        return "overlap"
    return None


# ---------------------------------------------------------------- windows
def window_token_spans(n_tokens: int, n_windows: int, cfg: ModelConfig) -> list[tuple[int, int]]:
    """[start, end) token index of each window of a sequence with n_tokens tokens (`ModelConfig.window_span`,
    cut at the inputs: the last token is only a target)."""
    inputs = n_tokens - 1
    spans = []
    for w in range(n_windows):
        start, end = cfg.window_span(w)
        spans.append((start, max(start, min(end, inputs))))
    return spans


def select_references(candidates: list[int], records: dict[int, dict], train: list[int], source_ids: set[str],
                      k: int, threshold: float, counts: dict) -> list[int]:
    """The first k candidates that pass the leakage filter, padded with -1."""
    chosen: list[int] = []
    for row in candidates:
        if len(chosen) == k:
            break
        if row in chosen:
            continue
        reason = leakage(train, source_ids, records[row], threshold)
        if reason:
            counts[reason] += 1
            continue
        chosen.append(row)
    return chosen + [-1] * (k - len(chosen))


class ReferenceAssigner:
    """Ray Data actor: adds `ref_rows` (W lists of refs_per_window bank rows) to each training sequence."""

    def __init__(self, bank_uri: str, tokenizer_json: str, model: dict, n_windows: int, refs_per_window: int,
                 candidates: int, overlap_threshold: float, embedder: str | None = None, device: str = "cpu"):
        from bank.embedder import Embedder
        from bank.index import Retriever
        from bank.reader import MemoryBank

        self.bank = MemoryBank.open(bank_uri)
        self.retriever = Retriever.open(bank_uri, embedder=Embedder(embedder, device=device) if embedder else None,
                                        bank=self.bank, device=device)
        self.tk = Tokenizer.from_str(tokenizer_json)
        self.cfg = ModelConfig.from_dict(model)
        self.n_windows, self.k = n_windows, refs_per_window
        self.candidates, self.threshold = max(candidates, refs_per_window), overlap_threshold

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipelines.prepare import decode_text

        tokens = batch.column("tokens").to_pylist()
        sources = [set(s) for s in batch.column("source_ids").to_pylist()]
        prompts = batch.column("query").to_pylist() if "query" in batch.column_names else [""] * len(tokens)
        queries, owners = [], []  # one query per non-empty window
        for i, toks in enumerate(tokens):
            for w, (a, b) in enumerate(window_token_spans(len(toks), self.n_windows, self.cfg)):
                # a prompt record retrieves with its prompt, as inference retrieves with the question alone
                text = (prompts[i] or decode_text(self.tk, toks[a:b])) if b > a else ""
                if text.strip():
                    queries.append(text)
                    owners.append((i, w))
        hits = self.retriever.search(queries, self.candidates, exclude_doc_ids=[sources[i] for i, _ in owners]) \
            if queries else []
        rows = sorted({r for h in hits for r in h})
        records = dict(zip(rows, self.bank.records(rows))) if rows else {}
        ref_rows = [[[-1] * self.k for _ in range(self.n_windows)] for _ in tokens]
        counts = [{"same_document": 0, "overlap": 0} for _ in tokens]
        for (i, w), cands in zip(owners, hits):
            ref_rows[i][w] = select_references(list(cands), records, tokens[i][self.cfg.sink_len:], sources[i],
                                               self.k, self.threshold, counts[i])
        return batch.append_column("ref_rows", pa.array(ref_rows, type=pa.list_(pa.list_(pa.int64())))) \
            .append_column("leak_same_document", pa.array([c["same_document"] for c in counts], type=pa.int32())) \
            .append_column("leak_overlap", pa.array([c["overlap"] for c in counts], type=pa.int32()))


def assign_references(ds, *, bank_uri: str, tokenizer_json: str, cfg: ModelConfig, n_windows: int,
                      refs_per_window: int, candidates: int, overlap_threshold: float, embedder: str | None,
                      actors: int, cpus_per_actor: float, batch_size: int, gpus_per_actor: float = 0,
                      env_vars: dict | None = None):
    """The precompute pass: `ds` (prepared sequences) -> `ds` with ref_rows, leak_same_document, leak_overlap.
    gpus_per_actor > 0 embeds the queries on a GPU (it runs before training takes the GPUs)."""
    import ray

    # one block per batch, so every actor gets work: Ray Data reads a few small files as one block, which one actor
    # then embedded alone (the quickstart's pass: 78 s instead of 44)
    ds = ds.repartition(target_num_rows_per_block=batch_size)
    return ds.map_batches(
        ReferenceAssigner, batch_format="pyarrow", batch_size=batch_size,
        fn_constructor_kwargs={"bank_uri": bank_uri, "tokenizer_json": tokenizer_json, "model": cfg.to_dict(),
                               "n_windows": n_windows, "refs_per_window": refs_per_window,
                               "candidates": candidates, "overlap_threshold": overlap_threshold,
                               "embedder": embedder, "device": "cuda" if gpus_per_actor > 0 else "cpu"},
        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus_per_actor, num_gpus=gpus_per_actor,
        **({"runtime_env": {"env_vars": env_vars}} if env_vars else {}))


def assignment_stats(ds, n_windows: int) -> dict:
    """Counts over an assigned (materialized) dataset: windows with references, leakage drops."""
    total = {"sequences": 0, "windows": 0, "windows_with_refs": 0, "references": 0,
             "dropped_same_document": 0, "dropped_overlap": 0}
    for batch in ds.select_columns(["ref_rows", "leak_same_document", "leak_overlap"]).iter_batches(
            batch_format="pyarrow", batch_size=4096):
        rows = np.array(batch.column("ref_rows").to_pylist(), dtype=np.int64).reshape(len(batch), n_windows, -1)
        total["sequences"] += len(batch)
        total["windows"] += len(batch) * n_windows
        total["windows_with_refs"] += int((rows >= 0).any(-1).sum())
        total["references"] += int((rows >= 0).sum())
        total["dropped_same_document"] += int(np.sum(batch.column("leak_same_document").to_numpy()))
        total["dropped_overlap"] += int(np.sum(batch.column("leak_overlap").to_numpy()))
    return total
