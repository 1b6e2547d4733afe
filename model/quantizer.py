"""Vector quantization of memory keys and values (paper §3.3, App. B).

The paper compresses every 80-dim key and value vector with the FAISS composite index
`OPQ20x80-Residual2x14-PQ8x10` (14 bytes per vector, 8.75% of bf16), trained on vectors from sampled references,
decoded before the GPU reads them. FAISS's standalone codec API (`sa_encode`/`sa_decode`) is the reference codec;
`TorchCodec` encodes and decodes the same codes with torch on any device (a GPU encoder ships 14 B per vector to
the host and a GPU replica 14 B to the GPU, instead of 160), for the factories it understands. The factory string
is configuration; `quantizer: auto` picks one per model shape (`default_factory`).
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

from model.config import ModelConfig

PAPER_FACTORY = "OPQ20_80,Residual2x14,PQ8x10"
# tl.dot precisions of the fused nearest-centroid kernel (model/nearest_centroid_kernel.py): tf32x3 matches fp32;
# one-pass tf32 is 2.4x faster and picks another of two near-tied centroids for ~1 % of vectors at the same error.
KERNEL_PRECISIONS = ("tf32x3", "ieee", "tf32")
DEFAULT_KERNEL = "tf32x3"
CPU_MODEL_PARAMS = 100_000_000  # below this many non-embedding parameters a model is a CPU model (the tiny preset)


def factory_for(head_dim: int) -> str:
    """The paper's codec scaled to `head_dim`: an OPQ rotation over head_dim/4 sub-spaces, a 2 x 14-bit coarse
    product quantizer (4 B), and 10-bit PQ codes of ~10-dim sub-vectors. head_dim 80 gives the paper's string."""
    divisors = [m for m in range(1, head_dim + 1) if head_dim % m == 0]
    m = min(divisors, key=lambda x: (abs(x - head_dim / 10), -x))
    opq = head_dim // 4 if head_dim % 4 == 0 else m
    return f"OPQ{opq}_{head_dim},Residual2x14,PQ{m}x10"


def default_factory(cfg: ModelConfig) -> str | None:
    """What `quantizer: auto` writes: bf16 (None) for CPU models, whose banks are small (tiny: 16 KiB a reference)
    and whose sample cannot feed 2 x 2^14 coarse centroids; the paper's codec scaled to head_dim otherwise."""
    if cfg.num_params(non_embedding=True) < CPU_MODEL_PARAMS:
        return None
    return factory_for(cfg.head_dim)


def resolve_factory(setting: str | None, cfg: ModelConfig) -> str | None:
    """A `quantizer` setting as a factory string or None (bf16): "auto" -> default_factory, null/"" -> None."""
    if setting == "auto":
        return default_factory(cfg)
    return setting or None


