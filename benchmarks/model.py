"""Model speed: prefill/forward tokens/s and MFU with and without explicit memory, and batch-1 decode tok/s vs the
weight-bandwidth ceiling. One JSON line per result.

    python -m benchmarks.model --preset 2.4b --device cuda      # GPU machine (random bf16 weights)
    python -m benchmarks.model --preset tiny                    # CPU
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import time

import torch

from model.config import ModelConfig
from model.generate import MemoryWindows, Prefill, Retrieved, generate
from model.transformer import MemoryBatch, Transformer

PEAK_FLOPS = {"cuda": 800e12, "cpu": None}  # measured bf16 dense matmul ceiling on the H100 (project brief)


def copy_bandwidth(device: str, gib: int = 4, repeats: int = 10) -> float | None:
    """Device memory bandwidth in bytes/s, measured now: a large device-to-device copy, bytes read plus written,
    median of `repeats` (the decode ceiling: a step reads every weight once)."""
    if device != "cuda":
        return None
    src = torch.randn(gib * 2**28, device=device)  # gib GiB of float32
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * gib * 2**30 / sorted(times)[len(times) // 2]


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def commit() -> str:
    """The commit measured: MEMORY3_COMMIT where the tree travels without its history, else git."""
    if os.environ.get("MEMORY3_COMMIT"):
        return os.environ["MEMORY3_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        out = ""
    return out or "unknown"


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t) / repeats


def profile_top_kernels(fn, device: str, top: int = 12) -> list[dict]:
    """The kernels (or CPU ops) that take the most time in one call of fn: where the missing MFU goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    key, kind = ("device_time_total", "CUDA") if device == "cuda" else ("self_cpu_time_total", "CPU")
    averages = [e for e in prof.key_averages() if e.device_type.name == kind]  # kernels, not the ops above them
    events = sorted(averages, key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in averages)
    return [{"name": e.key[:80], "ms": round(getattr(e, key) / 1e3, 2), "calls": e.count,
             "share": round(getattr(e, key) / max(total, 1), 3)} for e in events[:top]]


def forward_flops(cfg: ModelConfig, B: int, T: int, mem_tokens_per_query: int) -> float:
    matmul = 2 * B * T * (cfg.num_params(non_embedding=True) + cfg.dim * cfg.vocab_size)
    attn = 4 * B * cfg.n_head * cfg.head_dim * T * (T / 2) * cfg.n_layer
    attn += 4 * B * cfg.n_head * cfg.head_dim * T * mem_tokens_per_query * cfg.n_mem_layer
    return matmul + attn


