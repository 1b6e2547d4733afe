"""Vector-quantized banks (paper App. B): bytes per reference, reconstruction error per memory layer on the memories
of a real encoded bank, and decode / encode throughput of the torch codec against FAISS's `sa_decode` /
`sa_encode`. One JSON line each.

    python -m benchmarks.quantize --bank runs/quickstart/bank_warmup                 # CPU, the tiny demo's bank
    python -m benchmarks.quantize --bank runs/quickstart/bank_warmup --device cuda   # GPU: torch codes there
    python -m benchmarks.quantize --encode-speed --preset 2.4b --device cuda          # the fused kernel vs torch

The codebooks are trained as the encode job trains them (non-padding key/value vectors of the first references),
and the error is measured on references they never saw.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import time

import numpy as np
import torch

from bank.reader import MemoryBank
from benchmarks.model import commit, device_name, timed
from model.config import ModelConfig
from model.quantizer import KERNEL_PRECISIONS, MemoryQuantizer, TorchCodec, factory_for, relative_error


def emit(**row) -> None:
    print(json.dumps({"bench": "quantize", **row, "commit": commit()}), flush=True)


def bytes_per_reference() -> None:
    """bf16 vs the `auto` codec for each preset's shape (record = 8-byte header + payload, as on disk)."""
    for preset in ("tiny", "2.4b"):
        cfg = ModelConfig.from_name(preset)
        factory = factory_for(cfg.head_dim)
        code = MemoryQuantizer(factory, cfg.head_dim).code_size
        sizes = cfg.memory_bytes(code_bytes_per_vector=code)
        emit(result="bytes_per_reference", preset=preset, factory=factory, bytes_per_vector=code,
             bf16=sizes["sparse"], quantized=sizes["quantized"], ratio=round(sizes["quantized"] / sizes["sparse"], 4))


def split_rows(bank: MemoryBank, train: int, test: int) -> tuple[np.ndarray, np.ndarray]:
    rows = bank.live_rows()
    if len(rows) < train + test:
        raise SystemExit(f"bank {bank.uri} has {len(rows)} references; --train {train} + --test {test} needs more")
    return rows[:train], rows[train:train + test]


def reconstruction(bank: MemoryBank, factory: str, train_rows, test_rows, device: str) -> MemoryQuantizer:
    """Codebooks trained on train_rows' vectors, then relative_error per memory layer and key/value on test_rows'
    valid slots (padding slots are zeros the decoder zeroes again: not part of the error)."""
    cfg = bank.config
    memories, _ = bank.memories(train_rows)
    vectors = memories.float().reshape(-1, cfg.head_dim)
    q = MemoryQuantizer(factory, cfg.head_dim)
    t = time.perf_counter()
    q.train(vectors[vectors.abs().sum(-1) > 0])
    train_s = time.perf_counter() - t
    test, n_valid = bank.memories(test_rows)
    test = test.float()
    restored = q.decode(q.encode(test), device).cpu()
    valid = (torch.arange(cfg.mem_tokens) < n_valid[:, None])[:, None, None, None, :, None].expand_as(test)
    for layer in range(cfg.n_mem_layer):
        for kv, name in enumerate(("key", "value")):
            sel = valid[:, layer, kv]
            emit(result="relative_error", bank=bank.uri, factory=factory, layer=layer, part=name,
                 bytes_per_vector=q.code_size, relative_error=round(relative_error(
                     test[:, layer, kv][sel], restored[:, layer, kv][sel]), 4),
                 train_vectors=int((vectors.abs().sum(-1) > 0).sum()), test_references=len(test_rows),
                 train_seconds=round(train_s, 2))
    return q


