"""`memory3 encode`: corpus → reference chunks → sparse memories + embeddings → bank shards → FAISS index.

The paper precomputes every reference's memory before inference ("warm start", §3.1) and stores them on drives
(§3.3). This job does that as a Ray Data stream:

    files ─flat_map(read + validate, cut into parts)─▶ parts ─map(tokenize + chunk)─▶ references per part
          ─map_batches(EncodeShards, ActorPoolStrategy)─▶ one shard written per part ─▶ driver: manifest, index

Each encoder actor loads the checkpoint and the embedder once, encodes a part's references with the memory
layers (`encode_references` under no_grad), optionally vector-quantizes them with codebooks trained on a sample
before the main pass (App. B), embeds their texts for retrieval, and writes the shard itself (atomic writes).
An actor runs parts three at a time: while one part's memories are copied to the host, packed, embedded and
written, the next part encodes and a third waits with its references ready, so the device never waits for Ray to
hand over a part (one part on the device and one being written at a time; `overlap_writes`). On GPUs the encoder
is compiled (`compile: auto`) before the first part, the copies to the host run on a side stream into pinned
memory and the embedder on a stream of its own (bank/shard_encoder.py).
A part is fixed by the corpus alone (bank/py), so the bank is byte-identical however the work was scheduled,
retried or interrupted; a re-run skips parts whose shard is complete and only finishes the rest.

Live updates for the serve admin API (in-process, without Ray) are bank/edits.py.
"""
from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import torch

from bank import storage
from bank.checkpoints import load_tokenizer, local_checkpoint, parse_dtype
from bank.chunking import Document, chunk_document, iter_file, list_corpus_files, reference_from_dict, reference_to_dict
from bank.embedder import DEFAULT_EMBEDDER, Embedder, embedder_dim
from bank.format import ERRORS, BankError, weights_sha256
from bank.manifest import (completed_parts, create_bank, list_shard_markers, manifest_entry, read_manifest,
                           read_shard_table, shard_uri, write_manifest, write_shard)
from bank.reader import MemoryBank
from bank.shard_encoder import ShardEncoder
from configs import typed
from configs.schema import EncodeConfig
from model.checkpoint import load_checkpoint, load_config
from model.quantizer import DEFAULT_KERNEL, KERNEL_PRECISIONS, MemoryQuantizer, resolve_factory
from model.tokenizer import Tokenizer
from pipelines import console
from pipelines.encode_parts import chunk_part_row, read_parts_row


def set_threads(n: int) -> None:
    """Fixed thread counts: results that do not depend on the machine, and no oversubscribed cores. FAISS is
    needed only by quantized banks and the index, so a bf16 bank encodes without it."""
    if n > 0:
        torch.set_num_threads(n)
        try:
            import faiss
        except ImportError:
            return
        faiss.omp_set_num_threads(n)


def choose_device(device: str, num_gpus: float) -> str:
    if device == "auto":
        return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"
    return device


def compile_encoder(setting, device: str) -> bool:
    """`compile`: auto = compiled on CUDA devices (1.65x the eager encoder on an H200), eager on CPU (where the
    compile costs more than the tiny models' encoding); or true/false."""
    if setting == "auto":
        return torch.device(device).type == "cuda"
    if isinstance(setting, bool):
        return setting
    raise ValueError(f"compile must be auto, true or false, got {setting!r}")


# --- Ray Data stages -------------------------------------------------------------------------------------------

