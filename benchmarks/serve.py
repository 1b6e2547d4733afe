"""Serving speed with explicit memory, without memory, and with RAG: time to first token, tokens/s per request,
requests/s and total tokens/s. One JSON line per result.

    python -m benchmarks.serve                               # CPU: the whole Ray Serve app over real HTTP (tiny)
    python -m benchmarks.serve --checkpoint runs/quickstart/checkpoint --bank runs/quickstart/bank
    python -m benchmarks.serve --preset 2.4b --device cuda   # GPU: the generator's engine directly, random weights
    python -m benchmarks.serve --preset 2.4b --device cuda --http --concurrency 32 --max-batch 32 --prompt-tokens 128
                                                             # GPU: the whole app over HTTP beside the engine alone

The HTTP path measures what a client sees: ingress, retriever (embedder + FAISS), memory store and generator
replicas on local Ray, streaming completions. Without --checkpoint it builds a random-weight checkpoint of --preset
and a bank of the bundled geonames references with `memory3 encode`'s own job. On CUDA (`--http`) the generator
decodes in bf16 with its own GPU memory tier and the retriever embeds on the GPU. With `--http` the same run then
times the engine alone on the same model shape (memories gathered on the device, batch = the largest concurrency),
so the HTTP path's share of the engine's own tokens/s is measured, not assumed. The direct path (`--direct`, default
on CUDA) measures the continuous-batching engine alone, like the paper's Table 21 (batch 32, 128 in / 128 out):
memories come from a pinned host pool, gathered into pinned memory and copied to the device at every retrieval
(`--memory-tier host`: what `MemoryStore`'s host tier costs), or are gathered on the device (`--memory-tier gpu`:
its GPU tier, memories already decoded there), `static` rows run model.generate (one fixed batch) for comparison,
and the same run measures the ceiling (the device's copy bandwidth over the weight bytes, times the batch) and
Hugging Face transformers' LlamaForCausalLM of the same shape (random weights, `generate`) as the baseline.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from benchmarks.model import commit, device_name
from configs.schema import DecodingSettings
from model.config import ModelConfig
from model.generate import Retrieved, compile_prefill, generate
from model.transformer import Transformer
from serve.engine import DecodeEngine, DecodeRequest
from serve.timings import percentile

MODES = ("memory", "none", "rag")


def summary(values: list[float], digits: int = 4) -> dict:
    return {"p50": round(percentile(values, 0.5), digits), "p90": round(percentile(values, 0.9), digits)} \
        if values else {"p50": None, "p90": None}


# --- over HTTP -------------------------------------------------------------------------------------------------

def build_fixture(work: Path, documents: int, preset: str = "tiny", device: str = "cpu",
                  prompt_tokens: int | None = None) -> tuple[str, str, list[str]]:
    """A random-weight checkpoint of `preset` (this corpus's tokenizer), a bank of geonames references encoded by
    `memory3 encode` on `device` (bf16: codebooks would take minutes to train and change nothing here), and the
    prompts: the corpus's questions, or with `prompt_tokens` its reference text cut into prompts of about that
    many tokens (the paper's 128 in / 128 out)."""
    from configs import load_config
    from model.checkpoint import save_checkpoint
    from model.tokenizer import Tokenizer
    from pipelines.encode import encode_corpus
    from pipelines.geo_corpus import build_geo_corpus

    corpus = work / "corpus"
    build_geo_corpus(corpus)
    references = [json.loads(line) for line in (corpus / "references.jsonl").read_text().splitlines()][:documents]
    (work / "references.jsonl").write_text("".join(json.dumps(r) + "\n" for r in references))
    tokenizer = Tokenizer.train([r["text"] for r in references], vocab_size=2048)
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(ModelConfig.from_name(preset, vocab_size=tokenizer.vocab_size))
    model = model.to(torch.bfloat16 if device == "cuda" else torch.float32).eval()
    checkpoint = str(save_checkpoint(work / "checkpoint", model, tokenizer, meta={"stage": "random"}))
    del model
    gpu = ["num_gpus=1", "compile=false", "quantizer=null"] if device == "cuda" else []
    cfg = load_config("encode", [f"corpus={work / 'references.jsonl'}", f"bank={work / 'bank'}",
                                 f"checkpoint={checkpoint}", "actors=1", "actor_num_cpus=0.5", *gpu])
    with contextlib.redirect_stdout(sys.stderr):  # the job's progress bar: stdout carries only JSON lines
        encode_corpus(cfg)
    if prompt_tokens:
        ids = tokenizer.encode(" ".join(r["text"] for r in references[:400]))
        return checkpoint, str(work / "bank"), [tokenizer.decode(ids[i:i + prompt_tokens])
                                                for i in range(0, len(ids) - prompt_tokens, prompt_tokens)]
    qa = [json.loads(line) for line in (corpus / "qa.jsonl").read_text().splitlines()]
    return checkpoint, str(work / "bank"), [q["prompt"] for q in qa[:200]]


async def one_request(client, body: dict) -> dict:
    t0 = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"error": r.status_code}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": chunk["error"]["code"]}
            if chunk["choices"] and first is None:
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"ttft": (first or end) - t0, "latency": end - t0, "tokens": tokens,
            "decode_tps": (tokens - 1) / (end - first) if first and tokens > 1 and end > first else None}


