"""`memory3 eval`: does the model answer from explicit memory? Exact match and answer log-likelihood in three
modes on the same retrieved references (paper §7): explicit memory, no memory, and RAG (the reference texts
prepended to the prompt with the served endpoint's template, model/prompts.py), plus decode tokens/s and time to first token per mode.

Entities of the `memory_only` group exist only in the bank, never in training text: their accuracy with memory vs
without measures knowledge moved out of the weights.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import torch

from bank import storage
from bank.checkpoints import parse_dtype
from bank.format import weights_sha256
from bank.index import Retriever
from bank.reader import MemoryBank
from bank.store import MemoryStore
from configs import typed
from configs.schema import EvalConfig
from model.checkpoint import load_checkpoint
from model.generate import Retrieved, generate
from model.prompts import rag_prompt
from model.tokenizer import Tokenizer
from model.transformer import MemoryBatch, Transformer
from pipelines import console
from pipelines.answers import decode_answers, normalise
from pipelines.retrieval_assign import overlap

MODES = ("memory", "none", "rag")
LEAKAGE_SPARE = 4  # extra candidates fetched so the leakage filter still leaves k references


@dataclass
class MemorySource:
    """Retrieval + memory loading in-process: the same path serving takes, without the HTTP hop."""

    retriever: Retriever
    store: MemoryStore
    bank: MemoryBank
    k: int
    searches: int = field(default=0)
    tokenizer: Tokenizer | None = None  # set: the evaluation leakage filter is on
    leakage_threshold: float = 2 / 3
    dropped: int = field(default=0)

    def search(self, texts: list[str]) -> list[list[int]]:
        """The top k references per text. With a tokenizer, a reference whose overlap (paper eq. 6) with the
        question exceeds `leakage_threshold` is dropped first (paper §6: evaluation discards > 2/3: a reference
        that contains the question is its answer key, not knowledge)."""
        self.searches += len(texts)
        if self.tokenizer is None:
            return self.retriever.search(texts, self.k)
        hits = self.retriever.search(texts, self.k + LEAKAGE_SPARE)
        records = dict(zip(rows := sorted({r for h in hits for r in h}), self.bank.records(rows)))
        kept = []
        for text, cands in zip(texts, hits):
            question = self.tokenizer.encode(text)
            ok = [r for r in cands if overlap(question, records[r]["tokens"]) <= self.leakage_threshold]
            self.dropped += len(cands) - len(ok)
            kept.append(ok[: self.k])
        return kept

    def load(self, rows: list[int]) -> Retrieved:
        memories, n_valid = self.store.fetch(rows)
        return Retrieved(memories, n_valid, ids=[self.bank.reference_ids()[r] for r in rows])

    def texts(self, rows: list[int]) -> list[str]:
        return [r["text"] for r in self.bank.records(rows)]


def open_memory_source(bank_uri: str, k: int, cache_size: int = 4096, device: str = "cpu",
                       dtype: torch.dtype = torch.float32, expect_model_sha: str | None = None,
                       expect_tokenizer_sha: str | None = None, leakage_filter: Tokenizer | None = None,
                       leakage_threshold: float = 2 / 3) -> MemorySource:
    """leakage_filter: the model's tokenizer to apply the paper's evaluation leakage filter with (None: off)."""
    bank = MemoryBank.open(bank_uri, expect_model_sha=expect_model_sha, expect_tokenizer_sha=expect_tokenizer_sha)
    return MemorySource(Retriever.open(bank_uri), MemoryStore(bank, cache_size=cache_size, device=device, dtype=dtype),
                        bank, k, tokenizer=leakage_filter, leakage_threshold=leakage_threshold)


def answer_logprob(model: Transformer, tokenizer: Tokenizer, prompt_ids: list[int], answer: str,
                   retrieved: Retrieved | None) -> float:
    """Sum of log p(answer tokens | prompt), teacher-forced, with the prompt window's memories if given."""
    answer_ids = tokenizer.encode(" " + answer)
    ids = torch.tensor([prompt_ids + answer_ids], device=model.device)
    memory = None
    if retrieved is not None and len(retrieved.n_valid):
        T = ids.shape[1]
        W = model.cfg.n_windows(T)
        M = len(retrieved.n_valid)
        memory = MemoryBatch.from_references(retrieved.memories[None].to(model.device),
                                             retrieved.n_valid[None].to(model.device),
                                             torch.ones(1, W, M, dtype=torch.bool, device=model.device),
                                             torch.arange(T, device=model.device)[None], model.cfg)
    with torch.inference_mode():
        logp = model(ids, memory=memory).float().log_softmax(-1)[0]
    start = len(prompt_ids)
    return float(sum(logp[start - 1 + i, t] for i, t in enumerate(answer_ids)))