class EncodeShards:
    """The encoder actor: loads the checkpoint and the embedder once (and compiles the encoder), then turns each
    part into a bank shard. Emits the throughput metrics named in the project contract (Prometheus adds a `ray_`
    prefix): `memory3_encode_references_per_second` is the actor's end-to-end rate, references written per second
    since its first part began (start-up excluded; the benchmark's per-actor rate), and
    `memory3_encode_encoder_references_per_second` its encoder's rate, references per second of device work."""

    def __init__(self, checkpoint: str, bank_uri: str, embedder: str | None, batch_size: int, device: str,
                 dtype: str, torch_threads: int, embed_batch_size: int, compile="auto",
                 embeddings_from: str | None = None, quantize_kernel: str = DEFAULT_KERNEL):
        from ray.util import metrics

        set_threads(torch_threads)
        model, tokenizer = load_checkpoint(local_checkpoint(checkpoint), device, parse_dtype(dtype, device))
        bank = MemoryBank.open(bank_uri)
        self.bank_uri, self.embeddings_from = bank_uri, embeddings_from
        self.encoder = ShardEncoder(model, tokenizer, bank.layout, bank.quantizer,
                                    Embedder(embedder, device=device, batch_size=embed_batch_size), batch_size,
                                    compile_encoder(compile, device), quantize_kernel)
        if self.encoder.compile:
            self.encoder.warm_up()
        self.references = metrics.Counter("memory3_encode_references_total", description="references encoded")
        self.tokens = metrics.Counter("memory3_encode_tokens_total", description="reference tokens encoded")
        self.bytes = metrics.Counter("memory3_encode_bytes_written_total", description="bank bytes written")
        self.errors = metrics.Counter("memory3_encode_errors_total", description="malformed input records")
        self.rate = metrics.Gauge("memory3_encode_references_per_second",
                                  description="references an encoder actor wrote per second since its first part")
        self.encoder_rate = metrics.Gauge("memory3_encode_encoder_references_per_second",
                                          description="references an encoder actor encoded per second of device work")
        self.busy_seconds, self.done, self.first_start = 0.0, 0, None
        self.actor_id = f"{os.uname().nodename}:{os.getpid()}"
        # Ray Data may call this actor from several threads at once (`overlap_writes`): the device lock keeps one
        # part encoding, the write lock one part being copied/packed/embedded/written, so the two overlap
        self.device_lock, self.write_lock, self.count_lock = threading.Lock(), threading.Lock(), threading.Lock()

    def reused_embeddings(self, name: str, refs: list) -> np.ndarray | None:
        """The embeddings of shard `name` in `embeddings_from` when it holds exactly these references' texts."""
        if not self.embeddings_from or not storage.exists(shard_uri(self.embeddings_from, name, "parquet")):
            return None
        table = read_shard_table(self.embeddings_from, name, ["id", "text", "embedding"])
        if table.column("id").to_pylist() != [r.id for r in refs] or \
                table.column("text").to_pylist() != [r.text for r in refs]:
            return None
        return np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)

    def __call__(self, batch: dict) -> dict:
        out = {k: [] for k in ("file_index", "part", "source", "name", "status", "marker", "errors", "actor",
                               "seconds", "write_seconds", "started", "finished")}
        for i in range(len(batch["name"])):
            payload = json.loads(batch["payload"][i])
            name, refs = str(batch["name"][i]), [reference_from_dict(r) for r in payload["references"]]
            status, marker, seconds, write_seconds = ("complete" if payload.get("skip") else "empty"), None, 0.0, 0.0
            started = finished = time.time()
            if refs:
                with self.device_lock:
                    started = time.time()
                    with self.count_lock:
                        self.first_start = self.first_start or started
                    pending = self.encoder.device_memories(refs)  # on a GPU: queued, not waited for
                with self.write_lock:
                    t1 = time.perf_counter()
                    records, embeddings = self.encoder.records(refs, pending, self.reused_embeddings(name, refs))
                    seconds = pending.device_seconds()
                    del pending  # the pinned host copy
                    marker = write_shard(self.bank_uri, name, refs, records, embeddings)
                    write_seconds = time.perf_counter() - t1
                    finished = time.time()
                with self.count_lock:
                    self.busy_seconds += seconds
                    self.done += len(refs)
                    self.rate.set(self.done / max(finished - self.first_start, 1e-9))
                    self.encoder_rate.set(self.done / max(self.busy_seconds, 1e-9))
                self.references.inc(len(refs))
                self.tokens.inc(marker["tokens"])
                self.bytes.inc(marker["mem_bytes"] + marker["meta_bytes"])
                status = "written"
            if payload["errors"]:
                self.errors.inc(len(payload["errors"]))
            for key, value in (("file_index", int(batch["file_index"][i])), ("part", int(batch["part"][i])),
                               ("source", str(batch["source"][i])), ("name", name), ("status", status),
                               ("marker", json.dumps(marker)), ("errors", json.dumps(payload["errors"])),
                               ("actor", self.actor_id), ("seconds", seconds), ("write_seconds", write_seconds),
                               ("started", started), ("finished", finished)):
                out[key].append(value)
        return out


