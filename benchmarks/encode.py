"""Memory-bank speed: encoding throughput (references/s, tokens/s, MFU), MemoryStore fetch latency for one
window's references from the RAM cache and from disk, and FAISS index build/search times. One JSON line each.

    python -m benchmarks.encode                                   # CPU, tiny preset
    python -m benchmarks.encode --preset 2.4b --device cuda       # GPU machine (random bf16 weights)
    python -m benchmarks.encode --preset 2.4b --device cuda --quantizer OPQ20_80,Residual2x14,PQ8x10   # paper VQ

The paper puts Memory3's decoding overhead in loading memories (Remark 8: 35% slower with retrieval while reading
memories is 0.23% of the compute), so the fetch numbers are the ones to watch.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch

from bank.chunking import Reference
from bank.format import RecordLayout
from bank.manifest import create_bank, write_shard
from bank.reader import MemoryBank
from bank.store import MemoryStore
from benchmarks.model import PEAK_FLOPS, commit, device_name, profile_top_kernels, sync
from model.config import ModelConfig
from model.encoder import encode_references
from model.quantizer import MemoryQuantizer
from model.transformer import Transformer

SYLLABLES = ["ka", "lo", "mer", "vin", "tas", "ro", "bel", "dun", "sa", "qui", "zor", "fen"]


def encoder_flops(cfg: ModelConfig, n_refs: int) -> float:
    """2 * params of the memory layers * tokens, plus causal attention and the selection scores (paper §3.3: every
    query against every key, per query head) in each memory layer."""
    d, kv = cfg.dim, cfg.n_kv_head * cfg.head_dim
    layer_params = 2 * d * d + 2 * d * kv + 3 * d * cfg.mlp_hidden
    T = cfg.reference_seq_len
    per_ref = 2 * cfg.n_mem_layer * layer_params * T
    per_ref += cfg.n_mem_layer * (4 * cfg.n_head * cfg.head_dim * T * T / 2 + 2 * cfg.n_head * cfg.head_dim * T * T)
    return per_ref * n_refs


def percentiles(samples: list[float]) -> dict:
    a = np.asarray(samples) * 1e3
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3),
            "mean_ms": round(float(a.mean()), 3)}


def bench_encode(cfg: ModelConfig, device: str, dtype: torch.dtype, n_refs: int, batch: int, common: dict,
                 compile: bool = False, profile: bool = False) -> float:
    """The bare encoder (`encode_references` on device-resident tokens, nothing copied back): prints its JSON
    line and returns its references/s."""
    with torch.device(device):
        model = Transformer(cfg).to(dtype).eval()
    tokens = torch.randint(5, cfg.vocab_size, (n_refs, cfg.reference_len), device=device)
    lengths = torch.full((n_refs,), cfg.reference_len, device=device)
    sink = [2, 4]
    encode = torch.compile(encode_references, dynamic=False) if compile else encode_references

    def run():
        for i in range(0, n_refs, batch):
            encode(model, tokens[i:i + batch], lengths[i:i + batch], sink)

    with torch.inference_mode():
        for _ in range(2):  # warm-up (and compilation)
            encode(model, tokens[:batch], lengths[:batch], sink)
        sync(device)
        if profile:
            top = profile_top_kernels(lambda: encode(model, tokens[:batch], lengths[:batch], sink), device)
            print(json.dumps({**common, "bench": "encode_profile", "compile": compile, "batch": batch,
                              "top": top}), flush=True)
        t = time.perf_counter()
        run()
        sync(device)
        sec = time.perf_counter() - t
    flops = encoder_flops(cfg, n_refs)
    peak = PEAK_FLOPS[device]
    print(json.dumps({**common, "bench": "encode_references", "references": n_refs, "batch": batch, "compile": compile,
                      "references_per_s": round(n_refs / sec, 1),
                      "tokens_per_s": round(n_refs * cfg.reference_len / sec, 1),
                      "tflops": round(flops / sec / 1e12, 3), "mfu": round(flops / sec / peak, 3) if peak else None}),
          flush=True)
    return n_refs / sec


def synthetic_references(cfg: ModelConfig, n: int, seed: int = 0) -> list[Reference]:
    rng = np.random.default_rng(seed)
    refs = []
    for i in range(n):
        name = "".join(rng.choice(SYLLABLES, 3)).capitalize()
        text = f"{name} is a city with {rng.integers(1000, 10**6)} people on the {rng.choice(SYLLABLES)} river."
        tokens = rng.integers(5, cfg.vocab_size, cfg.reference_len).tolist()
        refs.append(Reference(f"doc{i}#0", f"doc{i}", text, tokens))
    return refs


def bench_shard_encode(cfg: ModelConfig, device: str, dtype: torch.dtype, n_refs: int, batch: int,
                       quantizer: MemoryQuantizer | None, common: dict) -> None:
    """The encoder actor's whole per-shard path: memories + VQ/bf16 packing + retrieval embeddings."""
    from bank.embedder import Embedder
    from bank.shard_encoder import ShardEncoder
    from model.tokenizer import Tokenizer

    with torch.device(device):
        model = Transformer(cfg).to(dtype).eval()
    refs = synthetic_references(cfg, n_refs)
    tokenizer = Tokenizer.train([r.text for r in refs[:50]], 300)
    encoder = ShardEncoder(model, tokenizer, RecordLayout.create(cfg, quantizer), quantizer,
                           Embedder(device=device), batch)
    encoder.encode(refs[:batch])  # warm-up
    t = time.perf_counter()
    records, _ = encoder.encode(refs)
    sync(device)
    sec = time.perf_counter() - t
    print(json.dumps({**common, "bench": "shard_encode", "references": n_refs, "codec": "faiss" if quantizer else
                      "bfloat16", "record_bytes": records.shape[1], "references_per_s": round(n_refs / sec, 1),
                      "tokens_per_s": round(n_refs * cfg.reference_len / sec, 1)}), flush=True)


