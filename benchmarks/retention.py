"""Which answer tokens survive sparsification: for each evaluated question, whether the tokens of its answer in the
city's own reference are among the `mem_tokens` kept per KV head in each memory layer, split by right and wrong
answers. Says whether a fact the model misses was in its memory at all (raise k, or move the fact) or was there and
not read (train reading). One JSON line per (fact, memory layer, right or wrong).

    python -m benchmarks.retention --run runs/quickstart          # a `memory3 quickstart` out folder
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from model.checkpoint import load_checkpoint
from model.encoder import encode_references, pad_references


def answer_span(tokenizer, text: str, entity: str, value: str) -> tuple[list[int], list[int]]:
    """The reference's token ids, and the indices of those that overlap the first `value` after the entity's name
    (the fact as the reference states it; a country also named later inside a time zone is not the stated one)."""
    encoded = tokenizer.tk.encode(text, add_special_tokens=False)
    start = text.find(value, text.find(entity) + len(entity))
    if start < 0:
        return encoded.ids, []
    return encoded.ids, [i for i, (a, b) in enumerate(encoded.offsets) if a < start + len(value) and b > start]


def retention(run: Path, group: str, facts: list[str], batch: int = 256) -> list[dict]:
    model, tokenizer = load_checkpoint(run / "checkpoint")
    references = {}
    with open(run / "bank_corpus.jsonl") as f:
        for line in f:
            doc = json.loads(line)
            references[doc["id"]] = doc
    asked = []  # (correct, fact, reference tokens, answer span)
    for result in json.loads((run / "results.json").read_text())["memory"]:
        doc = references.get("city:" + result["id"].split(":")[1])
        if result["group"] != group or result["fact"] not in facts or doc is None:
            continue
        ids, span = answer_span(tokenizer, doc["text"], doc["entity"], doc["facts"][result["fact"]])
        if span:
            asked.append((result["correct"], result["fact"], ids, span))
    counts = defaultdict(lambda: [0, 0, 0, 0])  # questions, fully kept, answer tokens, tokens kept
    with torch.no_grad():
        for i in range(0, len(asked), batch):
            part = asked[i:i + batch]
            tokens, lengths = pad_references([p[2] for p in part], model.cfg.reference_len, tokenizer.pad_id)
            positions = encode_references(model, tokens, lengths, tokenizer.sink_ids).positions  # (N, L, Hkv, k)
            for (correct, fact, _, span), kept_by_layer in zip(part, positions):
                for layer, kept in enumerate(kept_by_layer):
                    kept = set(kept.flatten().tolist())  # kept by any KV head
                    row = counts[(fact, layer, correct)]
                    row[0] += 1
                    row[1] += all(t in kept for t in span)
                    row[2] += len(span)
                    row[3] += sum(t in kept for t in span)
    return [{"fact": fact, "layer": layer, "correct": correct, "questions": n,
             "answer_fully_kept": round(full / n, 3), "answer_tokens_kept": round(tok_kept / tok, 3)}
            for (fact, layer, correct), (n, full, tok, tok_kept) in sorted(counts.items())]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, type=Path, help="a quickstart out folder (checkpoint/, bank_corpus.jsonl, "
                                                            "results.json)")
    ap.add_argument("--group", default="memory_only")
    ap.add_argument("--facts", nargs="+", default=["country", "continent", "timezone"])
    args = ap.parse_args()
    preset = json.loads((args.run / "checkpoint" / "config.json").read_text())["model"]
    for row in retention(args.run, args.group, args.facts):
        print(json.dumps({"bench": "retention", "run": str(args.run), "mem_tokens": preset["mem_tokens"], **row}),
              flush=True)


if __name__ == "__main__":
    main()