def _train_quantizer(checkpoint: str, references: list[dict], factory: str, batch_size: int, device: str,
                     dtype: str, torch_threads: int, quantizer_threads: int) -> bytes:
    """Codebooks from the memories of a sample of references (paper App. B), as serialized FAISS bytes."""
    set_threads(torch_threads)
    model, tokenizer = load_checkpoint(local_checkpoint(checkpoint), device, parse_dtype(dtype, device))
    refs = [reference_from_dict(r) for r in references]
    memories, _ = ShardEncoder(model, tokenizer, None, None, None, batch_size).memories(refs)
    quantizer = MemoryQuantizer(factory, model.cfg.head_dim)
    vectors = memories.view(-1, model.cfg.head_dim)
    # k-means over the sample (16,384 centroids for a Residual2x14 level) is the slow part: it runs before any
    # encoding, alone, so it may take every core of its node
    set_threads(quantizer_threads or os.cpu_count() or 1)
    quantizer.train(vectors[vectors.abs().sum(-1) > 0])  # padding slots are zeros, not memories
    return quantizer.to_bytes()


def sample_references(files: list[str], tokenizer: Tokenizer, reference_len: int, n: int) -> list[dict]:
    """The first n references in corpus order: deterministic, so an interrupted run retrains the same codebooks."""
    out: list[dict] = []
    for uri in files:
        for item in iter_file(uri):
            if isinstance(item, Document):
                out += [reference_to_dict(r) for r in chunk_document(item, tokenizer, reference_len)]
                if len(out) >= n:
                    return out[:n]
    return out


# --- the job ---------------------------------------------------------------------------------------------------