def random_bank(path: str, cfg: ModelConfig, n_refs: int, quantizer: MemoryQuantizer | None,
                shard_rows: int = 256) -> MemoryBank:
    """A bank of random memories (bank I/O does not care what the numbers are)."""
    create_bank(path, config=cfg, model_sha256="0" * 64, tokenizer_sha256="0" * 64, quantizer=quantizer,
                embedder={"model": "none", "dim": 8}, shard_documents=shard_rows)
    layout = RecordLayout.create(cfg, quantizer)
    from bank.manifest import manifest_entry, read_manifest, write_manifest

    manifest = read_manifest(path)
    gen = torch.Generator().manual_seed(0)
    for start in range(0, n_refs, shard_rows):
        n = min(shard_rows, n_refs - start)
        memories = torch.randn(n, *cfg.memory_shape, generator=gen)
        n_valid = torch.full((n,), cfg.mem_tokens)
        refs = [Reference(f"r{start + i}#0", f"r{start + i}", "", []) for i in range(n)]
        marker = write_shard(path, f"bench-{start // shard_rows:05d}", refs, layout.pack(memories, n_valid, quantizer),
                             np.zeros((n, 8), np.float32))
        manifest["shards"].append(manifest_entry(marker))
    write_manifest(path, manifest)
    return MemoryBank.open(path)