async def load(url: str, prompts: list[str], mode: str, n: int, concurrency: int, max_tokens: int,
               generator=None) -> dict:
    """Closed-loop load: `concurrency` clients send `n` streaming requests in all, after warm-up rounds. With the
    Generator's handle, its timings of the timed phase alone come back too (where the first token waits), and how
    many decode graphs that phase had to capture (every request in flight waits for a capture, and for a
    compilation of a minute or more at 2.4B if it is the first of its kind: a timed phase that captured any
    measured the warm-up, not the engine)."""
    import httpx

    results: list[dict] = []
    todo = list(range(n))

    def body(i: int) -> dict:  # warm-up and timed requests alike, so the warm-up takes the timed path
        return {"model": "memory3", "prompt": prompts[i % len(prompts)], "max_tokens": max_tokens,
                "temperature": 0, "memory_mode": mode, "stream": True, "stream_options": {"include_usage": True}}

    async def worker(client):
        while todo:
            results.append(await one_request(client, body(todo.pop())))

    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        # warm-up: a round at each batch bucket up to this concurrency (the engine captures a decode graph per
        # batch bucket on first use, compiling first with the first request; requests that arrive apart can start
        # decoding in a small bucket)
        for size in sorted({min(2 ** k, concurrency) for k in range(concurrency.bit_length() + 1)}):
            await asyncio.gather(*(one_request(client, body(i)) for i in range(size)))
        graphs = None
        if generator is not None:
            await generator.reset_timings.remote()
            graphs = (await generator.stats.remote())["graphs"]
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    timings = {}
    if generator is not None:
        stats = await generator.stats.remote()
        timings = {"engine": {k: stats[k] for k in ("queue_s", "prefill_s", "first_token_s", "retrieve_s", "step_s",
                                                  "gc_pause_s")},
                   "graphs_captured_while_timed": stats["graphs"] - graphs}
    ok = [r for r in results if "error" not in r]
    return {"requests": n, "errors": n - len(ok), "seconds": round(wall, 2),
            "requests_per_s": round(len(ok) / wall, 2),
            "tokens_per_s_total": round(sum(r["tokens"] for r in ok) / wall, 1),
            "ttft_s": summary([r["ttft"] for r in ok]), "latency_s": summary([r["latency"] for r in ok], 3),
            "decode_tokens_per_s_per_request": summary([r["decode_tps"] for r in ok if r["decode_tps"]], 1),
            "completion_tokens_mean": round(statistics.mean(r["tokens"] for r in ok), 1) if ok else None,
            **timings}