def prepare_bank(cfg: EncodeConfig, files: list[str], run_options: dict) -> dict:
    """Open the bank and check it fits this checkpoint and config, or create it (training codebooks first)."""
    ckpt = cfg.checkpoint
    model_cfg = load_config(local_checkpoint(ckpt))
    tokenizer = load_tokenizer(ckpt)
    model_sha = weights_sha256(ckpt)
    embedder_name = DEFAULT_EMBEDDER if cfg.embedder in (None, "", DEFAULT_EMBEDDER) else cfg.embedder
    if cfg.embeddings_from:
        other = read_manifest(cfg.embeddings_from)["embedder"]["model"]
        if other != embedder_name:
            raise ValueError(f"embeddings_from={cfg.embeddings_from} was embedded with {other!r}, this bank with "
                             f"{embedder_name!r}: its embeddings cannot be reused")
    if storage.exists(storage.join(cfg.bank, "manifest.json")):
        bank = MemoryBank.open(cfg.bank, expect_model_sha=model_sha, expect_tokenizer_sha=tokenizer.sha256)
        m = bank.manifest
        have = (m["quantizer"] or {}).get("factory")
        factory = have if cfg.quantizer == "auto" else cfg.quantizer or None
        problems = []
        if have != factory:
            problems.append(f"quantizer {have!r} (config says {factory!r})")
        if m["embedder"]["model"] != embedder_name:
            problems.append(f"embedder {m['embedder']['model']!r} (config says {embedder_name!r})")
        if m["chunking"]["shard_documents"] != cfg.shard_documents:
            problems.append(f"shard_documents={m['chunking']['shard_documents']} (config says {cfg.shard_documents})")
        if problems:
            raise BankError(f"bank {cfg.bank} was written with " + ", ".join(problems) +
                            "; appending needs the same settings (or use a new bank)")
        return m
    quantizer, factory = None, resolve_factory(cfg.quantizer, model_cfg)
    if factory:
        sample = sample_references(files, tokenizer, model_cfg.reference_len, cfg.quantizer_sample)
        if not sample:
            raise ValueError(f"no valid documents in {cfg.corpus} to train the quantizer on")
        import ray

        task = ray.remote(_train_quantizer).options(**run_options)  # same resources as an encoder actor
        data = ray.get(task.remote(ckpt, sample, factory, cfg.batch_size, choose_device(cfg.device, cfg.num_gpus),
                                   cfg.dtype, cfg.torch_threads, cfg.quantizer_threads))
        quantizer = MemoryQuantizer.from_bytes(data, factory, model_cfg.head_dim)
    dim = embedder_dim(cfg.embedder)
    return create_bank(cfg.bank, config=model_cfg, model_sha256=model_sha, tokenizer_sha256=tokenizer.sha256,
                       quantizer=quantizer, embedder={"model": embedder_name, "dim": dim},
                       shard_documents=cfg.shard_documents,
                       quantizer_sample=cfg.quantizer_sample if factory else 0)


def finalize(bank_uri: str, results: list[dict]) -> tuple[dict, list[dict]]:
    """Append this run's new shards to the manifest in corpus order, tombstone documents already in the bank,
    merge errors into errors.jsonl, and commit the manifest. Returns (manifest, this run's errors)."""
    manifest = read_manifest(bank_uri)
    markers = list_shard_markers(bank_uri)
    listed = [s["name"] for s in manifest["shards"]]
    missing = [n for n in listed if n not in markers]
    if missing:
        raise BankError(f"shard {missing[0]} is in the manifest but its files are gone")
    owner = {d: name for name in listed for d in markers[name]["doc_ids"]}
    errors = [e for r in results for e in json.loads(r["errors"])]
    new = sorted((r for r in results if r["name"] and r["name"] not in listed and r["name"] in markers),
                 key=lambda r: (r["file_index"], r["part"]))
    offset = manifest["references"]
    for r in new:
        marker = markers[r["name"]]
        dups = [d for d in marker["doc_ids"] if d in owner]
        if dups:
            doc_of_row = read_shard_table(bank_uri, marker["name"], ["doc_id"]).column("doc_id").to_pylist()
            manifest["tombstones"] += [offset + i for i, d in enumerate(doc_of_row) if d in set(dups)]
            errors += [{"file": r["source"], "doc_id": d, "reason": f"duplicate document id {d!r} "
                        f"(already in shard {owner[d]}); not used"} for d in dups]
        owner.update({d: r["name"] for d in marker["doc_ids"] if d not in owner})
        manifest["shards"].append(manifest_entry(marker))
        offset += marker["rows"]
    errors_uri = storage.join(bank_uri, ERRORS)
    old = storage.read_text(errors_uri).splitlines() if storage.exists(errors_uri) else []
    lines = sorted(set(old) | {json.dumps(e, sort_keys=True, ensure_ascii=False) for e in errors},
                   key=lambda s: _error_key(json.loads(s)))
    storage.write_text(errors_uri, "".join(line + "\n" for line in lines))
    manifest["errors"] = len(lines)
    return write_manifest(bank_uri, manifest), errors


def _error_key(e: dict) -> tuple:
    return (e.get("file", ""), e.get("line", e.get("row", -1)), e.get("doc_id", ""), e.get("reason", ""))


