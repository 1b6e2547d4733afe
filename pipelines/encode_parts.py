"""The read and chunk stages of `memory3 encode` as Ray Data row functions: a small module, so the read/chunk
workers import only the bank's chunking code, not the encoder."""
from __future__ import annotations

import json

from bank.chunking import Document, chunk_documents, iter_parts, reference_to_dict
from model.tokenizer import Tokenizer


def read_parts_row(row: dict, shard_documents: int) -> list[dict]:
    """flat_map: {"path", "file_index"} → one row per Part, documents and errors as a JSON payload."""
    out = []
    for part in iter_parts(row["path"], int(row["file_index"]), shard_documents):
        payload = {"documents": [[d.id, d.text, d.metadata] for d in part.documents], "errors": part.errors}
        out.append({"file_index": part.file_index, "part": part.index, "source": part.source,
                    "name": part.shard_name if part.documents else "", "payload": json.dumps(payload)})
    return out


_TOKENIZERS: dict[str, Tokenizer] = {}


def chunk_part_row(row: dict, tokenizer_json: str, reference_len: int, complete: frozenset) -> dict:
    """map: a part's documents → its references. A part whose shard is already complete skips the work and
    travels on with its errors only (they are reported again, so errors.jsonl is the same after a resume)."""
    payload = json.loads(row["payload"])
    if row["name"] in complete:
        payload["references"], payload["skip"] = [], True
    else:
        if tokenizer_json not in _TOKENIZERS:
            _TOKENIZERS[tokenizer_json] = Tokenizer.from_str(tokenizer_json)
        docs = [Document(i, t, m) for i, t, m in payload["documents"]]
        refs = chunk_documents(docs, _TOKENIZERS[tokenizer_json], reference_len)
        payload["references"] = [reference_to_dict(r) for r in refs]
    del payload["documents"]
    return {**row, "payload": json.dumps(payload)}