def gpu_settings(max_batch: int) -> dict:
    """The app on one GPU: the generator in bf16 with its own GPU memory tier (configs/serve.yaml's default on
    CUDA) and most of the device, the embedder beside it."""
    return {"decoding": {"device": "cuda", "dtype": "bfloat16", "max_batch_size": max_batch},
            "retrieval": {"device": "cuda"}, "writer": {"device": "cuda", "dtype": "bfloat16"},
            "deployments": {"generator": {"num_gpus": 0.7, "num_cpus": 1, "max_ongoing_requests": 2 * max_batch},
                            "retriever": {"num_gpus": 0.2, "num_cpus": 1}, "bank_writer": {"num_gpus": 0.1}}}


def run_http(args) -> None:
    from omegaconf import OmegaConf
    from ray import serve

    from pipelines.ray_runtime import ensure_ray
    from serve.app import build_app, wait_healthy

    cuda = args.device == "cuda"
    ensure_ray("local", num_cpus=2) if args.local_ray else ensure_ray()
    work = Path(tempfile.mkdtemp(prefix="memory3-bench-serve-"))
    if args.checkpoint:
        checkpoint, bank = args.checkpoint, args.bank
        qa = Path(args.prompts) if args.prompts else None
        prompts = [json.loads(line)["prompt"] for line in qa.read_text().splitlines()] if qa else \
            ["Which country is Lyon in?", "What is the population of Osaka?"]
    else:
        checkpoint, bank, prompts = build_fixture(work, args.documents, args.preset, args.device,
                                                  args.prompt_tokens)
    settings = OmegaConf.merge(gpu_settings(args.max_batch) if cuda else {}, {
        "checkpoint": checkpoint, "bank": bank,
        "decoding": {"max_batch_size": args.max_batch, "retrieval_concurrency": args.retrieval_concurrency,
                     "stream_interval_s": args.stream_interval},
        "deployments": {"ingress": {"num_replicas": args.ingress_replicas}}})
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(build_app(OmegaConf.to_container(settings)), name="memory3-bench", route_prefix="/")
    url = f"http://127.0.0.1:{args.port}"
    wait_healthy(url, 600)
    common = {"bench": "serve_http", "device": device_name(args.device), "commit": commit(),
              "max_tokens": args.max_tokens, "max_batch": args.max_batch,
              "retrieval_concurrency": args.retrieval_concurrency, "stream_interval_s": args.stream_interval,
              "ingress_replicas": args.ingress_replicas,
              "checkpoint": f"random-{args.preset}" if not args.checkpoint else checkpoint}
    http = {}
    generator = serve.get_deployment_handle("Generator", "memory3-bench")
    try:
        for concurrency in args.concurrency:
            for mode in args.modes:
                result = asyncio.run(load(url, prompts, mode, args.requests, concurrency, args.max_tokens, generator))
                http[mode, concurrency] = result
                print(json.dumps({**common, "mode": mode, "concurrency": concurrency, **result}), flush=True)
        engine = generator.stats.remote().result()
        print(json.dumps({**common, "bench": "serve_generator_start", "graphs": engine["graphs"],
                          "graphs_captured_at_start": engine["graphs_captured"],
                          "capture_s": engine["capture_s"], "prefills": engine["prefills"],
                          "requests_per_prefill": round(engine["prefilled"] / max(1, engine["prefills"]), 2)}),
              flush=True)
        store = serve.get_deployment_handle("MemoryStore", "memory3-bench").stats.remote().result()
        for stats in (store, engine["memory_tier"]):  # the deployment's tier, and the generator's own (or None)
            if stats:
                print(json.dumps({**common, "bench": "serve_memory_store", "tier": stats["device"],
                                  "hit_rate": round(stats["hit_rate"], 3), "rows_requested": stats["rows_requested"],
                                  "misses": stats["misses"]}), flush=True)
    finally:
        serve.delete("memory3-bench")
    if args.http:  # the engine alone, same shape and prompt length, batch = the largest concurrency
        from bank.checkpoints import local_checkpoint
        from model.checkpoint import load_config as checkpoint_config

        batch = max(args.concurrency)
        engine = run_direct(args, cfg=checkpoint_config(local_checkpoint(checkpoint)), batch=batch, hf=False,
                            static=False, memory_tier="gpu")
        for mode in args.modes:
            if (mode, batch) in http and mode in engine:
                print(json.dumps({**common, "bench": "serve_http_vs_engine", "mode": mode, "concurrency": batch,
                                  "http_tokens_per_s": http[mode, batch]["tokens_per_s_total"],
                                  "engine_tokens_per_s": engine[mode],
                                  "ratio": round(http[mode, batch]["tokens_per_s_total"] / engine[mode], 3)}),
                      flush=True)


