"""References -> bank records and retrieval embeddings: the encoding step shared by `memory3 encode`'s Ray actors
and live appends (bank/edits.py). The memory layers write each reference's sparse memory (paper §3.3), the
quantizer (if any) compresses it (App. B), the embedder indexes its text (§3.1).
"""
from __future__ import annotations

import numpy as np
import torch

from bank.chunking import Reference
from bank.embedder import Embedder
from bank.format import RecordLayout
from model.encoder import encode_references, pad_references
from model.quantizer import MemoryQuantizer
from model.tokenizer import Tokenizer
from model.transformer import Transformer


class ShardEncoder:
    """References → fixed-size records (sparse memory, bf16 or VQ codes) and retrieval embeddings."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, layout: RecordLayout,
                 quantizer: MemoryQuantizer | None, embedder: Embedder, batch_size: int = 32, compile: bool = False):
        self.model, self.tokenizer, self.layout = model, tokenizer, layout
        self.quantizer, self.embedder, self.batch_size = quantizer, embedder, batch_size
        # compiled: norms, rotary and the selection fused; every batch padded to batch_size (one graph)
        self.compile = compile
        self.encode_fn = torch.compile(encode_references, dynamic=False) if compile else encode_references

    @torch.no_grad()
    def device_memories(self, refs: list[Reference]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(memories (n, L_mem, 2, Hkv, k, D), n_valid (n,)) per fixed-size batch, left on the model's device, so
        the copy to the host can overlap the next encoding (pipelines/encode.py)."""
        if self.model.layers[0].self_attn.cache is not None:
            raise ValueError("the model has decoding caches set up; encode with a model outside generation")
        cfg, device = self.model.cfg, self.model.device
        out = []
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
            out.append((sparse.memories[:n], sparse.n_valid[:n]))
        return out

    def memories(self, refs: list[Reference]) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 CPU memories (N, L_mem, 2, Hkv, k, D) and n_valid (N,), in fixed-size batches (deterministic)."""
        return self.to_host(self.device_memories(refs))

    @staticmethod
    def to_host(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([m.float().cpu() for m, _ in batches]), torch.cat([v.cpu() for _, v in batches])

    def encode(self, refs: list[Reference]) -> tuple[np.ndarray, np.ndarray]:
        return self.records(refs, self.device_memories(refs))

    def records(self, refs: list[Reference], batches: list[tuple[torch.Tensor, torch.Tensor]],
                embeddings: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`device_memories` output -> records (N, record_bytes) and retrieval embeddings (N, dim); `embeddings`
        given (the same texts, embedded before) are used as they are."""
        memories, n_valid = self.to_host(batches)
        records = self.layout.pack(memories, n_valid, self.quantizer)
        return records, self.embedder.encode([r.text for r in refs]) if embeddings is None else embeddings