def throughput(q: MemoryQuantizer, bank: MemoryBank, rows, device: str, repeats: int) -> None:
    """Vectors decoded and encoded per second: FAISS `sa_decode`/`sa_encode` on the host vs the torch codec on
    `device`. Decoding copies the codes from host memory each call and leaves the vectors on the device (what a
    fetch does); encoding starts from bf16 memories on the device and leaves the codes there (what a GPU encoder
    does before copying them to the host)."""
    memories, _ = bank.memories(rows)
    vectors = np.ascontiguousarray(memories.float().reshape(-1, q.dim).numpy())
    codes = q.index.sa_encode(vectors)
    host = torch.from_numpy(codes)
    if device == "cuda":
        host = host.pin_memory()
    on_device = memories.to(device, torch.bfloat16)
    codec = q.torch_codec(device)
    paths = {("decode", "faiss"): lambda: q.index.sa_decode(codes),
             ("encode", "faiss"): lambda: q.index.sa_encode(vectors)}
    if codec is not None:
        paths["decode", "torch"] = lambda: codec.decode(host.to(device, non_blocking=True))
        paths["encode", "torch"] = lambda: codec.encode(on_device)
    for (op, path), fn in paths.items():
        seconds = timed(fn, device if path == "torch" else "cpu", repeats)
        emit(result=f"{op}_throughput", factory=q.factory, path=path,
             device=device_name(device if path == "torch" else "cpu"), references=len(rows), vectors=len(vectors),
             vectors_per_second=round(len(vectors) / seconds), ms_per_call=round(seconds * 1e3, 3))


