"""Short answers decoded and scored one way everywhere: `memory3 eval`, the quickstart and benchmarks/reading.py
(kept free of FAISS and Ray so the reading benchmark runs on a bare GPU machine)."""
from __future__ import annotations

from typing import Callable

from model.generate import Retrieved, generate
from model.tokenizer import Tokenizer
from model.transformer import Transformer


def normalise(text: str) -> str:
    """Exact match ignores case, full stops and spacing."""
    return " ".join(text.replace(".", " ").split()).lower()


def first_line(text: str) -> str:
    return text.strip().split("\n")[0].strip()


def decode_answers(model: Transformer, tokenizer: Tokenizer, ids: list[list[int]], max_new_tokens: int,
                   retrieve: Callable[[int, list[int]], Retrieved] | None = None) -> list[str]:
    """Greedy answers to already tokenised prompts, cut at the end of text or the first line break. A long prompt
    (a RAG prompt of long references) gets the new tokens that still fit in the model's context."""
    stop = {tokenizer.eos_id, *tokenizer.encode("\n")}
    out: list[list[int]] = [[] for _ in ids]
    budget = [max(0, min(max_new_tokens, model.cfg.max_seq_len - len(p))) for p in ids]
    for step in generate(model, ids, budget, retrieve=retrieve, stop_ids=stop):
        for j, t in enumerate(step.tokens):
            if t is not None and t not in stop:
                out[j].append(t)
    return [first_line(tokenizer.decode(o)) for o in out]
