"""Vector-quantized banks (paper App. B): bytes per reference, reconstruction error per memory layer on the memories
of a real encoded bank, and decode / encode throughput of the torch codec against FAISS's `sa_decode` /
`sa_encode`. One JSON line each.

    python -m benchmarks.quantize --bank runs/quickstart/bank_warmup                 # CPU, the tiny demo's bank
    python -m benchmarks.quantize --bank runs/quickstart/bank_warmup --device cuda   # GPU: torch codes there

The codebooks are trained as the encode job trains them (non-padding key/value vectors of the first references),
and the error is measured on references they never saw.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from bank.reader import MemoryBank
from benchmarks.model import commit, device_name, timed
from model.config import ModelConfig
from model.quantizer import MemoryQuantizer, factory_for, relative_error


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
    args = p.parse_args()
    import faiss

    faiss.omp_set_num_threads(args.faiss_threads)
    torch.set_num_threads(args.torch_threads)
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
