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
    def memories(self, refs: list[Reference]) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 CPU memories (N, L_mem, 2, Hkv, k, D) and n_valid (N,), in fixed-size batches (deterministic)."""
        if self.model.layers[0].self_attn.cache is not None:
            raise ValueError("the model has decoding caches set up; encode with a model outside generation")
        cfg, device = self.model.cfg, self.model.device
        out, valid = [], []
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
            out.append(sparse.memories[:n].float().cpu())
            valid.append(sparse.n_valid[:n].cpu())
        return torch.cat(out), torch.cat(valid)

    def encode(self, refs: list[Reference]) -> tuple[np.ndarray, np.ndarray]:
        memories, n_valid = self.memories(refs)
        records = self.layout.pack(memories, n_valid, self.quantizer)
        return records, self.embedder.encode([r.text for r in refs])
