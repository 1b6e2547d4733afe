"""Retrieval and memory loading at scale (issue 16, goal 4): a synthetic quantized bank of 10^6 references and an
IVF-PQ index of 10^7 384-d vectors, both streamed so RAM stays bounded. One JSON line per result:

- `bank_build`: references written through the bank's own writer (create_bank, RecordLayout.pack with a trained
  quantizer, write_shard, write_manifest), seconds and bytes;
- `index_build`: train + add seconds of `bank.index.trained_index` + `add_with_ids` in batches, index bytes per
  vector (file, and resident-set growth, which counts the batches in flight too);
- `search`: single-query and batched top-5 latency p50/p99 and recall@5 against exact search (brute force over
  the same vectors, streamed alongside the add) on a sample of queries, per nprobe (and, with `--refine`, per
  refine_k_factor: 1 re-scores nothing, the plain IVF-PQ's answer); `recall_5_at_50` is the share of the exact
  top-5 among the index's top-50 (what re-ranking 50 candidates on finer codes can recover);
- `fetch`: `MemoryStore.fetch` p99 of 5 references from the RAM tier (LRU hits), the disk tier (misses on shard
  files evicted from the page cache first), and on CUDA the GPU tier (decoded on the GPU) and its host tier.

    python -m benchmarks.scale --scale smoke              # 10^4 references, 10^5 vectors: about a minute
    python -m benchmarks.scale --scale smoke --refine SQ8 --refine-k-factor 1 10   # IVF…,PQ32,Refine(SQ8)
    OMP_NUM_THREADS=1 nice -n 19 python -m benchmarks.scale --scale full --out /tmp/scale

Vectors are unit vectors around random cluster centres (what sentence embeddings look like to an IVF), generated
in fixed blocks from per-block seeds, so any row range is reproducible without holding the rest. Memories are
Gaussian key/value vectors of the tiny preset's shape; `--pool` distinct ones are quantized with the bank's codec
and their records cycled over the rows (quantizing 10^8 vectors at one thread takes hours; a record's fetch cost
does not depend on its content).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from bank.chunking import Reference
from bank.format import RecordLayout
from bank.index import normalized, trained_index
from bank.index_shards import refine_stage, set_search
from bank.manifest import create_bank, manifest_entry, shard_uri, write_manifest, write_shard
from bank.reader import MemoryBank
from bank.store import MemoryStore
from benchmarks.model import commit
from model.config import ModelConfig
from model.quantizer import MemoryQuantizer, factory_for

SCALES = {  # smoke: the pytest configuration; full: the sizes
    "smoke": dict(references=10_000, vectors=100_000, nlist=256, pq=32, train=10_000, pq_train=10_000,
                  clusters=1_000, pool=64, quantizer="PQ8np", queries=100, latency_queries=200),
    "full": dict(references=1_000_000, vectors=10_000_000, nlist=4096, pq=32, train=160_000, pq_train=32_768,
                 clusters=10_000, pool=512, quantizer="auto", queries=200, latency_queries=1000),
}
BLOCK = 10_000  # rows per generated block (and per bank shard)
DIM = 384


def emit(**row) -> None:
    print(json.dumps({"bench": "scale", **row, "commit": commit()}), flush=True)


def percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --- synthetic data --------------------------------------------------------------------------------------------

class Embeddings:
    """Clustered unit vectors by row: a random centre plus Gaussian noise in a shared `intrinsic`-dim subspace
    (sentence embeddings have a low intrinsic dimension; isotropic 384-d noise is a worst case no PQ code can
    resolve). Block b (rows b*BLOCK ...) is drawn from its own seed, so rows [a, b) are the same whichever batches
    they are asked in; `fresh` draws other points of the same distribution (queries, the training sample) from
    blocks no row uses."""

    FRESH = 1 << 40  # first block of the fresh streams

    def __init__(self, clusters: int, seed: int = 0, intrinsic: int = 32, noise: float = 0.8):
        rng = np.random.default_rng([seed, self.FRESH - 1])
        self.centres = normalized(rng.standard_normal((clusters, DIM), dtype=np.float32))
        basis = np.linalg.qr(rng.standard_normal((DIM, intrinsic)))[0].T  # (intrinsic, DIM), orthonormal rows
        self.basis = np.ascontiguousarray(basis * (noise / np.sqrt(intrinsic)), dtype=np.float32)
        self.seed = seed

    def block(self, b: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, b])
        x = self.centres[rng.integers(0, len(self.centres), BLOCK)]
        x += rng.standard_normal((BLOCK, len(self.basis)), dtype=np.float32) @ self.basis
        return normalized(x)

    def rows(self, start: int, stop: int, first_block: int = 0) -> np.ndarray:
        first, last = start // BLOCK, (stop - 1) // BLOCK
        x = np.concatenate([self.block(first_block + b) for b in range(first, last + 1)])
        return x[start - first * BLOCK: stop - first * BLOCK]

    def fresh(self, n: int, stream: int) -> np.ndarray:
        return self.rows(0, n, self.FRESH + (stream << 20))


def synthetic_pool(cfg: ModelConfig, n: int, factory: str, seed: int = 0) -> tuple[MemoryQuantizer, np.ndarray]:
    """`n` Gaussian memories of `cfg`'s shape, a quantizer trained on their vectors, and their records."""
    g = torch.Generator().manual_seed(seed)
    memories = torch.randn((n, *cfg.memory_shape), generator=g)
    n_valid = torch.randint(cfg.mem_tokens // 2, cfg.mem_tokens + 1, (n,), generator=g)
    slot = torch.arange(cfg.mem_tokens) < n_valid[:, None]
    memories *= slot[:, None, None, None, :, None]
    quantizer = MemoryQuantizer(factory, cfg.head_dim)
    vectors = memories.reshape(-1, cfg.head_dim)
    quantizer.train(vectors[vectors.abs().sum(-1) > 0])
    return quantizer, RecordLayout.create(cfg, quantizer).pack(memories, n_valid, quantizer)


def build_bank(uri: str, n: int, embeddings: Embeddings, pool: int, factory: str) -> MemoryBank:
    """A bank of n synthetic references through the bank's writer, one shard per BLOCK rows (one document each)."""
    cfg = ModelConfig.from_name("tiny")
    factory = factory_for(cfg.head_dim) if factory == "auto" else factory
    t0 = time.perf_counter()
    quantizer, records = synthetic_pool(cfg, pool, factory)
    quantize_s = time.perf_counter() - t0
    manifest = create_bank(uri, config=cfg, model_sha256="synthetic", tokenizer_sha256="synthetic",
                           quantizer=quantizer, embedder={"model": "synthetic-clustered", "dim": DIM},
                           shard_documents=BLOCK, quantizer_sample=pool)
    rng = np.random.default_rng(1)
    for start in range(0, n, BLOCK):
        rows = np.arange(start, min(start + BLOCK, n))
        refs = [Reference(f"doc-{r}#0", f"doc-{r}", f"Entity {r} belongs to group {r % 997} and was seen in "
                          f"year {1900 + r % 120}.", rng.integers(0, 2048, 24).tolist()) for r in rows]
        marker = write_shard(uri, f"synthetic-{start // BLOCK:06d}", refs, records[rows % pool],
                             embeddings.rows(int(rows[0]), int(rows[-1]) + 1))
        manifest["shards"].append(manifest_entry(marker))
    manifest = write_manifest(uri, manifest)
    seconds = time.perf_counter() - t0
    emit(result="bank_build", references=n, quantizer=factory, record_bytes=manifest["record"]["record_bytes"],
         bytes=manifest["bytes"], distinct_memories=pool, quantizer_train_encode_s=round(quantize_s, 2),
         seconds=round(seconds, 2), references_per_second=round(n / seconds))
    return MemoryBank.open(uri)


# --- index -----------------------------------------------------------------------------------------------------

class ExactTopK:
    """Running exact top-k inner products of a few queries over streamed batches: the recall reference."""

    def __init__(self, queries: np.ndarray, k: int):
        self.q, self.k = queries, k
        self.scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
        self.ids = np.zeros((len(queries), 0), dtype=np.int64)

    def add(self, x: np.ndarray, start: int) -> None:
        s = self.q @ x.T
        top = np.argpartition(-s, self.k - 1, axis=1)[:, :self.k]
        scores = np.concatenate([self.scores, np.take_along_axis(s, top, 1)], axis=1)
        ids = np.concatenate([self.ids, top + start], axis=1)
        best = np.argpartition(-scores, self.k - 1, axis=1)[:, :self.k]
        self.scores, self.ids = np.take_along_axis(scores, best, 1), np.take_along_axis(ids, best, 1)


def build_index(embeddings: Embeddings, n: int, factory: str, train: int, pq_train: int, batch: int,
                exact: ExactTopK):
    """Train on `train` fresh vectors (the PQ codebooks on `pq_train` of their residuals), then add n vectors in
    batches (ids = rows), feeding each batch to the exact search too."""
    t0 = time.perf_counter()
    sample = embeddings.fresh(train, stream=1)
    template = trained_index(sample, factory, use_gpu=False, train_size=train, pq_train_points=pq_train)
    del sample
    train_s = time.perf_counter() - t0
    index, rss0, add_s, gen_s = faiss.clone_index(template), rss_bytes(), 0.0, 0.0
    for start in range(0, n, batch):
        t = time.perf_counter()
        x = embeddings.rows(start, min(start + batch, n))
        gen_s += time.perf_counter() - t
        t = time.perf_counter()
        index.add_with_ids(x, np.arange(start, start + len(x), dtype=np.int64))
        add_s += time.perf_counter() - t
        exact.add(x, start)
    emit(result="index_build", factory=factory, vectors=n, dim=DIM, train_vectors=train, pq_train_vectors=pq_train,
         train_s=round(train_s, 2), add_s=round(add_s, 2), build_s=round(train_s + add_s, 2),
         add_vectors_per_second=round(n / add_s), generate_s=round(gen_s, 2), omp_threads=faiss.omp_get_max_threads(),
         resident_growth_bytes_per_vector=round((rss_bytes() - rss0) / n, 1))  # batches included: read at 10^7
    return index


def index_file_bytes(index, out: Path) -> int:
    path = out / "index.faiss"
    faiss.write_index(index, str(path))
    size = path.stat().st_size
    path.unlink()
    return size


def measure_search(index, queries: np.ndarray, exact: ExactTopK, nprobe: int, latency_queries: np.ndarray,
                   batch: int, refine_k_factor: int | None = None, k: int = 5) -> None:
    set_search(index, nprobe, refine_k_factor or 1)
    recall = {n: float(np.mean([len(set(f) & set(e)) / k for f, e in zip(index.search(queries, n)[1].tolist(),
                                                                      exact.ids.tolist())]))
              for n in (k, 50)}  # two searches: a Refine stage re-scores n × k_factor candidates
    single = []
    for q in latency_queries:
        t = time.perf_counter()
        index.search(q[None], k)
        single.append(time.perf_counter() - t)
    batched = []
    for i in range(0, len(latency_queries) - batch + 1, batch):
        t = time.perf_counter()
        index.search(latency_queries[i:i + batch], k)
        batched.append(time.perf_counter() - t)
    emit(result="search", vectors=int(index.ntotal), nprobe=nprobe, refine_k_factor=refine_k_factor, k=k,
         recall_at_5=round(recall[k], 4),
         recall_5_at_50=round(recall[50], 4),
         recall_queries=len(queries), single=percentiles(single), batch=batch, batched=percentiles(batched),
         batched_per_query_p50_ms=round(float(np.median(batched)) * 1e3 / batch, 3))


# --- memory store ----------------------------------------------------------------------------------------------

def evict_page_cache(bank: MemoryBank) -> None:
    """Ask the kernel to drop the shard files' cached pages (no root needed), so the next reads go to the disk."""
    for entry in bank.shards:
        fd = os.open(shard_uri(bank.uri, entry["name"], "mem"), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure_fetch(bank: MemoryBank, tier: str, device: str, fetches: int, per_fetch: int = 5) -> None:
    """p50/p99 of `fetch` of `per_fetch` random rows. Cached tiers fetch every group once first (not timed)."""
    cached = tier in ("ram", "gpu", "host")
    store = MemoryStore(bank, cache_size=fetches * per_fetch if tier in ("ram", "gpu") else 0, device=device,
                        host_cache_size=fetches * per_fetch if tier == "host" else 0)
    groups = np.random.default_rng(len(tier)).choice(len(bank), (fetches, per_fetch), replace=False).tolist()
    if cached:
        for g in groups:
            store.fetch(g)
    else:
        evict_page_cache(bank)
    seconds = []
    for g in groups:
        t = time.perf_counter()
        memories, _ = store.fetch(g)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t)
    stats = store.stats()
    store.close()
    emit(result="fetch", tier=tier, device=device, references_per_fetch=per_fetch, fetches=fetches,
         bank_references=len(bank), record_bytes=bank.layout.record_bytes, codec=bank.layout.codec,
         **percentiles(seconds), hits=stats["hits"], host_hits=stats["host_hits"], misses=stats["misses"],
         bytes_out=int(memories.nbytes))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="smoke", help="preset sizes; the flags below override")
    for key, value in SCALES["full"].items():
        p.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None)
    p.add_argument("--nprobe", type=int, nargs="*", default=[16, 64])
    p.add_argument("--refine", default=None, help="append a Refine stage on these codes to the factory: SQ8 (d B "
                   "per vector), SQfp16 (2d B), Flat (4d B)")
    p.add_argument("--refine-k-factor", type=int, nargs="*", default=[1, 10],
                   help="with --refine: candidates re-scored per result, one search row each (1: none re-scored)")
    p.add_argument("--batch", type=int, default=32, help="queries per batched search")
    p.add_argument("--add-batch", type=int, default=100_000, help="vectors generated and added at a time")
    p.add_argument("--fetches", type=int, default=200, help="timed MemoryStore fetches per tier")
    p.add_argument("--out", default=None, help="folder for the bank (default: a temporary one, removed after)")
    args = p.parse_args(argv)
    s = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in SCALES[args.scale].items()}
    factory = f"IVF{s['nlist']},PQ{s['pq']}" + (f",Refine({args.refine})" if args.refine else "")
    emit(result="config", scale=args.scale, **s, factory=factory, nprobe=args.nprobe,
         refine_k_factor=args.refine_k_factor if args.refine else None, omp_threads=faiss.omp_get_max_threads())
    embeddings = Embeddings(s["clusters"])
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        bank = build_bank(str(Path(tmp) / "bank"), s["references"], embeddings, s["pool"], s["quantizer"])
        tiers = [("ram", "cpu"), ("disk", "cpu")] + [("gpu", "cuda"), ("host", "cuda")] * torch.cuda.is_available()
        for tier, device in tiers:
            measure_fetch(bank, tier, device, args.fetches)
        queries = embeddings.fresh(s["queries"], stream=0)
        exact = ExactTopK(queries, 5)
        index = build_index(embeddings, s["vectors"], factory, s["train"], s["pq_train"], args.add_batch, exact)
        refine = refine_stage(index)
        emit(result="index_bytes", factory=factory, vectors=int(index.ntotal),
             file_bytes_per_vector=round(index_file_bytes(index, Path(tmp)) / index.ntotal, 2),
             refine_code_bytes_per_vector=faiss.downcast_index(refine.refine_index).code_size if refine else 0,
             peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))
        latency = embeddings.fresh(s["latency_queries"], stream=2)
        for nprobe in args.nprobe:
            for k_factor in args.refine_k_factor if refine else [None]:
                measure_search(index, queries, exact, nprobe, latency, args.batch, k_factor)


if __name__ == "__main__":
    main()