def evaluate(model: Transformer, tokenizer: Tokenizer, qa: list[dict], source: MemorySource,
             modes=MODES, batch_size: int = 16, max_new_tokens: int = 16) -> dict:
    """Accuracy per mode and group on `qa` records ({"prompt", "answer", "group"}); all modes share retrievals."""
    prompts = [q["prompt"] for q in qa]
    rows = source.search(prompts)  # one retrieval per question, shared by memory and RAG mode
    results = {m: [] for m in modes}
    for mode in modes:
        for lo in range(0, len(qa), batch_size):
            part = list(range(lo, min(lo + batch_size, len(qa))))
            loaded = {i: source.load(rows[i]) for i in part} if mode == "memory" else {}
            if mode == "rag":
                texts = [rag_prompt(source.texts(rows[i]), prompts[i]) for i in part]
            else:
                texts = [prompts[i] for i in part]
            ids = [tokenizer.context_ids(t) for t in texts]
            retrieve = (lambda row, query, part=part, loaded=loaded: loaded[part[row]]) if mode == "memory" else None
            answers = decode_answers(model, tokenizer, ids, max_new_tokens, retrieve)
            for j, (i, answer) in enumerate(zip(part, answers)):
                results[mode].append({
                    "id": qa[i].get("id"), "group": qa[i].get("group"), "fact": qa[i].get("fact", "country"),
                    "answer": qa[i]["answer"], "output": answer,
                    "correct": normalise(answer) == normalise(qa[i]["answer"]),
                    "logprob": answer_logprob(model, tokenizer, ids[j], qa[i]["answer"], loaded.get(i)),
                    "references": [source.bank.reference_ids()[r] for r in rows[i]],
                })
    return {"results": results, "accuracy": accuracy_table(results), "accuracy_by_fact": accuracy_by_fact(results)}


def exact_match(rows: list[dict]) -> float:
    return round(sum(r["correct"] for r in rows) / max(1, len(rows)), 4)


def accuracy_table(results: dict) -> dict:
    """{mode: {group: exact match over all its questions, group_answer_logprob: mean log p(answer)}}."""
    table = {}
    for mode, rs in results.items():
        groups = sorted({r["group"] for r in rs})
        table[mode] = {g: exact_match([r for r in rs if r["group"] == g]) for g in groups}
        for g in groups:
            lps = [r["logprob"] for r in rs if r["group"] == g]
            table[mode][f"{g}_answer_logprob"] = round(sum(lps) / max(1, len(lps)), 3)
    return table


def accuracy_by_fact(results: dict) -> dict:
    """{mode: {group: {fact: exact match}}}: which kinds of fact the model reads (country, continent, ...)."""
    return {mode: {g: {f: exact_match([r for r in rs if r["group"] == g and r["fact"] == f])
                       for f in sorted({r["fact"] for r in rs if r["group"] == g})}
                   for g in sorted({r["group"] for r in rs})}
            for mode, rs in results.items()}


def pick_questions(qa: list[dict], groups: list[str], limit: int) -> list[dict]:
    """Up to `limit` questions (0: all) of each (group, fact), in file order: the quickstart and `memory3 eval`
    score the same questions."""
    picked = []
    for g in groups:
        for fact in dict.fromkeys(q.get("fact", "country") for q in qa if q["group"] == g):
            picked += [q for q in qa if q["group"] == g and q.get("fact", "country") == fact][: limit or None]
    return picked


