"""`memory3 prepare`: corpus -> BPE tokenizer + training sequences as Parquet (Ray Data).

Reads a JSONL or Parquet corpus (local or s3://), trains the byte-level BPE tokenizer on it unless one is given,
and writes one row per training sequence:
    tokens      list<int32>   sink + <s> + document tokens (`Tokenizer.context_ids`, paper §3.2); packed mode
                              separates documents with <s>, a document longer than a sequence continues in the next
    source_ids  list<string>  source documents of the text packed into the sequence (the leakage filter, §3.6)
    text        string        the decoded sequence (what the continual stage's retrieval queries are cut from)
Malformed records (bad JSON, no text, no id) are counted per reason and reported, never fatal.

Layout of `out`: tokenizer.json, prepare.json (manifest, written last: a reader sees a complete run or the previous
one) and sequences-<run id>/ (the Parquet files the manifest names).
"""
from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.fs as pafs
import ray

from bank import chunking, storage
from configs import model_config, typed
from configs.schema import PrepareConfig
from model.tokenizer import Tokenizer
from pipelines import console
from pipelines.ray_runtime import ensure_ray

MANIFEST, TOKENIZER = "prepare.json", "tokenizer.json"
# loss_start: the first token index the loss covers (0: every token); query: the text that retrieves this sequence's
# references in the continual stage ("": each window's own text). Both come from a record's `prompt`.
SEQUENCE_SCHEMA = pa.schema([("tokens", pa.list_(pa.int32())), ("source_ids", pa.list_(pa.string())),
                             ("text", pa.string()), ("loss_start", pa.int32()), ("query", pa.string())])


# ---------------------------------------------------------------- I/O helpers shared with the train job
def arrow_filesystem(uri: str) -> tuple[pafs.FileSystem | None, str]:
    """(pyarrow filesystem, path) for Ray Data and Ray Train storage. S3 goes through s3fs built with the
    driver's AWS_* settings (endpoint, keys) spelled out, so Ray workers started before that environment was set
    still reach it once the filesystem is pickled to them. (pyarrow's own S3 client failed multipart uploads
    against moto.)"""
    uri = str(uri)
    if not storage.is_remote(uri):
        return None, os.path.abspath(uri)
    if uri.startswith("s3://"):
        import s3fs

        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        fs = s3fs.S3FileSystem(key=os.environ.get("AWS_ACCESS_KEY_ID"), secret=os.environ.get("AWS_SECRET_ACCESS_KEY"),
                               token=os.environ.get("AWS_SESSION_TOKEN"),
                               client_kwargs={"endpoint_url": endpoint} if endpoint else None)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), uri[len("s3://"):]
    return pafs.FileSystem.from_uri(uri)


def read_corpus(uri: str) -> list[tuple["ray.data.Dataset", str]]:
    """Raw records as (dataset, format) per file kind. JSONL is read one row per line (column `text`) and parsed
    later, so a bad line is counted rather than fatal. Files are listed like the bank's (bank/chunking.py)."""
    files = chunking.list_corpus_files(uri)
    jsonl = [f for f in files if f.endswith(chunking.JSONL_SUFFIXES)]
    parquet = [f for f in files if f.endswith(chunking.PARQUET_SUFFIXES)]
    out = []
    for paths, fmt in ((jsonl, "jsonl"), (parquet, "parquet")):
        if paths:
            fs, _ = arrow_filesystem(paths[0])
            paths = [arrow_filesystem(p)[1] for p in paths]
            reader = ray.data.read_text if fmt == "jsonl" else ray.data.read_parquet
            kwargs = {"drop_empty_lines": True} if fmt == "jsonl" else {}
            out.append((reader(paths, filesystem=fs, **kwargs), fmt))
    return out


# ---------------------------------------------------------------- records -> documents
def parse_documents(table: pa.Table, fmt: str, source_field: str) -> tuple[list[tuple[str, str, str]], Counter]:
    """(source_id, text, prompt) per valid record (the bank's record rules, chunking.validate_record), plus malformed
    counts by reason. The source is the record's `source_field` when set, else its own id.

    A record may carry `prompt`, a prefix of its text (a question, with reference texts before it or not): then the
    loss covers only what follows it, the answer, and the continual stage retrieves with the prompt alone, as
    inference does with a user's question. Otherwise prompt is ""."""
    malformed: Counter = Counter()
    docs = []
    rows = table.column("text").to_pylist() if fmt == "jsonl" else table.to_pylist()
    for row in rows:
        if fmt == "jsonl":
            try:
                row = json.loads(row)
            except (json.JSONDecodeError, TypeError):
                malformed["invalid JSON"] += 1
                continue
        doc = chunking.validate_record(row)
        if isinstance(doc, str):
            malformed[doc] += 1
            continue
        prompt = doc.metadata.get("prompt") or ""
        if not isinstance(prompt, str) or not doc.text.startswith(prompt) or len(prompt) == len(doc.text):
            malformed["'prompt' is not a proper prefix of 'text'"] += 1
            continue
        source = doc.metadata.get(source_field)
        docs.append((str(source) if source is not None else doc.id, doc.text, prompt))
    return docs, malformed