# --- the engine directly ---------------------------------------------------------------------------------------

def hf_baseline(cfg: ModelConfig, batch: list[list[int]], out_len: int, dev: str, dtype, repeats: int) -> dict:
    """Hugging Face LlamaForCausalLM of the same shape, random weights, `generate` with its KV cache, greedy, no
    memory (transformers' default SDPA attention, no compilation): tokens/s over the whole request and TTFT (a
    1-token generate: prefill plus the first token)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.mlp_hidden,
                         num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                         num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
                         rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_seq_len + cfg.reference_len,
                         tie_word_embeddings=False)
    with torch.device(dev):
        hf = LlamaForCausalLM(hf_cfg).to(dtype).eval()
    ids = torch.tensor(batch, device=dev)

    def run(n: int) -> float:
        torch.cuda.synchronize() if dev == "cuda" else None
        t0 = time.perf_counter()
        with torch.inference_mode():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, pad_token_id=0)
        torch.cuda.synchronize() if dev == "cuda" else None
        return time.perf_counter() - t0

    run(4)
    wall = statistics.median(run(out_len) for _ in range(repeats))
    ttft = statistics.median(run(1) for _ in range(repeats))
    del hf
    torch.cuda.empty_cache() if dev == "cuda" else None
    return {"tokens_per_s": round(len(batch) * out_len / wall, 1), "seconds": round(wall, 3), "ttft_s": round(ttft, 4)}


def run_direct(args, cfg: ModelConfig | None = None, **overrides) -> dict[str, float]:
    """The engine alone; `cfg` and `overrides` (of the command line's settings) let the HTTP path time the same
    shape. Returns each mode's median continuous-engine tokens/s."""
    from benchmarks.model import copy_bandwidth, weight_bytes

    args = argparse.Namespace(**{**vars(args), **overrides})
    dev = args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    cfg = cfg or ModelConfig.from_name(args.preset)
    torch.manual_seed(0)
    with torch.device(dev):
        model = Transformer(cfg).to(dtype).eval()
    if args.fuse:
        model.fuse_projections()  # as the generator deployment serves it (decoding.fuse_projections)
    pool_size = 4 * cfg.refs_per_window * args.batch
    on_gpu = args.memory_tier == "gpu" and dev == "cuda"
    pool = torch.randn(pool_size, *cfg.memory_shape, dtype=dtype, device=dev if on_gpu else "cpu")
    pinned = dev == "cuda" and not on_gpu
    pool = pool.pin_memory() if pinned else pool
    n_valid = torch.full((cfg.refs_per_window,), cfg.mem_tokens)
    g = torch.Generator().manual_seed(1)

    def retrieve(query: list[int]) -> Retrieved:
        rows = torch.randint(0, pool_size, (cfg.refs_per_window,), generator=g)
        if on_gpu:  # the GPU tier: a gather of decoded memories on the device
            return Retrieved(pool[rows.to(dev)], n_valid, ids=rows.tolist())
        # the host tier: gathered into pinned memory (torch's caching host allocator), so the copy is asynchronous
        host = torch.empty((len(rows), *pool.shape[1:]), dtype=dtype, pin_memory=pinned)
        torch.index_select(pool, 0, rows, out=host)
        return Retrieved(host.to(dev, non_blocking=True), n_valid, ids=rows.tolist())

    # 128 prompt tokens after the sink ("<s> <ref>"), like the paper's 128 in / 128 out: they fill windows 0-1
    # exactly, so the first decoded window keeps their memories and a request retrieves 3 times (§3.2, Table 21)
    in_len, out_len = args.prompt_tokens or 128, args.max_tokens
    rag_len = in_len + cfg.refs_per_window * cfg.reference_len
    bandwidth = copy_bandwidth(dev)
    wbytes = weight_bytes(model)
    prefill = "compiled" if compile_prefill(torch.device(dev)) else "eager"  # as the engine's
    common = {"bench": "serve_generator", "preset": args.preset, "device": device_name(dev), "prefill": prefill,
              "memory_tier": "gpu" if on_gpu else "host",
              "fused_projections": args.fuse,
              "dtype": str(dtype).split(".")[-1], "commit": commit(), "batch": args.batch, "prompt_tokens": in_len,
              "new_tokens": out_len}
    ceiling = bandwidth / wbytes * args.batch if bandwidth else None
    print(json.dumps({**common, "engine": "ceiling", "copy_gb_s": round(bandwidth / 1e9, 1) if bandwidth else None,
                      "weight_gb": round(wbytes / 1e9, 3), "tokens_per_s": round(ceiling, 1) if ceiling else None,
                      "note": "weights read once per step at the copy bandwidth measured now"}), flush=True)

    def prompts(length: int) -> list[list[int]]:
        return [[1, 4, 1] + torch.randint(5, cfg.vocab_size, (length - 1,), generator=g).tolist()
                for _ in range(args.batch)]

    def rates(tok_s: float) -> dict:
        return {"of_ceiling": round(tok_s / ceiling, 3) if ceiling else None,
                "achieved_gb_s": round(tok_s / args.batch * wbytes / 1e9, 1)}

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    variants = [("memory", in_len, retrieve), ("none", in_len, None)]
    if rag_len + out_len + cfg.sink_len <= cfg.max_seq_len:
        variants.append(("rag", rag_len, None))
    variants = [v for v in variants if v[0] in args.modes]
    if args.hf and dev == "cuda":
        for mode, length, _ in [v for v in variants if v[0] != "memory"]:
            hf = hf_baseline(cfg, prompts(length), out_len, dev, dtype, args.repeats)
            print(json.dumps({**common, "engine": "hf_transformers", "mode": mode, "prompt_tokens": length, **hf,
                              **rates(hf["tokens_per_s"])}), flush=True)
    engine = DecodeEngine(model, max_batch=args.batch, seed=0, capture_at_start=args.capture_at_start)
    print(json.dumps({**common, "engine": "startup", **engine.startup}), flush=True)
    rounds: dict[str, list[float]] = {}
    try:
        for mode, length, fn in variants:
            for repeat in range(args.repeats + 1):  # the first round warms up
                batch = prompts(length)
                firsts, ends = [None] * len(batch), [0.0] * len(batch)
                retrievals = [0] * len(batch)
                done = threading.Semaphore(0)

                def emit_for(i):
                    def emit(event):
                        if event["type"] == "token" and firsts[i] is None:
                            firsts[i] = time.perf_counter()
                        elif event["type"] == "retrieval":
                            retrievals[i] += 1
                        elif event["type"] in ("finish", "error"):
                            ends[i] = time.perf_counter()
                            done.release()
                    return emit

                requests = [DecodeRequest(p, out_len, retrieve=fn, emit=emit_for(i)) for i, p in enumerate(batch)]
                sync()
                t0 = time.perf_counter()
                starts = [t0] * len(batch)
                engine.submit(*requests)  # the batch arrives at once, as HF's generate gets it
                for _ in batch:
                    done.acquire()
                wall = time.perf_counter() - t0
                if repeat == 0:
                    continue
                tok_s = len(batch) * out_len / wall
                rounds.setdefault(mode, []).append(tok_s)
                print(json.dumps({**common, "engine": "continuous", "mode": mode, "prompt_tokens": length,
                                  "tokens_per_s": round(tok_s, 1), **rates(tok_s), "seconds": round(wall, 3),
                                  "retrievals_per_request": statistics.mean(retrievals),
                                  "ttft_s": summary([f - s for f, s in zip(firsts, starts)]),
                                  "decode_tokens_per_s_per_request": summary(
                                      [(out_len - 1) / (e - f) for f, e in zip(firsts, ends)], 1)}), flush=True)
            for repeat in range(args.repeats + 1 if args.static else 0):  # model.generate: one static batch
                batch = prompts(length)
                sync()
                t0 = time.perf_counter()
                for _ in generate(model, batch, out_len, retrieve=(lambda row, q: fn(q)) if fn else None,
                                  compile=dev == "cuda"):
                    pass
                sync()
                wall = time.perf_counter() - t0
                if repeat:
                    tok_s = len(batch) * out_len / wall
                    print(json.dumps({**common, "engine": "static", "mode": mode, "prompt_tokens": length,
                                      "tokens_per_s": round(tok_s, 1), **rates(tok_s),
                                      "seconds": round(wall, 3)}), flush=True)
    finally:
        engine.stop()
    return {mode: round(statistics.median(r), 1) for mode, r in rounds.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="model preset (the HTTP path's built checkpoint too)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--direct", action="store_true", help="time the engine alone (default on CUDA)")
    ap.add_argument("--batch", type=int, default=32, help="direct path: requests decoded together")
    ap.add_argument("--prompt-tokens", type=int, default=None,
                    help="prompt tokens after the sink (direct path: 128; HTTP: prompts of the corpus's reference "
                         "text of about this length instead of its questions)")
    ap.add_argument("--http", action="store_true", help="the whole app over HTTP (default on CPU)")
    ap.add_argument("--no-hf", dest="hf", action="store_false",
                    help="direct path: skip the Hugging Face transformers baseline (run on CUDA by default)")
    ap.add_argument("--repeats", type=int, default=2, help="direct path: timed rounds after a warm-up round")
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="new tokens per request (direct and HTTP on CUDA: 128; HTTP on the CPU: 64)")
    ap.add_argument("--checkpoint", help="HTTP path: serve this checkpoint (default: random tiny weights)")
    ap.add_argument("--bank", help="HTTP path: its bank (required with --checkpoint)")
    ap.add_argument("--prompts", help="HTTP path: a qa.jsonl whose 'prompt' fields are the requests")
    ap.add_argument("--documents", type=int, default=1000, help="HTTP path: geonames references in the built bank")
    ap.add_argument("--requests", type=int, default=48, help="HTTP path: requests per mode and concurrency")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--no-static", dest="static", action="store_false",
                    help="direct path: skip model.generate's static batch (the same step; saves its compilation)")
    ap.add_argument("--max-batch", type=int, default=8, help="HTTP path: generator decode slots")
    ap.add_argument("--no-fuse", dest="fuse", action="store_false",
                    help="direct path: keep q/k/v and gate/up as separate projections (served: fused)")
    ap.add_argument("--retrieval-concurrency", type=int, default=0,
                    help="HTTP path: window retrievals in flight at once per generator (0: all slots, 1: serial)")
    ap.add_argument("--memory-tier", choices=("host", "gpu"), default="host",
                    help="direct path: where retrieved memories come from (pinned host RAM, or already on the GPU)")
    ap.add_argument("--stream-interval", type=float, default=DecodingSettings.stream_interval_s,
                    help="HTTP path: the generator's decoding.stream_interval_s (0: each step's tokens at once)")
    ap.add_argument("--ingress-replicas", type=int, default=1,
                    help="HTTP path: ingress replicas (parsing, tokenizing and streaming requests in parallel)")
    ap.add_argument("--capture-at-start", action="store_true",
                    help="direct path: compile and capture every decode graph before the first request")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--local-ray", action="store_true", help="HTTP path: a fresh local Ray even if RAY_ADDRESS")
    args = ap.parse_args()
    if args.checkpoint and not args.bank:
        ap.error("--checkpoint needs --bank")
    if args.direct or (args.device == "cuda" and not args.http):
        args.max_tokens = args.max_tokens or 128
        run_direct(args)
    else:
        args.max_tokens = args.max_tokens or (128 if args.device == "cuda" else 64)  # GPU: the paper's 128 / 128
        run_http(args)


if __name__ == "__main__":
    main()
