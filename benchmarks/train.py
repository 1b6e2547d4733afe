"""Training-step speed: warmup (no memory) vs continual (references retrieved per window and encoded live with
the weights being trained, paper §3.6), tokens/s and MFU, and the continual/warmup ratio. One JSON line each.

    python -m benchmarks.train --preset 2.4b --device cuda --batch 1,4 --encode-grad 1,0   # one GPU, bf16
    python -m benchmarks.train                                                             # CPU, tiny
    python -m benchmarks.train --preset 2.4b --runs W/metrics.jsonl C/metrics.jsonl --gpus 2

The first two time the very step the Ray Train loop runs (`pipelines.train_loop.forward_loss`, backward, AdamW)
on one device, without Ray or DeepSpeed, so the number is the model's. `--runs` reads the per-step metrics of a
warmup and a continual `memory3 train` run (Ray Train + DeepSpeed, any number of GPUs) and prints the same
figures for them: the data-parallel number.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from benchmarks.model import PEAK_FLOPS, commit, device_name, profile_top_kernels, timed
from model.config import ModelConfig
from model.encoder import pad_references
from model.transformer import Transformer
from pipelines.train_loop import IGNORE, TrainBatch, forward_loss, n_windows


def train_flops(cfg: ModelConfig, tokens: int, ref_tokens: int, encode_grad: bool, seq_len: int) -> float:
    """6·N·tokens for the context (+ causal attention over seq_len-token sequences), plus the live encoding of
    references through the memory layers (forward only without encode_grad)."""
    d, kv = cfg.dim, cfg.n_kv_head * cfg.head_dim
    layer = 2 * d * d + 2 * d * kv + 3 * d * cfg.mlp_hidden
    ctx = 6 * tokens * (cfg.n_layer * layer + d * cfg.vocab_size)
    ctx += 12 * tokens * cfg.n_head * cfg.head_dim * (seq_len / 2) * cfg.n_layer
    enc = (6 if encode_grad else 2) * ref_tokens * cfg.n_mem_layer * layer
    return ctx + enc


def parse_list(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x != ""]


def bench_steps(args, cfg: ModelConfig, common: dict) -> None:
    dev = args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    with torch.device(dev):
        model = Transformer(cfg).to(dtype).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    T = args.seq or cfg.max_seq_len
    W = n_windows(T, cfg)
    g = torch.Generator().manual_seed(0)
    for B in parse_list(args.batch):
        tokens = torch.randint(5, cfg.vocab_size, (B, T), generator=g).to(dev)
        targets = tokens[:, 1:].clone()
        targets[:, : cfg.sink_len] = IGNORE
        n_refs = B * W * args.refs_per_window
        ref_rows = np.arange(n_refs).reshape(B, W, args.refs_per_window)
        ref_len = args.ref_len or cfg.reference_len
        bank_tokens = torch.randint(5, cfg.vocab_size, (n_refs, ref_len), generator=g)

        def references(rows):  # as the train loop's ReferenceTokens: padded to the longest, rounded up to 8
            return pad_references(bank_tokens[torch.as_tensor(np.asarray(rows))].tolist(), cfg.reference_len, 0)

        encoded_len = cfg.sink_len + references(ref_rows.ravel())[0].shape[1]  # tokens per encoded reference

        runs = [("warmup", None)] + [("continual", bool(e)) for e in parse_list(args.encode_grad)]
        rates = {}
        for stage, encode_grad in runs:
            continual = stage == "continual"
            batch = TrainBatch(tokens[:, :-1], targets, ref_rows if continual else None)

            def step():
                loss, _ = forward_loss(model, batch, references if continual else None, sink_ids=[2, 4],
                                       lookback=args.lookback, encode_grad=bool(encode_grad))
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sec = timed(step, dev, args.repeats)
            ref_tokens = n_refs * encoded_len if continual else 0
            flops = train_flops(cfg, B * (T - 1), ref_tokens, encode_grad=bool(encode_grad), seq_len=T)
            peak = PEAK_FLOPS[dev]
            rates[stage, encode_grad] = B * (T - 1) / sec
            row = {**common, "bench": "train_step", "batch": B, "seq": T, "stage": stage, "encode_grad": encode_grad,
                   "ms": round(sec * 1e3, 1), "tokens_per_s": round(rates[stage, encode_grad], 1),
                   "reference_tokens": ref_tokens, "tflops": round(flops / sec / 1e12, 1),
                   "mfu": round(flops / sec / peak, 3) if peak else None,
                   "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 1) if dev == "cuda" else None}
            print(json.dumps(row), flush=True)
            if args.profile:
                print(json.dumps({**common, "bench": "train_profile", "batch": B, "stage": stage,
                                  "encode_grad": encode_grad, "top": profile_top_kernels(step, dev, top=15)}),
                      flush=True)
        for (stage, encode_grad), rate in rates.items():
            if stage == "continual":
                print(json.dumps({**common, "bench": "train_ratio", "batch": B, "seq": T, "encode_grad": encode_grad,
                                  "continual_over_warmup": round(rate / rates["warmup", None], 3)}), flush=True)


def summarize_runs(args, cfg: ModelConfig, common: dict) -> None:
    """Per-stage figures of Ray Train runs from their metrics.jsonl (steps after the first `--skip` of each
    worker group: the first steps include kernel compilation and allocator warm-up)."""
    from bank import storage

    rates = {}
    for path in args.runs:
        rows = [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]
        rows = [r for r in rows if r["step"] > r.get("since_step", 0) + args.skip]
        if not rows:
            raise SystemExit(f"{path}: no steps after the first {args.skip}")
        stage = rows[0]["stage"]
        seconds = sum(r["seconds"] for r in rows)
        tokens = sum(r["tokens"] for r in rows)
        ref_tokens = sum(r.get("reference_tokens", 0) for r in rows)
        flops = train_flops(cfg, tokens, ref_tokens, encode_grad=bool(parse_list(args.encode_grad)[0]),
                            seq_len=cfg.max_seq_len)
        peak = PEAK_FLOPS["cuda"] * args.gpus
        rates[stage] = tokens / seconds
        print(json.dumps({**common, "bench": "train_run", "run": path, "stage": stage, "gpus": args.gpus,
                          "steps": len(rows), "s_per_step": round(seconds / len(rows), 3),
                          "tokens_per_s": round(rates[stage], 1), "reference_tokens_per_step": ref_tokens // len(rows),
                          "tflops_per_gpu": round(flops / seconds / args.gpus / 1e12, 1),
                          "mfu": round(flops / seconds / peak, 3)}), flush=True)
    if {"warmup", "continual"} <= rates.keys():
        print(json.dumps({**common, "bench": "train_run_ratio", "gpus": args.gpus,
                          "continual_over_warmup": round(rates["continual"] / rates["warmup"], 3)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", default="1", help="micro-batch sizes to time, comma-separated")
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--refs-per-window", type=int, default=1, help="paper §3.6: 1 per window")
    ap.add_argument("--ref-len", type=int, default=None, help="reference tokens (default reference_len: full)")
    ap.add_argument("--lookback", type=int, default=4, help="paper §3.6: each window also reads 4 earlier windows'")
    ap.add_argument("--encode-grad", default="1,0", help="continual variants: 1 = backpropagate through the "
                    "reference encoding (memory.encode_grad, the default), 0 = encode without gradients")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="also print the top kernels of one step")
    ap.add_argument("--runs", nargs="*", help="metrics.jsonl of memory3 train runs to summarize instead")
    ap.add_argument("--gpus", type=int, default=1, help="--runs: GPUs the runs trained on (MFU denominator)")
    ap.add_argument("--skip", type=int, default=2, help="--runs: first steps of each worker group left out")
    args = ap.parse_args()
    cfg = ModelConfig.from_name(args.preset)
    common = {"preset": args.preset, "commit": commit()}
    if args.runs:
        summarize_runs(args, cfg, {**common, "device": device_name("cuda") if torch.cuda.is_available() else "cpu"})
    else:
        dtype = "bfloat16" if args.device == "cuda" else "float32"
        bench_steps(args, cfg, {**common, "device": device_name(args.device), "dtype": dtype})


if __name__ == "__main__":
    main()