def pack_sequences(docs: Iterable[tuple[list[int], str]], sink: list[int], bos: int, seq_len: int, pack: bool
                   ) -> list[tuple[list[int], list[str]]]:
    """Cut tokenized documents into sequences of at most seq_len tokens, each `sink <s> ...`.

    pack=True concatenates documents (`<s>` before each) and carries a long document over into the next sequence;
    pack=False gives every document its own sequences (padded at train time)."""
    out: list[tuple[list[int], list[str]]] = []
    cur, src = list(sink), []

    def flush():
        nonlocal cur, src
        if len(cur) > len(sink) + 1:
            out.append((cur, src))
        cur, src = list(sink), []

    for ids, source in docs:
        rest = ids
        while rest:
            if seq_len - len(cur) < 2:  # no room for a separator and one token
                flush()
            cur.append(bos)
            take = seq_len - len(cur)
            cur.extend(rest[:take])
            rest = rest[take:]
            if source not in src:
                src.append(source)
            if rest or not pack:
                flush()
    flush()
    return out


def decode_text(tk: Tokenizer, ids: list[int]) -> str:
    """Text of context tokens, one line per `<s>`-separated document (the tokenizer drops specials)."""
    parts, cur = [], []
    for t in ids:
        if t == tk.bos_id:
            parts.append(cur)
            cur = []
        else:
            cur.append(t)
    parts.append(cur)
    return "\n".join(text for text in (tk.decode(p) for p in parts) if text)


_TOKENIZERS: dict[str, Tokenizer] = {}


def _tokenizer(tokenizer_json: str) -> Tokenizer:
    key = str(hash(tokenizer_json))
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = Tokenizer.from_str(tokenizer_json)
    return _TOKENIZERS[key]


@ray.remote(num_cpus=0)
class PrepareStats:
    """Counts from every tokenize task (documents, malformed by reason, sequences, tokens)."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.malformed: Counter = Counter()

    def add(self, counts: dict, malformed: dict) -> None:
        self.counts.update(counts)
        self.malformed.update(malformed)

    def get(self) -> dict:
        return {"counts": dict(self.counts), "malformed": dict(self.malformed)}


def build_sequences(table: pa.Table, *, fmt: str, source_field: str, tokenizer_json: str, seq_len: int,
                    pack: bool, stats) -> pa.Table:
    """Ray Data batch function: raw records -> training sequences (SEQUENCE_SCHEMA)."""
    tk = _tokenizer(tokenizer_json)
    docs, malformed = parse_documents(table, fmt, source_field)
    # prompt and answer are tokenized apart, so the loss starts on a token boundary
    prompt_ids = tk.encode_batch([prompt for _, _, prompt in docs])
    ids = [p + a for p, a in zip(prompt_ids, tk.encode_batch([text[len(prompt):] for _, text, prompt in docs]))]
    # every document ends with </s>, so a trained model knows where an answer stops
    kept = [(t + [tk.eos_id], source, len(p), prompt)
            for t, p, (source, _, prompt) in zip(ids, prompt_ids, docs) if t]
    # (tokens, sources, loss_start, query). Plain documents are packed (pack=true); a prompt record always gets
    # sequences of its own, and only the first holds its prompt (the rest are all answer)
    rows = []
    if pack:
        plain = [(t, source) for t, source, n_prompt, _ in kept if not n_prompt]
        rows += [(seq, src, 0, "") for seq, src in pack_sequences(plain, tk.sink_ids, tk.bos_id, seq_len, True)]
    for t, source, n_prompt, prompt in kept if not pack else [k for k in kept if k[2]]:
        for j, (seq, src) in enumerate(pack_sequences([(t, source)], tk.sink_ids, tk.bos_id, seq_len, False)):
            first = j == 0 and n_prompt > 0
            rows.append((seq, src, len(tk.sink_ids) + 1 + n_prompt if first else 0, prompt if first else ""))
    malformed["text without tokens"] += sum(1 for t in ids if not t)
    malformed = {k: v for k, v in malformed.items() if v}
    ray.get(stats.add.remote({"documents": len(docs), "sequences": len(rows),
                              "tokens": sum(len(r[0]) for r in rows)}, malformed))
    return pa.table({"tokens": [r[0] for r in rows], "source_ids": [r[1] for r in rows],
                     "text": [decode_text(tk, r[0]) for r in rows], "loss_start": [r[2] for r in rows],
                     "query": [r[3] for r in rows]}, schema=SEQUENCE_SCHEMA)


def valid_texts(table: pa.Table, *, fmt: str) -> pa.Table:
    docs, _ = parse_documents(table, fmt, "")
    return pa.table({"doc": [text for _, text, _ in docs]}, schema=pa.schema([("doc", pa.string())]))


# ---------------------------------------------------------------- the job
def load_manifest(data_uri: str) -> dict:
    """The prepared folder's manifest; errors name what is missing (train calls this before any step)."""
    path = storage.join(data_uri, MANIFEST)
    if not storage.exists(path):
        raise FileNotFoundError(f"{data_uri} is not a prepared data folder (no {MANIFEST}; run `memory3 prepare`)")
    manifest = json.loads(storage.read_text(path))
    if not storage.exists(storage.join(data_uri, TOKENIZER)):
        raise FileNotFoundError(f"{data_uri} has no {TOKENIZER}")
    return manifest