def random_memories(cfg: ModelConfig, n: int, device: str, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    mem = torch.randn(n, cfg.n_mem_layer, 2, cfg.n_kv_head, cfg.mem_tokens, cfg.head_dim, device=device, dtype=dtype)
    return mem, torch.full((n,), cfg.mem_tokens, device=device)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--compile", action="store_true", help="also time the CUDA-graph decode step")
    ap.add_argument("--no-eager", dest="eager", action="store_false",
                    help="with --compile, time only the CUDA-graph step (eager decoding takes minutes on 2.4B)")
    ap.add_argument("--decode-only", action="store_true", help="skip the prefill/forward timings")
    ap.add_argument("--profile", action="store_true",
                    help="also print each decode variant's top kernels and kernel launches per token (with prefill)")
    ap.add_argument("--fuse", type=int, nargs="+", default=[1], choices=[0, 1],
                    help="decode with the q/k/v and gate/up projections fused (1, as served), separate (0), or both")
    ap.add_argument("--prefill-batch", type=int, nargs="*", default=[],
                    help="also time the serving prefill (what TTFT pays) of a 128-token prompt at these batch sizes")
    args = ap.parse_args()
    dev = args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    cfg = ModelConfig.from_name(args.preset)
    with torch.device(dev):
        model = Transformer(cfg).to(dtype).eval()
    common = {"preset": args.preset, "device": device_name(dev), "dtype": str(dtype).split(".")[-1], "commit": commit()}
    T = args.seq or cfg.max_seq_len
    B = args.batch
    W = cfg.n_windows(T)
    idx = torch.randint(5, cfg.vocab_size, (B, T), device=dev)
    pos = torch.arange(T, device=dev).expand(B, T)
    M = W * cfg.refs_per_window
    mem, n_valid = random_memories(cfg, B * M, dev, dtype)
    visible = torch.eye(W, dtype=torch.bool, device=dev).repeat_interleave(cfg.refs_per_window, 1).expand(B, -1, -1)
    batch = MemoryBatch.from_references(mem.view(B, M, *mem.shape[1:]), n_valid.view(B, M), visible, pos, cfg)
    peak = PEAK_FLOPS[dev]
    with torch.inference_mode():
        for label, memory in () if args.decode_only else (("none", None), ("memory", batch)):
            sec = timed(lambda: model(idx, memory=memory), dev, repeats=5 if dev == "cuda" else 2)
            per_query = 0 if memory is None else cfg.refs_per_window * cfg.mem_tokens
            flops = forward_flops(cfg, B, T, per_query)
            print(json.dumps({**common, "bench": "forward", "memory": label, "batch": B, "seq": T,
                              "refs_per_window": cfg.refs_per_window if memory is not None else 0,
                              "tokens_per_s": round(B * T / sec, 1), "ms": round(sec * 1e3, 2),
                              "tflops": round(flops / sec / 1e12, 1),
                              "mfu": round(flops / sec / peak, 3) if peak else None}), flush=True)

        one, one_valid = random_memories(cfg, cfg.refs_per_window, dev, dtype)
        prompt = [2, 4, 2] + torch.randint(5, cfg.vocab_size, (125,)).tolist()
        n_new = min(args.decode_tokens, cfg.max_seq_len - len(prompt))
        wbytes = weight_bytes(model)
        bandwidth = copy_bandwidth(dev)
        if bandwidth:
            print(json.dumps({**common, "bench": "copy_bandwidth", "gb_s": round(bandwidth / 1e9, 1),
                              "weight_gb": round(wbytes / 1e9, 3),
                              "ceiling_tokens_per_s_b1": round(bandwidth / wbytes, 1)}), flush=True)
        fused = (copy.deepcopy(model) if 0 in args.fuse else model).fuse_projections() if 1 in args.fuse else None
        models = {0: model, 1: fused}  # a copy only when both are timed (2.4B: 5.6 GB more)
        serving = models[args.fuse[-1]]
        for label, retrieve in (("none", None), ("memory", lambda row, q: Retrieved(one, one_valid))):
            for n in args.prefill_batch:
                for graphs in (False, True) if dev == "cuda" else (False,):
                    print(json.dumps({**common, "bench": "prefill", "memory": label, "batch": n, "graphs": graphs,
                                      "prompt_tokens": len(prompt), "fused_projections": bool(args.fuse[-1]),
                                      **prefill_timing(serving, [prompt] * n, retrieve, dev, args.profile, graphs)}),
                          flush=True)
        variants = [(label, retrieve, compiled, fuse) for fuse in args.fuse
                    for compiled in [False] * (args.eager or not args.compile) + [True] * args.compile
                    for label, retrieve in (("none", None), ("memory", lambda row, q: Retrieved(one, one_valid)))]
        for label, retrieve, compiled, fuse in variants:
            def run():
                for _ in generate(models[fuse], [prompt], n_new, retrieve=retrieve, compile=compiled):
                    pass
            sec = timed(run, dev, repeats=2)
            tok_s = n_new / sec
            ceiling = bandwidth / wbytes if bandwidth else None
            print(json.dumps({**common, "bench": "decode", "memory": label, "compiled": compiled,
                              "fused_projections": bool(fuse), "batch": 1,
                              "new_tokens": n_new,
                              "tokens_per_s": round(tok_s, 1), "achieved_gb_s": round(tok_s * wbytes / 1e9, 1),
                              "ceiling_tokens_per_s": round(ceiling, 1) if ceiling else None,
                              "of_ceiling": round(tok_s / ceiling, 3) if ceiling else None}), flush=True)
            if args.profile:  # where a step's time goes: the weights' GEMVs, or many small kernels beside them
                top = profile_top_kernels(run, dev, top=1000)
                print(json.dumps({**common, "bench": "decode_profile", "memory": label, "compiled": compiled,
                                  "fused_projections": bool(fuse), "new_tokens": n_new,
                                  "kernels_per_token": round(sum(k["calls"] for k in top) / n_new, 1),
                                  "kernel_ms_per_token": round(sum(k["ms"] for k in top) / n_new, 3),
                                  "step_ms": round(step_alone_ms(models[fuse], retrieve is not None,
                                                                 len(prompt) + n_new, dev), 3),
                                  "wall_ms_per_token": round(sec * 1e3 / n_new, 3),
                                  "top": top[:15]}), flush=True)
        if args.profile:
            for row in weight_reads(models[args.fuse[-1]], dev, dtype):
                print(json.dumps({**common, "bench": "gemv", **row}), flush=True)


def prefill_timing(model: Transformer, prompts: list[list[int]], retrieve, device: str, profile: bool,
                   graphs: bool = False) -> dict:
    """The engine's prefill (its prompt windows' retrievals and memory layout included) into fresh caches: what a
    batch of requests waits before its first token, apart from sampling. Eager, or with `graphs` as the engine
    runs it on CUDA (a graph per batch and length bucket; the first call captures it)."""
    windows = MemoryWindows(model, retrieve, len(prompts))
    model.setup_caches(len(prompts), len(prompts[0]) + 128, memory_slots=windows.reserved if retrieve else 0)
    caches = model.caches()
    try:
        prefill = Prefill(model, graphs=graphs, max_batch=len(prompts))
        run = lambda: prefill(prompts, caches, windows)  # noqa: E731
        row = {"ms": round(timed(run, device, repeats=5) * 1e3, 2), "retrievals": len(run()[2])}
        if profile:
            row["top"] = profile_top_kernels(run, device, top=12)
        return row
    finally:
        model.clear_caches()


def step_alone_ms(model: Transformer, memory: bool, key_len: int, device: str, steps: int = 50) -> float:
    """The decode step `generate` just ran (its CUDA graph where compiled), replayed back to back with nothing
    between: the device's time per token with the gaps between its kernels, and no host work. Against the kernel
    time it says what the gaps cost; against the wall time per token, what the host between two steps costs."""
    step = next(s for (_, _, slots), s in model.__dict__["_decode_steps"].items() if (slots > 0) == memory) \
        if "_decode_steps" in model.__dict__ else None
    if step is None:  # eager steps are not kept between calls: set one up as `generate` does
        from model.generate import _decode_step

        slots = model.cfg.refs_per_window * model.cfg.mem_tokens if memory else 0
        valid = torch.ones(1, slots, dtype=torch.bool, device=device)
        step = _decode_step(model, 1, key_len, slots, valid, graphs=False)
    step.pos.fill_(key_len - 1)
    try:
        return timed(lambda: [step(1, key_len, memory) for _ in range(steps)], device, repeats=2) / steps * 1e3
    finally:
        model.clear_caches()


def weight_reads(model: Transformer, device: str, dtype) -> list[dict]:
    """Each distinct weight shape of a decode step read alone at batch 1 (x @ W.T): how close one GEMV comes to the
    copy bandwidth, i.e. the best a step of these GEMVs could do before any kernel beside them. Copies of the
    weight are read in turn, 256 MB in all, so no read comes from the L2 cache (50 MB on an H200)."""
    shapes = sorted({tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)})
    rows = []
    for out_features, in_features in shapes:
        nbytes = out_features * in_features * torch.finfo(dtype).bits // 8
        weights = [torch.randn(out_features, in_features, device=device, dtype=dtype)
                   for _ in range(max(1, 2**28 // nbytes))]
        x = torch.randn(1, in_features, device=device, dtype=dtype)

        def read_all():
            for weight in weights:
                torch.nn.functional.linear(x, weight)

        sec = timed(read_all, device, repeats=10) / len(weights)
        rows.append({"shape": [out_features, in_features], "us": round(sec * 1e6, 2),
                     "gb_s": round(nbytes / sec / 1e9, 1)})
    return rows


if __name__ == "__main__":
    main()