def random_codec(factory: str, dim: int, device: str, seed: int = 0) -> TorchCodec:
    """A torch codec of the shape of `factory` (OPQ, 2-level residual coarse quantizer, PQ: what `factory_for`
    writes) with a random rotation and random codebooks: encoding speed does not depend on trained values, and
    FAISS takes minutes to train 2 x 16,384 coarse centroids."""
    match = re.fullmatch(r"OPQ\d+_(\d+),Residual(\d+)x(\d+),PQ(\d+)x(\d+)", factory)
    if match is None or int(match[1]) != dim:
        raise SystemExit(f"--encode-speed reads factories like {factory_for(dim)!r}, not {factory!r}")
    coarse_m, coarse_bits, pq_m, pq_bits = map(int, match.groups()[1:])
    g = torch.Generator().manual_seed(seed)
    rotation = torch.linalg.qr(torch.randn(dim, dim, generator=g))[0]
    coarse = torch.randn(coarse_m, 1 << coarse_bits, dim // coarse_m, generator=g)
    fine = 0.3 * torch.randn(pq_m, 1 << pq_bits, dim // pq_m, generator=g)  # residuals are smaller
    coarse_bytes = math.ceil(coarse_m * coarse_bits / 8)  # Index2Layer: the coarse code, then the PQ code
    code_size = coarse_bytes + math.ceil(pq_m * pq_bits / 8)
    assert code_size == MemoryQuantizer(factory, dim).code_size
    return TorchCodec(dim, code_size, [(coarse, 0, coarse_bits, True), (fine, 8 * coarse_bytes, pq_bits, True)],
                      [(rotation, None)]).to(device)


def encode_speed(preset: str, factory: str | None, references: int, device: str, repeats: int,
                 chunk: int | None = None) -> None:
    """Vectors/s of `TorchCodec.encode` (bf16 memories on the device -> codes there) for a preset's codec with
    random codebooks: the torch path (a distance matrix per stage, then argmin) and, on CUDA with Triton, the fused
    nearest-centroid kernel at each tl.dot precision, with the fraction of vectors whose codes equal the torch
    path's and the reconstruction error (relative, and over the torch path's: what a faster, less exact precision
    costs). distance_tflops: the distance GEMMs' useful work (2 N K dsub per sub-space) per second. `chunk`:
    vectors per pass of `TorchCodec.encode` (None: its default for the path)."""
    from model.quantizer import _fused_kernel

    cfg = ModelConfig.from_name(preset)
    factory = factory or factory_for(cfg.head_dim)
    codec = random_codec(factory, cfg.head_dim, device)
    n = references * math.prod(cfg.memory_shape) // cfg.head_dim
    x = torch.randn(n, cfg.head_dim, generator=torch.Generator().manual_seed(1)).to(device, torch.bfloat16)
    flops = 2 * n * sum(books.numel() for books, *_ in codec.stages)
    kernels = [None] + (list(KERNEL_PRECISIONS) if device == "cuda" and _fused_kernel() is not None else [])
    reference = codec.encode(x, kernel=None)
    reference_error = relative_error(x, codec.decode(reference))
    for kernel in kernels:
        seconds = timed(lambda: codec.encode(x, chunk=chunk, kernel=kernel), device, repeats)
        codes = codec.encode(x, chunk=chunk, kernel=kernel)
        same = (codes == reference).all(-1).float().mean().item()
        error = relative_error(x, codec.decode(codes))
        emit(result="encode_speed", preset=preset, factory=factory, path=f"kernel_{kernel}" if kernel else "torch",
             device=device_name(device), chunk=chunk or "default", vectors=n, vectors_per_second=round(n / seconds),
             references_per_second=round(references / seconds, 1), ms_per_call=round(seconds * 1e3, 3),
             distance_tflops=round(flops / seconds / 1e12, 3), codes_equal_torch=round(same, 6),
             relative_error=round(error, 6), error_over_torch=round(error / reference_error, 6))
    if len(kernels) > 1:  # each stage's kernel alone: which stage the encoder's time goes to
        fused = _fused_kernel()
        for books, *_ in codec.stages:
            m, k, dsub = books.shape
            xs = torch.randn(n, m * dsub, device=device, generator=torch.Generator(device).manual_seed(2))
            seconds = timed(lambda: fused.nearest_centroids_fused(xs, books), device, repeats)
            emit(result="nearest_centroids", preset=preset, stage=[m, k, dsub], device=device_name(device), vectors=n,
                 vectors_per_second=round(n / seconds), ms_per_call=round(seconds * 1e3, 3),
                 distance_tflops=round(2 * n * m * k * dsub / seconds / 1e12, 3))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bank", default="runs/quickstart/bank_warmup", help="a bf16 bank written by `memory3 encode`")
    p.add_argument("--factories", nargs="*", default=None,
                   help="FAISS factories to measure (default: the auto codec for the bank's head_dim, and OPQ+PQ8)")
    p.add_argument("--train", type=int, default=1024, help="references whose vectors train the codebooks")
    p.add_argument("--test", type=int, default=512, help="held-out references the error is measured on")
    p.add_argument("--device", default="cpu", help="where the torch codec runs: cpu or cuda")
    p.add_argument("--batches", nargs="*", type=int, default=[5, 320], help="references per decode / encode call")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--faiss-threads", type=int, default=1,
                   help="OpenMP threads of FAISS (training, sa_decode, sa_encode)")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--encode-speed", action="store_true",
                   help="only TorchCodec.encode's speed for --preset's codec with random codebooks (no bank)")
    p.add_argument("--preset", default="2.4b", help="--encode-speed: the model whose memories are encoded")
    p.add_argument("--references", type=int, default=64, help="--encode-speed: references' memories per call")
    p.add_argument("--chunk", type=int, default=None,
                   help="--encode-speed: vectors per pass of TorchCodec.encode (default: its own per path)")
    args = p.parse_args()
    import faiss

    faiss.omp_set_num_threads(args.faiss_threads)
    torch.set_num_threads(args.torch_threads)
    if args.encode_speed:
        return encode_speed(args.preset, (args.factories or [None])[0], args.references, args.device, args.repeats,
                            args.chunk)
    bytes_per_reference()
    bank = MemoryBank.open(args.bank)
    d = bank.config.head_dim
    factories = args.factories or [factory_for(d), f"OPQ{d // 4}_{d},PQ{d // 4}x8"]
    train_rows, test_rows = split_rows(bank, args.train, args.test)
    for factory in factories:
        q = reconstruction(bank, factory, train_rows, test_rows, args.device)
        for batch in args.batches:
            throughput(q, bank, test_rows[:batch], args.device, args.repeats)


if __name__ == "__main__":
    main()
