"""Vector quantization of memory keys and values (paper §3.3, App. B).

The paper compresses every 80-dim key and value vector with the FAISS composite index
`OPQ20x80-Residual2x14-PQ8x10` (14 bytes per vector, 8.75% of bf16), trained on vectors from sampled references,
decoded on the CPU before the GPU reads them. FAISS's standalone codec API (`sa_encode`/`sa_decode`) does exactly
that; the factory string is configuration.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class MemoryQuantizer:
    def __init__(self, factory: str, dim: int, index=None):
        import faiss  # only banks that quantize need FAISS here

        self.factory = factory
        self.dim = dim
        try:
            self.index = index if index is not None else faiss.index_factory(dim, factory)
        except RuntimeError as e:
            raise ValueError(f"FAISS cannot build quantizer {factory!r} for dim {dim}: {e}") from None

    @property
    def is_trained(self) -> bool:
        return self.index.is_trained

    @property
    def code_size(self) -> int:
        """Bytes per key or value vector."""
        return self.index.sa_code_size()

    def train(self, memories: Tensor | np.ndarray, max_vectors: int = 1_000_000, seed: int = 0) -> None:
        """Fit the codebooks on key/value vectors (any leading shape, last dim = head_dim)."""
        x = _as_vectors(memories, self.dim)
        if len(x) > max_vectors:
            x = x[np.random.default_rng(seed).choice(len(x), max_vectors, replace=False)]
        self.index.train(x)

    def encode(self, memories: Tensor | np.ndarray) -> np.ndarray:
        """(..., head_dim) float -> (..., code_size) uint8."""
        if not self.is_trained:
            raise RuntimeError("quantizer is not trained")
        shape = memories.shape[:-1]
        return self.index.sa_encode(_as_vectors(memories, self.dim)).reshape(*shape, self.code_size)

    def decode(self, codes: np.ndarray) -> Tensor:
        """(..., code_size) uint8 -> (..., head_dim) float32."""
        shape = codes.shape[:-1]
        flat = np.ascontiguousarray(codes.reshape(-1, self.code_size))
        return torch.from_numpy(self.index.sa_decode(flat).reshape(*shape, self.dim))

    def to_bytes(self) -> bytes:
        import faiss

        return faiss.serialize_index(self.index).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, factory: str, dim: int) -> "MemoryQuantizer":
        import faiss

        return cls(factory, dim, faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8)))


def relative_error(original: Tensor, restored: Tensor) -> float:
    """||x - x'|| / ||x|| over all vectors: the reconstruction error the tests bound."""
    original, restored = original.float(), restored.float()
    return float((original - restored).norm() / original.norm().clamp(min=1e-12))


def _as_vectors(x: Tensor | np.ndarray, dim: int) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().float().cpu().numpy()
    if x.shape[-1] != dim:
        raise ValueError(f"expected vectors of dim {dim}, got shape {tuple(x.shape)}")
    return np.ascontiguousarray(x.reshape(-1, dim), dtype=np.float32)
