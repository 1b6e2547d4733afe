"""Knowledge-base documents → reference chunks (paper §3.1, §4.4: references are text chunks of ≤128 tokens).

Reads JSONL (`.jsonl`, `.jsonl.gz`) and Parquet documents `{"id", "text", ...metadata}` from a local path or
s3:// (a file or a folder of files), one file at a time as a stream, so a job's memory does not grow with the
corpus. Malformed records never stop a job: each becomes an error `{"file", "line"|"row", "reason"}` that the job
counts and writes to `<bank>/errors.jsonl`.

Determinism is the point of this module. Files are taken in sorted order; each file is cut into *parts* of
`shard_documents` consecutive valid documents; a part becomes one bank shard named after its file, its index and a
digest of its content. So the same corpus always yields the same shards with the same names, whatever order Ray
workers finish in, and a re-run can tell which shards are already written.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator

from bank import storage
from model.tokenizer import Tokenizer

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)
SENTENCE_ENDS = (".", "!", "?", ";", ":", "\n")


@dataclass
class Document:
    id: str
    text: str
    metadata: dict = field(default_factory=dict)


@dataclass
class Reference:
    """One knowledge chunk: `id` is "<doc_id>#<chunk index>", stable across runs."""

    id: str
    doc_id: str
    text: str
    tokens: list[int]
    metadata: dict = field(default_factory=dict)


@dataclass
class Part:
    """`shard_documents` consecutive valid documents of one file (plus the errors met while reading them)."""

    source: str
    file_index: int
    index: int
    documents: list[Document]
    errors: list[dict]

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for d in self.documents:
            h.update(json.dumps([d.id, d.text, d.metadata], sort_keys=True, ensure_ascii=False).encode())
            h.update(b"\n")
        return h.hexdigest()

    @property
    def shard_name(self) -> str:
        return shard_name(self.source, self.index, self.digest)


def shard_name(source: str, part_index: int, digest: str) -> str:
    """`<file stem>-<part>-<content digest>`: readable, and content-addressed so that a changed file makes new
    shards instead of silently matching old ones."""
    stem = source.rstrip("/").rsplit("/", 1)[-1]
    for suffix in JSONL_SUFFIXES + PARQUET_SUFFIXES:
        stem = stem.removesuffix(suffix)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:40] or "part"
    return f"{stem}-{part_index:05d}-{digest[:12]}"


# --- files -----------------------------------------------------------------------------------------------------

def is_corpus_file(name: str) -> bool:
    return name.endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES) and not name.rsplit("/", 1)[-1].startswith((".", "_"))


def list_corpus_files(uri: str) -> list[str]:
    """The corpus files under `uri` (a file, or a folder searched recursively), sorted; FileNotFoundError if none."""
    fs, path = storage.filesystem(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"corpus {uri} does not exist")
    if not fs.isdir(path):
        if not is_corpus_file(path):
            raise ValueError(f"corpus file {uri} is neither JSONL ({', '.join(JSONL_SUFFIXES)}) nor Parquet")
        return [str(uri)]
    prefix = str(uri).split("://", 1)[0] + "://" if storage.is_remote(uri) else ""
    found = sorted(p for p in fs.find(path) if is_corpus_file(p))
    if not found:
        raise FileNotFoundError(f"no JSONL or Parquet files under {uri}")
    return [prefix + p if prefix and not p.startswith(prefix) else p for p in found]


# --- records ---------------------------------------------------------------------------------------------------

def validate_record(obj) -> Document | str:
    """A Document, or the reason the record is unusable."""
    if not isinstance(obj, dict):
        return f"record is a {type(obj).__name__}, not an object"
    doc_id, text = obj.get("id"), obj.get("text")
    if doc_id is None:
        return "missing 'id'"
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        return f"'id' must be a string or an integer, got {type(doc_id).__name__}"
    doc_id = str(doc_id)
    if not doc_id.strip():
        return "empty 'id'"
    if text is None:
        return "missing 'text'"
    if not isinstance(text, str):
        return f"'text' must be a string, got {type(text).__name__}"
    if not text.strip():
        return "empty 'text'"
    metadata = {k: v for k, v in obj.items() if k not in ("id", "text")}
    try:
        json.dumps(metadata)
    except (TypeError, ValueError):
        return "metadata is not JSON-serialisable"
    return Document(doc_id, text, metadata)


def _jsonl_records(uri: str) -> Iterator[tuple[dict, object]]:
    """(position, parsed object or error reason) per non-blank line; positions are 1-based line numbers."""
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb", compression="infer") as f:
        seen_any = False
        for number, raw in enumerate(f, start=1):
            seen_any = True
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield {"line": number}, f"invalid UTF-8 at byte {e.start}"
                continue
            if not line.strip():
                continue
            try:
                yield {"line": number}, json.loads(line)
            except json.JSONDecodeError as e:
                yield {"line": number}, f"not JSON: {e.msg}"
        if not seen_any:
            yield {"line": 0}, "empty file"


def _parquet_records(uri: str) -> Iterator[tuple[dict, object]]:
    """(position, row dict or error reason); positions are 0-based row numbers."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(io.BytesIO(storage.read_bytes(uri)))
    except Exception as e:  # noqa: BLE001 - any unreadable file is one reported error, not a crash
        yield {"row": 0}, f"cannot read Parquet: {e}"
        return
    names = pf.schema_arrow.names
    missing = [c for c in ("id", "text") if c not in names]
    if missing:
        yield {"row": 0}, f"missing column(s) {missing}"
        return
    if pf.metadata.num_rows == 0:
        yield {"row": 0}, "empty file"
        return
    row = 0
    for batch in pf.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            yield {"row": row}, record
            row += 1