def main(cfg: PrepareConfig) -> int:
    """`memory3 prepare corpus=... out=...`; prints the manifest as one JSON line."""
    with console.stage("prepare training data") as line:
        manifest = prepare(cfg)
        line.done(f"{manifest['sequences']} sequences, {manifest['malformed_total']} malformed records")
    console.say(json.dumps(manifest))
    return 0


def prepare(cfg: PrepareConfig) -> dict:
    """Run the job; returns the manifest written to out/prepare.json."""
    cfg = typed("prepare", cfg)
    if not cfg.corpus or not cfg.out:
        raise ValueError("prepare needs corpus=<jsonl|parquet file or folder> and out=<folder>")
    t0 = time.time()
    mcfg = model_config(cfg)
    corpus_uri, out = cfg.corpus, cfg.out
    ensure_ray(cfg.ray_address)
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # same corpus -> same files
    raw = read_corpus(corpus_uri)

    if cfg.tokenizer:
        tokenizer = Tokenizer.from_str(storage.read_text(cfg.tokenizer))
    else:
        vocab = cfg.vocab_size or mcfg.vocab_size
        texts = [ds.map_batches(valid_texts, batch_format="pyarrow", fn_kwargs={"fmt": fmt}, num_cpus=cfg.num_cpus)
                 for ds, fmt in raw]
        texts = texts[0].union(*texts[1:]) if len(texts) > 1 else texts[0]
        sample = (row["doc"] for row in texts.limit(cfg.tokenizer_docs).iter_rows())
        tokenizer = Tokenizer.train(sample, vocab)
    if tokenizer.vocab_size > mcfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{mcfg.vocab_size}: set vocab_size<={mcfg.vocab_size} or a larger model.vocab_size")

    stats = PrepareStats.remote()
    parts = [ds.map_batches(
        build_sequences, batch_size=cfg.batch_docs, batch_format="pyarrow", num_cpus=cfg.num_cpus,
        fn_kwargs={"fmt": fmt, "source_field": cfg.source_field, "tokenizer_json": tokenizer.to_str(),
                   "seq_len": mcfg.max_seq_len, "pack": cfg.pack, "stats": stats}) for ds, fmt in raw]
    sequences = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    run_dir = f"sequences-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    fs, path = arrow_filesystem(storage.join(out, run_dir))
    storage.makedirs(out)
    sequences.write_parquet(path, filesystem=fs)
    result = ray.get(stats.get.remote())
    counts, malformed = result["counts"], result["malformed"]
    if not counts.get("sequences"):
        storage.remove(storage.join(out, run_dir))
        raise ValueError(f"no valid documents in {corpus_uri}: malformed records {malformed or 'none'}")

    previous = json.loads(storage.read_text(storage.join(out, MANIFEST))) \
        if storage.exists(storage.join(out, MANIFEST)) else None
    storage.write_text(storage.join(out, TOKENIZER), tokenizer.to_str())
    manifest = {
        "corpus": corpus_uri, "data_dir": run_dir, "pack": cfg.pack,
        "seq_len": mcfg.max_seq_len, "sink_len": len(tokenizer.sink_ids),
        "tokenizer_sha256": tokenizer.sha256, "tokenizer_vocab_size": tokenizer.vocab_size,
        "documents": counts.get("documents", 0), "sequences": counts["sequences"], "tokens": counts["tokens"],
        "malformed": malformed, "malformed_total": sum(malformed.values()),
        "seconds": round(time.time() - t0, 2),
    }
    storage.write_text(storage.join(out, MANIFEST), json.dumps(manifest, indent=2))
    if previous and previous.get("data_dir") not in (None, run_dir):
        storage.remove(storage.join(out, previous["data_dir"]))
    return manifest