def encoder_pool(cfg: EncodeConfig):
    """The encoder actors; with `overlap_writes` three calls run in each at once (one encoding, one writing, one
    waiting for the device with its references in hand; EncodeShards' locks order them)."""
    import ray

    calls = 3 if cfg.overlap_writes else 1
    return ray.data.ActorPoolStrategy(size=cfg.actors, max_concurrent_calls_per_actor=calls,
                                      enable_true_multi_threading=cfg.overlap_writes)


def actor_rates(results: list[dict]) -> dict[str, dict]:
    """Per encoder actor: references written, device seconds, and two rates: references per second from its first
    part begun to its last written (what its `memory3_encode_references_per_second` gauge ends at) and per second
    of device work (its encoder's rate)."""
    out: dict[str, dict] = {}
    for r in results:
        if r["status"] != "written":
            continue
        a = out.setdefault(r["actor"], {"references": 0, "busy_seconds": 0.0, "start": r["started"], "end": 0.0})
        a["references"] += json.loads(r["marker"])["rows"]
        a["busy_seconds"] += float(r["seconds"])
        a["start"], a["end"] = min(a["start"], r["started"]), max(a["end"], r["finished"])
    return {name: {"references": a["references"], "busy_seconds": round(a["busy_seconds"], 3),
                   "references_per_second": round(a["references"] / max(a["end"] - a["start"], 1e-9), 2),
                   "encoder_references_per_second": round(a["references"] / max(a["busy_seconds"], 1e-9), 2)}
            for name, a in sorted(out.items())}


def build_index(cfg: EncodeConfig) -> dict:
    """The retrieval index over the whole bank (FAISS: imported only here and for codebooks)."""
    from bank.index import update_index
    from pipelines.index import index_options

    return update_index(cfg.bank, **index_options(cfg.index))


def restart_options(cfg: EncodeConfig) -> dict:
    """A killed encoder actor is restarted and its part retried (the part's shard comes out byte-identical).
    Ray Data already does that forever (-1); other limits go through its (deprecated) extra remote args."""
    options = {"max_restarts": cfg.max_restarts, "max_task_retries": cfg.max_task_retries}
    return {k: v for k, v in options.items() if v != -1}


