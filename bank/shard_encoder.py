"""References -> bank records and retrieval embeddings: the encoding step shared by `memory3 encode`'s Ray actors
and live appends (bank/edits.py). The memory layers write each reference's sparse memory (paper §3.3), the
quantizer (if any) compresses it (App. B), the embedder indexes its text (§3.1).

On a GPU the host never waits on the encoder: with a quantizer each batch is quantized on a stream of its own while
the next batch encodes (the nearest-centroid search is a third of the device work, BENCHMARKS.md), each batch's
memories (or their codes: 14 B a vector instead of 160) are copied to one pinned host buffer on a side stream, and
the embedder runs on a stream of its own, so the caller that packs and writes a part
(pipelines/encode.py) blocks only on that part's copies, never on the next part's encoding.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from bank.chunking import Reference
from bank.embedder import Embedder
from bank.format import RecordLayout
from model.encoder import encode_references, pad_references
from model.quantizer import DEFAULT_KERNEL, MemoryQuantizer
from model.tokenizer import Tokenizer
from model.transformer import Transformer


@dataclass
class PendingMemories:
    """A part's memories (N, L_mem, 2, Hkv, k, D) in the encoder's dtype, or with `codes` the quantizer's codes
    (N, L_mem, 2, Hkv, k, code_size) uint8, and n_valid (N,), on the host or on their way there: `copied` fires when
    the side-stream copies are done; `started`/`encoded` time the device work."""

    memories: torch.Tensor
    n_valid: torch.Tensor
    codes: bool = False
    seconds: float = 0.0
    copied: torch.cuda.Event | None = None
    started: torch.cuda.Event | None = None
    encoded: torch.cuda.Event | None = None

    def host(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.copied is not None:
            self.copied.synchronize()
        return self.memories, self.n_valid

    def device_seconds(self) -> float:
        """Seconds the device spent encoding this part (known once `host()` returned)."""
        if self.started is None:
            return self.seconds
        self.encoded.synchronize()
        return self.started.elapsed_time(self.encoded) / 1e3


class ShardEncoder:
    """References → fixed-size records (sparse memory, bf16 or VQ codes) and retrieval embeddings."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, layout: RecordLayout,
                 quantizer: MemoryQuantizer | None, embedder: Embedder, batch_size: int = 32, compile: bool = False,
                 quantize_kernel: str = DEFAULT_KERNEL):
        self.model, self.tokenizer, self.layout = model, tokenizer, layout
        self.quantizer, self.embedder, self.batch_size = quantizer, embedder, batch_size
        self.quantize_kernel = quantize_kernel  # the fused nearest-centroid kernel's precision on a GPU
        # compiled: norms, rotary and the selection fused; every batch padded to batch_size (one graph)
        self.compile = compile
        self.encode_fn = torch.compile(encode_references, dynamic=False) if compile else encode_references
        cuda = model.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(model.device) if cuda else None
        self.quantize_stream = torch.cuda.Stream(model.device) if cuda and quantizer is not None else None
        on_gpu = cuda and embedder is not None and getattr(embedder.model, "device", torch.device("cpu")).type == "cuda"
        self.embed_stream = torch.cuda.Stream(embedder.model.device) if on_gpu else None
        if cuda:
            torch.cuda.synchronize(model.device)  # the weights are in place before other streams read them

    def warm_up(self) -> None:
        """Encode one batch of padding, so a compiled encoder compiles now rather than in the first part."""
        self.device_memories([Reference("warm-up", "warm-up", "", [self.tokenizer.pad_id])]).host()

    @torch.no_grad()
    def device_memories(self, refs: list[Reference], quantize: bool = True) -> PendingMemories:
        """Encode in fixed-size batches. On a GPU this only queues the work: the result is ready after `host()`;
        with a quantizer (and `quantize`) it holds the codes, quantized on the GPU."""
        if self.model.layers[0].self_attn.cache is not None:
            raise ValueError("the model has decoding caches set up; encode with a model outside generation")
        cfg, device, stream = self.model.cfg, self.model.device, self.copy_stream
        t0 = time.perf_counter()
        codes = quantize and self.quantizer is not None  # quantized where encoded: on a GPU, by the torch codec
        if stream is not None:
            dtype = next(self.model.parameters()).dtype
            shape = (*cfg.memory_shape[:-1], self.quantizer.code_size) if codes else cfg.memory_shape
            host = torch.empty((len(refs), *shape), dtype=torch.uint8 if codes else dtype, pin_memory=True)
            host_valid = torch.empty(len(refs), dtype=torch.long, pin_memory=True)
            started = torch.cuda.current_stream(device).record_event(torch.cuda.Event(enable_timing=True))
        parts = []
        for i in range(0, len(refs), self.batch_size):
            part = refs[i:i + self.batch_size]
            n = len(part)
            if self.compile:
                part = part + part[:1] * (self.batch_size - n)
            # always reference_len columns: a reference's stored memory must not depend on its batch-mates (a
            # near-tie in the selection can flip with the GEMM shape), and compiled mode keeps one graph
            tokens, lengths = pad_references([r.tokens for r in part], cfg.reference_len, self.tokenizer.pad_id,
                                             multiple=cfg.reference_len)
            sparse = self.encode_fn(self.model, tokens.to(device), lengths.to(device), self.tokenizer.sink_ids)
            memories, n_valid = sparse.memories[:n], sparse.n_valid[:n]
            produced = torch.cuda.current_stream(device) if stream is not None else None
            if codes and self.quantize_stream is not None:  # overlaps the next batch's encoding
                self.quantize_stream.wait_stream(produced)
                memories.record_stream(self.quantize_stream)
                with torch.cuda.stream(self.quantize_stream):
                    memories = self.quantizer.encode_tensor(memories, self.quantize_kernel)
                produced = self.quantize_stream  # n_valid was ready before it started
            elif codes:
                memories = self.quantizer.encode_tensor(memories, self.quantize_kernel)
            if stream is None:
                parts.append((memories, n_valid))
                continue
            stream.wait_stream(produced)
            with torch.cuda.stream(stream):  # overlaps the next batch's encoding
                host[i:i + n].copy_(memories, non_blocking=True)
                host_valid[i:i + n].copy_(n_valid, non_blocking=True)
            memories.record_stream(stream)  # the allocator must not reuse them before the copy is done
            n_valid.record_stream(stream)
        if stream is None:
            return PendingMemories(torch.cat([m for m, _ in parts]), torch.cat([v for _, v in parts]), codes,
                                   seconds=time.perf_counter() - t0)
        last = torch.cuda.current_stream(device)
        if codes and self.quantize_stream is not None:  # the part's device work ends with its last quantization
            self.quantize_stream.wait_stream(last)
            last = self.quantize_stream
        encoded = last.record_event(torch.cuda.Event(enable_timing=True))
        return PendingMemories(host, host_valid, codes, copied=stream.record_event(), started=started,
                               encoded=encoded)

    def memories(self, refs: list[Reference]) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 CPU memories (N, L_mem, 2, Hkv, k, D) and n_valid (N,), in fixed-size batches (deterministic)."""
        memories, n_valid = self.device_memories(refs, quantize=False).host()
        return memories.float(), n_valid

    def encode(self, refs: list[Reference]) -> tuple[np.ndarray, np.ndarray]:
        return self.records(refs, self.device_memories(refs))

    def embed(self, texts: list[str]) -> np.ndarray:
        """Retrieval embeddings; on a GPU on their own stream, so they never queue behind the encoder."""
        if self.embed_stream is None:
            return self.embedder.encode(texts)
        with torch.cuda.stream(self.embed_stream):
            return self.embedder.encode(texts)

    def records(self, refs: list[Reference], pending: PendingMemories,
                embeddings: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`device_memories` output -> records (N, record_bytes) and retrieval embeddings (N, dim); `embeddings`
        given (the same texts, embedded before) are used as they are."""
        if embeddings is None:
            embeddings = self.embed([r.text for r in refs])  # while the memories are still being copied
        memories, n_valid = pending.host()
        if pending.codes:
            return self.layout.pack_payload(memories.numpy().reshape(len(refs), -1), n_valid), embeddings
        return self.layout.pack(memories, n_valid, self.quantizer), embeddings