def drop_page_cache(bank: MemoryBank) -> None:
    """Evict the bank's shard files from the OS page cache (per file; nothing else on the machine is touched)."""
    for shard in bank.shards:
        fd = os.open(os.path.join(bank.uri, "shards", shard["name"] + ".mem"), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bench_fetch(cfg: ModelConfig, device: str, dtype: torch.dtype, quantizer: MemoryQuantizer | None,
                n_refs: int, per_fetch: int, trials: int, common: dict) -> None:
    with tempfile.TemporaryDirectory(dir=os.environ.get("MEMORY3_BENCH_DIR")) as tmp:
        bank = random_bank(os.path.join(tmp, "bank"), cfg, n_refs, quantizer)
        rng = np.random.default_rng(0)
        codec = bank.layout.codec
        base = {**common, "bench": "memory_fetch", "codec": codec, "record_bytes": bank.layout.record_bytes,
                "references_per_fetch": per_fetch, "bank_references": n_refs, "fetch_device": device}

        warm = MemoryStore(bank, cache_size=n_refs, device=device, dtype=dtype)
        warm.fetch(list(range(n_refs)))
        samples = []
        for _ in range(trials):
            rows = rng.choice(n_refs, per_fetch, replace=False).tolist()
            t = time.perf_counter()
            warm.fetch(rows)
            sync(device)
            samples.append(time.perf_counter() - t)
        print(json.dumps({**base, "source": "ram_cache", **percentiles(samples)}), flush=True)

        for source in ("disk_page_cache", "disk_cold"):
            samples, read_s, decode_s = [], 0.0, 0.0
            for _ in range(trials):
                store = MemoryStore(bank, cache_size=0, device=device, dtype=dtype)  # every row is a miss
                rows = rng.choice(n_refs, per_fetch, replace=False).tolist()
                if source == "disk_cold":
                    drop_page_cache(bank)
                t = time.perf_counter()
                store.fetch(rows)
                sync(device)
                samples.append(time.perf_counter() - t)
                read_s += store.stats()["read_seconds"]
                decode_s += store.stats()["decode_seconds"]
            mb = per_fetch * bank.layout.record_bytes / 1e6
            print(json.dumps({**base, "source": source, **percentiles(samples),
                              "read_ms_mean": round(read_s / trials * 1e3, 3),
                              "decode_ms_mean": round(decode_s / trials * 1e3, 3),
                              "mb_per_s": round(mb / float(np.median(samples)), 1)}), flush=True)


def bench_faiss(n: int, dim: int, queries: int, factories: list[str], common: dict) -> None:
    import faiss

    from bank.index import build_index

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(max(n // 100, 1), dim)).astype(np.float32)
    x = (centers[rng.integers(0, len(centers), n)] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)
    q = x[rng.choice(n, queries, replace=False)].copy()
    faiss.normalize_L2(q)
    exact = None
    for factory in factories:
        t = time.perf_counter()
        index = build_index(x, np.arange(n), factory)
        build = time.perf_counter() - t
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.nprobe = 16
        t = time.perf_counter()
        _, found = index.search(q, 5)
        search = time.perf_counter() - t
        exact = found if exact is None else exact  # the first factory is Flat: the exact answer
        recall = float((found[:, :1] == exact[:, :1]).mean())
        print(json.dumps({**common, "bench": "faiss", "factory": factory, "vectors": n, "dim": dim,
                          "build_s": round(build, 3), "queries": queries, "k": 5, "recall_at_1_vs_flat": recall,
                          "search_ms_per_query": round(search / queries * 1e3, 4),
                          "faiss_threads": faiss.omp_get_max_threads(), "gpu": faiss.get_num_gpus() > 0}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--references", type=int, default=None, help="references encoded (default 256 cpu, 2048 cuda)")
    ap.add_argument("--batch", type=int, default=None, help="references per encoder forward (default 32 cpu, 64 cuda)")
    ap.add_argument("--quantizer", default="auto", help="FAISS factory for the VQ rows, 'none', or auto "
                    "(OPQ8_32,PQ8x8 for tiny; none otherwise)")
    ap.add_argument("--bank-references", type=int, default=2000, help="rows of the bank the fetch benchmark reads")
    ap.add_argument("--fetch-refs", type=int, default=5, help="references per fetch (paper: 5 per window)")
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--index-vectors", type=int, default=None, help="default 20000 cpu, 1000000 cuda")
    ap.add_argument("--skip", default="", help="comma list of benches to skip: encode,shard,fetch,faiss")
    ap.add_argument("--compile", default="0", help="comma list of 0/1: encode eager and/or torch.compile'd")
    ap.add_argument("--batches", default=None, help="comma list of encoder batch sizes to sweep (default --batch)")
    ap.add_argument("--profile", action="store_true", help="also print the top kernels of one encoder batch")
    args = ap.parse_args()
    dev, cuda = args.device, args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = ModelConfig.from_name(args.preset)
    skip = set(filter(None, args.skip.split(",")))
    common = {"preset": args.preset, "device": device_name(dev), "dtype": str(dtype).split(".")[-1],
              "commit": commit(), "cpu_threads": torch.get_num_threads(), "loadavg_1m": round(os.getloadavg()[0], 2)}
    factory = {"auto": "OPQ8_32,PQ8x8" if args.preset == "tiny" else None, "none": None}.get(args.quantizer,
                                                                                              args.quantizer)
    quantizer = None
    if factory:
        quantizer = MemoryQuantizer(factory, cfg.head_dim)
        t = time.perf_counter()
        quantizer.train(torch.randn(60_000, cfg.head_dim))
        print(json.dumps({**common, "bench": "quantizer_train", "factory": factory, "vectors": 60_000,
                          "code_bytes": quantizer.code_size, "seconds": round(time.perf_counter() - t, 2)}),
              flush=True)
    n_refs = args.references or (2048 if cuda else 256)
    batch = args.batch or (64 if cuda else 32)
    if "encode" not in skip:
        for compiled in [bool(int(c)) for c in args.compile.split(",")]:
            for b in [int(b) for b in (args.batches or str(batch)).split(",")]:
                bench_encode(cfg, dev, dtype, n_refs // b * b, b, common, compiled, args.profile)
    if "shard" not in skip:
        bench_shard_encode(cfg, dev, dtype, min(n_refs, 512), batch, quantizer, common)
    if "fetch" not in skip:
        for q in ([None, quantizer] if quantizer else [None]):
            bench_fetch(cfg, dev, dtype, q, args.bank_references, args.fetch_refs, args.trials, common)
    if "faiss" not in skip:
        bench_faiss(args.index_vectors or (1_000_000 if cuda else 20_000), 384, 1000,
                    ["Flat", "IVF1024,Flat" if not cuda else "IVF4096,PQ32"], common)


if __name__ == "__main__":
    main()