def encode_corpus(cfg: EncodeConfig) -> dict:
    """Run the whole job; returns the summary printed by `memory3 encode`."""
    import ray
    from pipelines.ray_runtime import ensure_ray

    t0 = time.perf_counter()
    cfg = typed("encode", cfg)
    if cfg.shard_documents <= 0 or cfg.actors <= 0 or cfg.batch_size <= 0:
        raise ValueError("shard_documents, actors and batch_size must be positive")
    if cfg.quantizer_kernel not in KERNEL_PRECISIONS:
        raise ValueError(f"quantizer_kernel={cfg.quantizer_kernel!r} must be one of {', '.join(KERNEL_PRECISIONS)}, "
                         "e.g. quantizer_kernel=tf32")
    files = list_corpus_files(cfg.corpus)
    ensure_ray(cfg.ray_address or None)
    env = storage.aws_env() if cfg.forward_aws_env else {}
    runtime_env = {"env_vars": env} if env else None
    device = choose_device(cfg.device, cfg.num_gpus)
    compile_encoder(cfg.compile, device)  # a bad value fails here, not in every actor
    actor_options = {"num_cpus": cfg.actor_num_cpus, "num_gpus": cfg.num_gpus,
                     **({"runtime_env": runtime_env} if runtime_env else {})}
    manifest = prepare_bank(cfg, files, actor_options)
    complete = completed_parts(cfg.bank)  # parts compaction rewrote count as done: deleted rows stay gone
    tokenizer_json = load_tokenizer(cfg.checkpoint).to_str()
    task_options = {"num_cpus": cfg.task_num_cpus, **({"runtime_env": runtime_env} if runtime_env else {})}

    ds = ray.data.from_items([{"file_index": i, "path": p} for i, p in enumerate(files)],
                             override_num_blocks=len(files))
    ds = ds.flat_map(read_parts_row, fn_kwargs={"shard_documents": cfg.shard_documents}, **task_options)
    # One part per block, so parts spread over the actors. (A repartition would be a task asking a whole CPU,
    # which never schedules when fractional encoder actors hold every node's last CPU.) This job's context only.
    ds.context.target_max_block_size = 1
    ds = ds.map(chunk_part_row, fn_kwargs={"tokenizer_json": tokenizer_json, "complete": complete,
                                       "reference_len": manifest["model"]["reference_len"]}, **task_options)
    ds = ds.map_batches(
        EncodeShards, batch_size=1,
        fn_constructor_kwargs={"checkpoint": cfg.checkpoint, "bank_uri": cfg.bank, "embedder": cfg.embedder,
                               "batch_size": cfg.batch_size, "device": device, "dtype": cfg.dtype,
                               "torch_threads": cfg.torch_threads, "embed_batch_size": cfg.embed_batch_size,
                               "compile": cfg.compile, "embeddings_from": cfg.embeddings_from,
                               "quantize_kernel": cfg.quantizer_kernel},
        compute=encoder_pool(cfg), **actor_options, **restart_options(cfg))
    results = []
    with console.stage("encode memory bank") as line:
        line.follow(None, total=None, unit="refs")
        for row in ds.iter_rows():
            results.append(row)
            line.update(json.loads(row["marker"])["rows"] if row["status"] == "written" else 0)
        manifest, errors = finalize(cfg.bank, results)
        index = build_index(cfg) if cfg.build_index and manifest["live_references"] else None
        line.done(f"{manifest['live_references']} references, {len(errors)} bad records")
    written = [json.loads(r["marker"]) for r in results if r["status"] == "written"]
    seconds = time.perf_counter() - t0
    new_refs = sum(m["rows"] for m in written)
    actors = actor_rates(results)
    busy = {a: s["busy_seconds"] for a, s in actors.items()}
    tokens = sum(m["tokens"] for m in written)
    stream = [r for r in results if r["status"] == "written"]
    stream_s = max((r["finished"] for r in stream), default=0.0) - min((r["started"] for r in stream), default=0.0)
    return {
        "bank": cfg.bank, "corpus": cfg.corpus, "files": len(files),
        "references": manifest["references"], "live_references": manifest["live_references"],
        "documents": manifest["documents"], "shards": len(manifest["shards"]),
        "encoded_references": new_refs, "encoded_tokens": tokens, "written_shards": len(written),
        "skipped_shards": sum(r["status"] == "complete" for r in results),
        "bytes_written": sum(m["mem_bytes"] + m["meta_bytes"] for m in written),
        "errors": len(errors), "errors_file": storage.join(cfg.bank, ERRORS),
        "record_bytes": manifest["record"]["record_bytes"], "codec": manifest["record"]["codec"],
        "seconds": round(seconds, 3), "references_per_second": round(new_refs / seconds, 2),
        "tokens_per_second": round(tokens / seconds, 1),
        # once start-up is paid (what scales with GPUs): the actors' stream of parts from the first one begun to
        # the last one written, each actor's rate (its gauge), and the encoders' (refs / the busiest device time)
        "stream_references_per_second": round(new_refs / max(stream_s, 1e-9), 2),
        "actors": actors,
        "encoder_busy_seconds": {a: round(b, 3) for a, b in sorted(busy.items())},
        "encoder_references_per_second": round(new_refs / max(max(busy.values(), default=0.0), 1e-9), 2),
        "write_seconds": round(sum(float(r["write_seconds"]) for r in results), 3),  # overlapped with encoding
        "index": index,
    }


def main(cfg: EncodeConfig) -> int:
    console.say(json.dumps(encode_corpus(cfg)))
    return 0