class MemoryQuantizer:
    def __init__(self, factory: str, dim: int, index=None):
        import faiss  # only banks that quantize need FAISS here

        self.factory = factory
        self.dim = dim
        self._codecs: dict[str, TorchCodec | None] = {}
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
        self._codecs.clear()  # codecs copy the codebooks

    def encode(self, memories: Tensor | np.ndarray) -> np.ndarray:
        """(..., head_dim) float -> (..., code_size) uint8 on the host."""
        return self.encode_tensor(torch.as_tensor(memories)).cpu().numpy()

    def encode_tensor(self, memories: Tensor, kernel: str = DEFAULT_KERNEL) -> Tensor:
        """(..., head_dim) float -> (..., code_size) uint8 on the memories' device: with torch there when the
        factory is one TorchCodec reads (on a GPU: millions of vectors a second, the paper's codec on FAISS a few
        thousand per host thread), else with FAISS on the host. `kernel`: the fused kernel's precision on CUDA
        (KERNEL_PRECISIONS)."""
        if not self.is_trained:
            raise RuntimeError("quantizer is not trained")
        if memories.shape[-1] != self.dim:
            raise ValueError(f"expected vectors of dim {self.dim}, got shape {tuple(memories.shape)}")
        codec = self.torch_codec(memories.device)
        if codec is not None:
            return codec.encode(memories, kernel=kernel)
        shape = memories.shape[:-1]
        codes = self.index.sa_encode(_as_vectors(memories, self.dim)).reshape(*shape, self.code_size)
        return torch.from_numpy(codes).to(memories.device)

    def decode(self, codes: np.ndarray | Tensor, device="cpu") -> Tensor:
        """(..., code_size) uint8 -> (..., head_dim) float32 on `device`: with torch there on CUDA when the
        factory is one TorchCodec reads, else with FAISS on the host (CPU: FAISS is as fast, BENCHMARKS.md)."""
        device = torch.device(device)
        codec = self.torch_codec(device) if device.type != "cpu" else None
        if codec is not None:
            return codec.decode(torch.as_tensor(codes).to(device, non_blocking=True))
        if isinstance(codes, Tensor):
            codes = codes.cpu().numpy()
        shape = codes.shape[:-1]
        flat = np.ascontiguousarray(codes.reshape(-1, self.code_size))
        return torch.from_numpy(self.index.sa_decode(flat).reshape(*shape, self.dim)).to(device)

    def torch_codec(self, device="cpu") -> "TorchCodec | None":
        """The torch codec of these (trained) codebooks on `device`, built once per device; None when the factory
        is not one it reads."""
        key = str(torch.device(device))
        if key not in self._codecs:
            try:
                self._codecs[key] = TorchCodec.from_faiss(self.index).to(device)
            except NotImplementedError:
                self._codecs[key] = None
        return self._codecs[key]

    def to_bytes(self) -> bytes:
        import faiss

        return faiss.serialize_index(self.index).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, factory: str, dim: int) -> "MemoryQuantizer":
        import faiss

        return cls(factory, dim, faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8)))