def iter_file(uri: str) -> Iterator[Document | dict]:
    """Valid Documents and error dicts of one file, in file order. Duplicate ids inside the file are errors."""
    records = _parquet_records(uri) if uri.endswith(PARQUET_SUFFIXES) else _jsonl_records(uri)
    seen: set[str] = set()
    try:
        for position, obj in records:
            result = validate_record(obj) if not isinstance(obj, str) else obj
            if isinstance(result, Document) and result.id in seen:
                result = f"duplicate document id {result.id!r}"
            if isinstance(result, str):
                yield {"file": uri, **position, "reason": result}
            else:
                seen.add(result.id)
                yield result
    except (OSError, EOFError) as e:  # e.g. a truncated gzip member
        yield {"file": uri, "line": -1, "reason": f"cannot read file: {e}"}


def iter_parts(uri: str, file_index: int, shard_documents: int) -> Iterator[Part]:
    """Cut one file into Parts. Always yields at least one Part, so a file with only errors still reports them."""
    documents: list[Document] = []
    errors: list[dict] = []
    index = 0
    for item in iter_file(uri):
        if isinstance(item, dict):
            errors.append(item)
            continue
        documents.append(item)
        if len(documents) == shard_documents:
            yield Part(uri, file_index, index, documents, errors)
            documents, errors, index = [], [], index + 1
    if documents or errors or index == 0:
        yield Part(uri, file_index, index, documents, errors)


def documents_from_dicts(records: Iterable[dict], source: str = "api") -> tuple[list[Document], list[dict]]:
    """Validate in-memory documents (the serve admin API): (documents, errors with 0-based `row`)."""
    documents, errors, seen = [], [], set()
    for row, obj in enumerate(records):
        result = validate_record(obj)
        if isinstance(result, Document) and result.id in seen:
            result = f"duplicate document id {result.id!r}"
        if isinstance(result, str):
            errors.append({"file": source, "row": row, "reason": result})
        else:
            seen.add(result.id)
            documents.append(result)
    return documents, errors


# --- chunking --------------------------------------------------------------------------------------------------

def chunk_spans(token_texts: list[str], clean: list[bool], max_len: int) -> list[tuple[int, int]]:
    """Split n tokens into [start, end) spans of at most max_len tokens.

    Prefer to cut after a sentence end, then before a space, in the second half of the window; otherwise cut hard.
    `clean[i]` says a cut before token i does not split a character (byte-level BPE can split one)."""
    n, spans, start = len(token_texts), [], 0
    while start < n:
        end = min(start + max_len, n)
        if end < n:
            window = range(end, start + max_len // 2, -1)
            end = next((c for c in window if clean[c] and token_texts[c - 1].rstrip(" ").endswith(SENTENCE_ENDS)),
                       next((c for c in window if clean[c] and token_texts[c][:1].isspace()),
                            next((c for c in window if clean[c]), end)))
        spans.append((start, end))
        start = end
    return spans


def chunk_document(doc: Document, tokenizer: Tokenizer, reference_len: int) -> list[Reference]:
    """Tokenize a document and cut it into references of at most reference_len tokens (paper §4.4)."""
    source = doc.text.strip()
    enc = tokenizer.tk.encode(source, add_special_tokens=False)
    ids, offsets = enc.ids, enc.offsets
    token_texts = [source[a:b] for a, b in offsets]
    clean = [True] + [offsets[i][0] >= offsets[i - 1][1] for i in range(1, len(ids))]
    refs = []
    for s, e in chunk_spans(token_texts, clean, reference_len):
        text = source[offsets[s][0]:offsets[e - 1][1]].strip()
        if text:  # a whitespace-only chunk carries no knowledge
            refs.append(Reference(f"{doc.id}#{len(refs)}", doc.id, text, list(ids[s:e]), doc.metadata))
    return refs


def chunk_documents(documents: list[Document], tokenizer: Tokenizer, reference_len: int) -> list[Reference]:
    return [r for d in documents for r in chunk_document(d, tokenizer, reference_len)]


def reference_to_dict(ref: Reference) -> dict:
    return asdict(ref)


def reference_from_dict(d: dict) -> Reference:
    return Reference(**d)
