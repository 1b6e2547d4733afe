"""Memory-layer attention in its training form (forward + backward), kernel by kernel. One JSON line each.

    python -m benchmarks.attention --preset 2.4b --batch 4        # GPU machine

A memory layer attends, in one softmax, to the sparse memories its window may read and to the causal context
(paper eq. 4). Plain layers run the fused causal kernel; this times the candidates for the memory layers against
that floor, on the continual stage's shapes (paper §3.6: 32 windows, 1 reference each + 4 back, k kept tokens),
and checks each against a float32 reference.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.model import commit, device_name, timed
from model.config import ModelConfig
from model.transformer import MemoryBatch, flex_attention, flex_block_mask
from pipelines.train_loop import memory_slots, n_windows


def shapes(cfg: ModelConfig, B: int, T: int, lookback: int, device: str):
    W = n_windows(T + 1, cfg)  # T queries: the inputs of a (T + 1)-token training sequence
    g = torch.Generator().manual_seed(0)
    ref_rows = np.arange(B * W).reshape(B, W, 1)
    _, slot_ref, visible = memory_slots(ref_rows, lookback)
    M = slot_ref.shape[1]
    n_valid = torch.full((B, M), cfg.mem_tokens, device=device)
    input_pos = torch.arange(T, device=device).expand(B, T)
    mems = torch.zeros(B, M, 1, 2, cfg.n_kv_head, cfg.mem_tokens, cfg.head_dim, device=device)
    mask = MemoryBatch.from_references(mems, n_valid, torch.from_numpy(visible).to(device), input_pos, cfg).mask
    S = mask.shape[-1]
    dt = torch.bfloat16

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device, dt).requires_grad_()

    q = rnd(B, cfg.n_head, T, cfg.head_dim)
    k, v = rnd(B, cfg.n_kv_head, S + T, cfg.head_dim), rnd(B, cfg.n_kv_head, S + T, cfg.head_dim)
    causal = torch.arange(T, device=device)[None, :] <= torch.arange(T, device=device)[:, None]
    full_mask = torch.cat([mask, causal.expand(B, T, T)], dim=-1)  # (B, T, S + T)
    return q, k, v, input_pos, mask, full_mask, S


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="2.4b")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lookback", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seq", type=int, default=None, help="query tokens (default max_seq_len; training feeds one less)")
    args = ap.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg = ModelConfig.from_name(args.preset)
    dev, T = args.device, args.seq or cfg.max_seq_len
    q, k, v, input_pos, mask, full_mask, S = shapes(cfg, args.batch, T, args.lookback, dev)
    common = {"preset": args.preset, "device": device_name(dev), "commit": commit(), "torch": torch.__version__,
              "batch": args.batch, "seq": T, "memory_tokens": S, "head_dim": cfg.head_dim}
    with torch.no_grad():
        rep = cfg.n_head // cfg.n_kv_head
        want = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(rep, 1),
                                              v.float().repeat_interleave(rep, 1), attn_mask=full_mask[:, None])
    grad = torch.randn_like(want).to(q.dtype)

    def sdpa(backends, gqa=True):
        def run():
            kk, vv = (k, v) if gqa else (k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1))
            with sdpa_kernel(backends):
                return F.scaled_dot_product_attention(q, kk, vv, attn_mask=full_mask[:, None], enable_gqa=gqa)
        return run

    block_mask = flex_block_mask(input_pos, mask)
    candidates = {"flash_causal_no_memory": lambda: F.scaled_dot_product_attention(
        q, k[:, :, S:], v[:, :, S:], is_causal=True, enable_gqa=True),
        "flex block mask (the model's)": lambda: flex_attention(q, k, v, block_mask)}
    candidates["sdpa_mask_efficient_repeat_kv"] = sdpa([SDPBackend.EFFICIENT_ATTENTION], gqa=False)
    candidates["sdpa_mask_cudnn"] = sdpa([SDPBackend.CUDNN_ATTENTION])
    candidates["sdpa_mask_any"] = sdpa([SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                        SDPBackend.MATH])
    for name, fn in candidates.items():
        row = {**common, "bench": "memory_attention", "kernel": name}
        try:
            def step():
                out = fn()
                out.backward(grad)
                return out
            out = step()
            if name != "flash_causal_no_memory":
                row["max_abs_err"] = float((out.detach().float() - want).abs().max())
            times = {}
            for phase, f in (("forward", fn), ("forward_backward", step)):
                times[phase] = timed(f, dev, args.repeats) * 1e3
            row.update({f"{p}_ms": round(t, 3) for p, t in times.items()})
        except Exception as e:  # a backend that refuses these shapes says so and the rest still run
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        q.grad = k.grad = v.grad = None
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