class TorchCodec:
    """FAISS standalone codes <-> vectors in torch, on any device, with codebooks copied out of the FAISS index once.
    Reads (OPQ/PCA/rotation,)* then PQ, IVF-PQ (Flat or multi-index coarse) or Index2Layer (the paper's
    `Residual2x14,PQ8x10`). Decoding: bit unpacking, codebook gathers, the inverse rotation; equal to `sa_decode`
    (tested). Encoding: the rotation, then each stage's nearest centroids per sub-space on the stage's residual
    (GEMMs then argmin; on CUDA one fused Triton kernel), bits packed as FAISS packs them; the codes `sa_encode`
    writes up to near-ties (tested). The paper's codec searches 2 x 16,384 coarse centroids per vector: FAISS does
    it on the host at a few thousand vectors a second per thread, a GPU at millions (BENCHMARKS.md), so a GPU
    encoder ships 14 B per vector to the host."""

    def __init__(self, dim: int, code_size: int, stages: list[tuple[Tensor, int, int, bool]],
                 transforms: list[tuple[Tensor, Tensor | None]]):
        self.dim, self.code_size = dim, code_size
        # (codebooks (M, K, dsub), first bit, bits per code, additive): a stage's sub-space reconstructions are
        # concatenated over M; additive stages are summed into the vector (a non-residual IVF's list is not)
        self.stages = stages
        self.transforms = transforms  # (A (d_out, d_in), b (d_out,) or None): y = x @ A.T + b, x = (y - b) @ A

    @classmethod
    def from_faiss(cls, index) -> "TorchCodec":
        import faiss

        index = faiss.downcast_index(index)
        dim, code_size = index.d, index.sa_code_size()
        transforms = []
        if isinstance(index, faiss.IndexPreTransform):
            for i in range(index.chain.size()):
                vt = faiss.downcast_VectorTransform(index.chain.at(i))
                if not isinstance(vt, faiss.LinearTransform) or not vt.is_orthonormal:
                    raise NotImplementedError(f"vector transform {type(vt).__name__}")
                a = torch.from_numpy(faiss.vector_to_array(vt.A).reshape(vt.d_out, vt.d_in).copy())
                b = torch.from_numpy(faiss.vector_to_array(vt.b).copy()) if vt.have_bias else None
                transforms.append((a, b))
            index = faiss.downcast_index(index.index)
        if isinstance(index, faiss.IndexPQ):
            stages = [_pq_stage(index.pq, 0)]
        elif isinstance(index, faiss.Index2Layer):
            stages = [_coarse_stage(index.q1.quantizer, index.code_size_1), _pq_stage(index.pq, 8 * index.code_size_1)]
        elif type(index) is faiss.IndexIVFPQ:
            coarse = index.coarse_code_size()
            books, first, nbits, _ = _coarse_stage(index.quantizer, coarse)
            stages = [(books, first, nbits, bool(index.by_residual)), _pq_stage(index.pq, 8 * coarse)]
        else:
            raise NotImplementedError(f"FAISS index {type(index).__name__}")
        return cls(dim, code_size, stages, transforms)

    def to(self, device) -> "TorchCodec":
        """This codec with its codebooks on `device`."""
        return TorchCodec(self.dim, self.code_size, [(c.to(device), o, n, a) for c, o, n, a in self.stages],
                          [(a.to(device), None if b is None else b.to(device)) for a, b in self.transforms])

    @property
    def device(self) -> torch.device:
        return self.stages[0][0].device

    def decode(self, codes: Tensor) -> Tensor:
        """(..., code_size) uint8 -> (..., dim) float32, on the codes' device."""
        shape = codes.shape[:-1]
        codes = codes.reshape(-1, self.code_size)
        x = None
        for books, first_bit, nbits, additive in self.stages:
            if not additive:
                continue
            m, k, _ = books.shape
            part = centroids(books, unpack_bits(codes, first_bit, nbits, m).clamp(max=k - 1))
            x = part if x is None else part + x  # FAISS adds the coarse centroid to the decoded residual
        for a, b in reversed(self.transforms):
            x = (x - b if b is not None else x) @ a
        return x.reshape(*shape, self.dim)

    @torch.no_grad()
    def encode(self, x: Tensor, chunk: int | None = None, kernel: str | None = DEFAULT_KERNEL) -> Tensor:
        """(..., dim) float -> (..., code_size) uint8 on the codebooks' device, `chunk` vectors at a time. By
        default 16,384 on the torch path (its distance tables: chunk x M x K floats) and 262,144 with the fused
        kernel, which keeps no tables (a few hundred bytes a vector): fewer launches of the small per-chunk kernels,
        and grids of thousands of programs rather than one GPU wave (BENCHMARKS.md). `kernel`: the
        fused nearest-centroid kernel's precision on CUDA, None for the torch path (`nearest_centroids`)."""
        shape = x.shape[:-1]
        x = x.reshape(-1, self.dim).to(self.device, torch.float32)
        if chunk is None:
            fused = kernel is not None and x.is_cuda and _fused_kernel() is not None
            chunk = 1 << 18 if fused else 1 << 14
        codes = torch.zeros(len(x), self.code_size, dtype=torch.uint8, device=self.device)
        for i in range(0, len(x), chunk):
            codes[i:i + chunk] = self._encode_chunk(x[i:i + chunk], kernel)
        return codes.reshape(*shape, self.code_size)

    def _encode_chunk(self, x: Tensor, kernel: str | None) -> Tensor:
        for a, b in self.transforms:
            x = x @ a.T if b is None else torch.addmm(b, x, a.T)
        packed = torch.zeros(len(x), self.code_size + 8, dtype=torch.int64, device=x.device)  # spare bytes: spans
        for books, first_bit, nbits, additive in self.stages:
            ids = nearest_centroids(x, books, kernel)  # (N, M)
            pack_bits(packed, ids, first_bit, nbits)
            if additive:
                x = x - centroids(books, ids)
        return packed[:, :self.code_size].to(torch.uint8)


def centroids(books: Tensor, ids: Tensor) -> Tensor:
    """books (M, K, dsub), ids (N, M) -> each row's chosen centroids, concatenated over the sub-spaces (N, M * dsub):
    a stage's reconstruction (decoding) and what encoding subtracts before the next stage."""
    m, _, dsub = books.shape
    return books[torch.arange(m, device=books.device), ids].reshape(-1, m * dsub)


