"""Training-step speed: warmup (no memory) vs continual (references retrieved per window and encoded live with
the weights being trained, paper §3.6), tokens/s and MFU, and the continual/warmup ratio. One JSON line each.

    python -m benchmarks.train --preset 2.4b --device cuda     # one GPU, bf16, random weights
    python -m benchmarks.train                                 # CPU, tiny

It times the very step the Ray Train loop runs (`pipelines.train_loop.forward_loss`, backward, AdamW) on one
device, without Ray or DeepSpeed, so the number is the model's; data-parallel scaling is Ray Train's.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from benchmarks.model import PEAK_FLOPS, commit, device_name, sync, timed
from model.config import ModelConfig
from model.transformer import Transformer
from pipelines.train_loop import IGNORE, TrainBatch, forward_loss


def train_flops(cfg: ModelConfig, tokens: int, ref_tokens: int, encode_grad: bool) -> float:
    """6·N·tokens for the context (+ attention), plus the live encoding of references through the memory layers."""
    d, kv = cfg.dim, cfg.n_kv_head * cfg.head_dim
    layer = 2 * d * d + 2 * d * kv + 3 * d * cfg.mlp_hidden
    ctx = 6 * tokens * (cfg.n_layer * layer + d * cfg.vocab_size)
    ctx += 12 * tokens * cfg.n_head * cfg.head_dim * (tokens / 2) * cfg.n_layer
    enc = (6 if encode_grad else 2) * ref_tokens * cfg.n_mem_layer * layer
    return ctx + enc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--refs-per-window", type=int, default=1, help="paper §3.6: 1 per window")
    ap.add_argument("--lookback", type=int, default=4, help="paper §3.6: each window also reads 4 earlier windows'")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    dev = args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    cfg = ModelConfig.from_name(args.preset)
    T = args.seq or cfg.max_seq_len
    with torch.device(dev):
        model = Transformer(cfg).to(dtype).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    B, W = args.batch, (T - 1 - cfg.sink_len) // cfg.window + 1
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(5, cfg.vocab_size, (B, T), generator=g).to(dev)
    targets = tokens[:, 1:].clone()
    targets[:, : cfg.sink_len] = IGNORE
    n_refs = B * W * args.refs_per_window
    ref_rows = np.arange(n_refs).reshape(B, W, args.refs_per_window)
    bank_tokens = torch.randint(5, cfg.vocab_size, (n_refs, cfg.reference_len), generator=g)

    def references(rows):
        rows = torch.as_tensor(np.asarray(rows))
        return bank_tokens[rows], torch.full((len(rows),), cfg.reference_len)

    common = {"preset": args.preset, "device": device_name(dev), "dtype": str(dtype).split(".")[-1],
              "commit": commit(), "batch": B, "seq": T}
    results = {}
    for stage in ("warmup", "continual"):
        batch = TrainBatch(tokens[:, :-1], targets, ref_rows if stage == "continual" else None)

        def step():
            loss, _ = forward_loss(model, batch, references if stage == "continual" else None, sink_ids=[2, 4],
                                   lookback=args.lookback)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        sec = timed(step, dev, args.repeats)
        ref_tokens = n_refs * cfg.reference_seq_len if stage == "continual" else 0
        flops = train_flops(cfg, B * (T - 1), ref_tokens, encode_grad=True)
        peak = PEAK_FLOPS[dev]
        results[stage] = B * (T - 1) / sec
        print(json.dumps({**common, "bench": "train_step", "stage": stage, "ms": round(sec * 1e3, 1),
                          "tokens_per_s": round(results[stage], 1), "reference_tokens": ref_tokens,
                          "tflops": round(flops / sec / 1e12, 1), "mfu": round(flops / sec / peak, 3) if peak else None,
                          "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 1) if dev == "cuda" else None}),
              flush=True)
    print(json.dumps({**common, "bench": "train_ratio", "continual_over_warmup": round(results["continual"] /
                                                                                        results["warmup"], 3)}))


if __name__ == "__main__":
    main()