def measure_speed(model: Transformer, tokenizer: Tokenizer, qa: list[dict], source: MemorySource,
                  modes=MODES, n_prompts: int = 8, new_tokens: int = 32) -> dict:
    """Batch-1 decode tokens/s and time to first token per mode, retrieval and memory loading included."""
    speed = {}
    for mode in modes:
        ttft, tok_s = [], []
        for q in qa[:n_prompts]:
            t0 = time.perf_counter()
            prompt, retrieve = q["prompt"], None
            if mode == "rag":
                prompt = rag_prompt(source.texts(source.search([prompt])[0]), prompt)
            elif mode == "memory":
                retrieve = lambda row, query: source.load(source.search([tokenizer.decode(query)])[0])
            ids = tokenizer.context_ids(prompt)
            n = min(new_tokens, model.cfg.max_seq_len - len(ids))
            first = None
            for _ in generate(model, [ids], n, retrieve=retrieve):
                first = first or time.perf_counter()
            total = time.perf_counter() - t0
            ttft.append(first - t0)
            tok_s.append(n / total)
        speed[mode] = {"tokens_per_s": round(sum(tok_s) / len(tok_s), 1),
                       "time_to_first_token_ms": round(1e3 * sum(ttft) / len(ttft), 2)}
    return speed


def read_jsonl(uri: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]


def run(cfg: EvalConfig) -> dict:
    cfg = typed("eval", cfg)
    dtype = parse_dtype(cfg.dtype, cfg.device)
    model, tokenizer = load_checkpoint(cfg.checkpoint, cfg.device, dtype)
    if tokenizer is None:
        raise ValueError(f"checkpoint {cfg.checkpoint} has no tokenizer.json")
    source = open_memory_source(cfg.bank, k=cfg.refs or model.cfg.refs_per_window, device=cfg.device, dtype=dtype,
                                expect_model_sha=weights_sha256(cfg.checkpoint), expect_tokenizer_sha=tokenizer.sha256,
                                leakage_filter=tokenizer if cfg.leakage_threshold < 1 else None,
                                leakage_threshold=cfg.leakage_threshold)
    qa = read_jsonl(cfg.qa)
    groups = list(cfg.groups) if cfg.groups else sorted({q["group"] for q in qa})
    picked = pick_questions(qa, groups, cfg.limit_per_group)
    torch.manual_seed(cfg.seed)
    report = evaluate(model, tokenizer, picked, source, modes=list(cfg.modes), batch_size=cfg.batch_size,
                      max_new_tokens=cfg.max_new_tokens)
    report["speed"] = {} if not cfg.speed_prompts else measure_speed(
        model, tokenizer, picked, source, modes=list(cfg.modes), n_prompts=cfg.speed_prompts,
        new_tokens=cfg.speed_tokens)
    report["n_questions"] = {g: sum(1 for q in picked if q["group"] == g) for g in groups}
    return report


def format_table(report: dict) -> str:
    acc, speed = report["accuracy"], report["speed"]
    groups = sorted({k for m in acc.values() for k in m if not k.endswith("logprob")})
    head = "| mode | " + " | ".join(f"EM {g}" for g in groups) + " | decode tok/s | TTFT ms |"
    lines = [head, "|" + "---|" * (len(groups) + 3)]
    for mode in acc:
        cells = [f"{acc[mode][g]:.3f}" for g in groups]
        timed = speed.get(mode, {})  # none with speed_prompts=0
        lines.append(f"| {mode} | " + " | ".join(cells) +
                     f" | {timed.get('tokens_per_s', '–')} | {timed.get('time_to_first_token_ms', '–')} |")
    return "\n".join(lines)


def main(cfg: EvalConfig) -> None:
    report = run(cfg)
    console.say(format_table(report))
    summary = {k: v for k, v in report.items() if k != "results"}
    if cfg.out:
        storage.write_text(cfg.out, json.dumps(report, indent=1))
    console.say(json.dumps(summary))