def nearest_centroids(x: Tensor, books: Tensor, kernel: str | None = DEFAULT_KERNEL) -> Tensor:
    """x (N, M * dsub), books (M, K, dsub) -> the nearest centroid per sub-space (N, M) int64, by squared L2:
    argmin_k ||c_k||^2 - 2 x.c_k (FAISS's PQ assignment). On CUDA with Triton: one fused kernel that never
    writes the N x K distances (`model/nearest_centroid_kernel.py`; `kernel` is its tl.dot precision, None for
    the torch path); else one batched GEMM over the M sub-spaces, then argmin (on the CPU: FAISS's codes)."""
    if kernel is not None and kernel not in KERNEL_PRECISIONS:
        raise ValueError(f"kernel precision {kernel!r}: one of {KERNEL_PRECISIONS}, or None for the torch path")
    fused = _fused_kernel() if kernel is not None and x.is_cuda else None
    if fused is not None and fused.supports(x, books):
        return fused.nearest_centroids_fused(x, books, precision=kernel)
    m, _, dsub = books.shape
    sub = x.reshape(len(x), m, dsub).transpose(0, 1)  # (M, N, dsub)
    norms = (books * books).sum(-1)[:, None, :]  # (M, 1, K)
    return torch.baddbmm(norms, sub, books.transpose(1, 2), alpha=-2).argmin(-1).T


@functools.cache
def _fused_kernel():
    """The Triton kernel's module, or None where Triton is missing (CPU torch builds): imported on first CUDA use."""
    try:
        from model import nearest_centroid_kernel
    except ImportError:
        return None
    return nearest_centroid_kernel


def pack_bits(packed: Tensor, ids: Tensor, first_bit: int, nbits: int) -> None:
    """Write (N, count) fields of `nbits` bits, little-endian from bit `first_bit`, into `packed` (N, bytes) int64
    holding one byte per element (FAISS's BitstringWriter layout; `unpack_bits` reads it back)."""
    starts = first_bit + nbits * torch.arange(ids.shape[1], device=ids.device)
    span = (nbits + 7) // 8 + 1  # bytes a field can touch
    shifted = ids << (starts % 8)  # (N, count): the field at its bit offset within its first byte
    for j in range(span):
        packed.scatter_add_(1, (starts // 8 + j).expand_as(ids), (shifted >> (8 * j)) & 0xFF)  # disjoint bits


def unpack_bits(codes: Tensor, first_bit: int, nbits: int, count: int) -> Tensor:
    """`count` little-endian `nbits`-wide fields from bit `first_bit` of each row of (N, bytes) uint8, as int64
    (N, count): FAISS's BitstringReader layout for PQ codes and IVF list numbers."""
    starts = first_bit + nbits * torch.arange(count, device=codes.device)
    span = (nbits + 7) // 8 + 1  # bytes a field can touch
    byte_at = starts[:, None] // 8 + torch.arange(span, device=codes.device)  # (count, span)
    padded = torch.nn.functional.pad(codes, (0, span))
    window = padded[:, byte_at].long()  # (N, count, span)
    value = (window << (8 * torch.arange(span, device=codes.device))).sum(-1)
    return (value >> (starts % 8)) & ((1 << nbits) - 1)


def _pq_stage(pq, first_bit: int) -> tuple[Tensor, int, int, bool]:
    import faiss

    books = faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub)
    return torch.from_numpy(books.copy()), first_bit, pq.nbits, True


def _coarse_stage(quantizer, code_bytes: int) -> tuple[Tensor, int, int, bool]:
    """A coarse quantizer's centroids: a multi-index is a product quantizer over its list number's bits; a flat
    one is a single table indexed by the whole list number."""
    import faiss

    quantizer = faiss.downcast_index(quantizer)
    if isinstance(quantizer, faiss.MultiIndexQuantizer):
        return _pq_stage(quantizer.pq, 0)
    if isinstance(quantizer, faiss.IndexFlat):
        table = quantizer.reconstruct_n(0, quantizer.ntotal)
        return torch.from_numpy(table[None].copy()), 0, 8 * code_bytes, True
    raise NotImplementedError(f"coarse quantizer {type(quantizer).__name__}")


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
