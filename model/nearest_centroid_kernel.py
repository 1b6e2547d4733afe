"""Nearest centroid per sub-space as one fused Triton kernel: the GPU encoder's hot spot (`TorchCodec.encode`).

The torch path writes an N x K distance matrix per sub-space and reads it back for argmin; for the paper's coarse
quantizer (2 sub-spaces of 40 dims, 16,384 centroids each) that is 128 KiB written and read back per vector, and
its fp32 GEMM runs without tensor cores. Here each program takes BLOCK_N query rows of one sub-space, walks the
centroids BLOCK_K at a time with `tl.dot` on tensor cores, adds the precomputed fp32 `||c||^2`, and keeps a running
(min, argmin) per row in registers: the distances never leave the chip.

Precision: `tl.dot(..., input_precision="tf32x3")` by default, i.e. each fp32 operand split into a TF32 high part
and a TF32 low part, three tensor-core products accumulated in fp32 (only lo x lo is dropped): ~2^-21 relative
error per product, the same order as fp32 FMA, at 3x the tensor-core work of plain TF32 (a reduction only dsub
deep, next to the per-distance argmin work on the CUDA cores: expected to cost little). Plain TF32 (2^-11) or
bf16 (2^-8) would pick another centroid whenever the best two of 16,384 differ by less than ~1e-3 of
||x|| ||c||, and every coarse flip changes the PQ codes after it: on an H100 one-pass tf32 gave other codes for
1.2 % of vectors at the same reconstruction error, 2.4x faster (the encode job's `quantizer_kernel=tf32`). "ieee"
(fp32 FMA, no tensor cores) is accepted for comparison (`benchmarks/quantize.py --encode-speed` reports each
precision's speed, error and fraction of codes equal to the torch path's). With tf32x3 the ids equal the torch
fp32 path's except where the two centroids' exact distances differ by less than 1e-5 (||x||^2 + ||c||^2), the
scale both fp32 computations round at (tested on the GPU).

`dsub` is padded (by masked loads, zeros in x and the books) to a multiple of 16 and split into at most two
power-of-two slices for `tl.dot`: 40 -> 32 + 16, 80 -> 64 + 16, 10 -> 16. Triton is imported by the caller only
on CUDA tensors; CPU machines and CI never import this module.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_DSUB = 128  # a query tile and pipelined centroid tiles fit in shared memory; wider sub-spaces take the torch path


def dsub_slices(dsub: int) -> tuple[int, int]:
    """dsub rounded up to a multiple of 16, as a power of two plus a power of two (or 0): tl.dot's shapes."""
    padded = -(-dsub // 16) * 16
    first = 1 << (padded.bit_length() - 1)
    rest = padded - first
    return first, (1 << (rest - 1).bit_length()) if rest else 0


def supports(x: Tensor, books: Tensor) -> bool:
    """Whether the kernel takes this call: fp32 on CUDA, sub-spaces up to MAX_DSUB dims."""
    return x.is_cuda and x.dtype == books.dtype == torch.float32 and books.shape[2] <= MAX_DSUB


@triton.autotune(
    configs=[triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
             # 256-centroid blocks crashed with an illegal memory access on an H200 (Triton 3.x, tf32x3, 40-dim
             # sub-spaces): not among the candidates
             for bn, bk, w, s in [(128, 128, 8, 3), (64, 128, 4, 3), (128, 64, 4, 4), (64, 64, 4, 4)]],
    key=["M", "K", "DSUB", "PRECISION"])
@triton.jit
def _nearest_kernel(x_ptr, books_ptr, norms_ptr, ids_ptr, N, stride_x, M, K,
                    DSUB: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
                    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    m = tl.program_id(1)  # sub-space
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    x_sub = x_ptr + rows[:, None].to(tl.int64) * stride_x + m * DSUB  # (BLOCK_N, 1): row starts in sub-space m
    book = books_ptr + m.to(tl.int64) * K * DSUB  # books (M, K, DSUB) contiguous
    d1 = tl.arange(0, D1)
    x1 = tl.load(x_sub + d1[None, :], mask=row_ok[:, None] & (d1[None, :] < DSUB), other=0.0)  # (BLOCK_N, D1)
    if D2 > 0:
        d2 = D1 + tl.arange(0, D2)
        x2 = tl.load(x_sub + d2[None, :], mask=row_ok[:, None] & (d2[None, :] < DSUB), other=0.0)  # (BLOCK_N, D2)
    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_id = tl.zeros([BLOCK_N], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        c1 = tl.load(book + cols[:, None] * DSUB + d1[None, :], mask=col_ok[:, None] & (d1[None, :] < DSUB),
                     other=0.0)  # (BLOCK_K, D1)
        dots = tl.dot(x1, tl.trans(c1), input_precision=PRECISION)  # (BLOCK_N, BLOCK_K) fp32
        if D2 > 0:
            c2 = tl.load(book + cols[:, None] * DSUB + d2[None, :], mask=col_ok[:, None] & (d2[None, :] < DSUB),
                         other=0.0)  # (BLOCK_K, D2)
            dots = tl.dot(x2, tl.trans(c2), dots, input_precision=PRECISION)
        norms = tl.load(norms_ptr + m * K + cols, mask=col_ok, other=float("inf"))  # padding columns never win
        dist = norms[None, :] - 2.0 * dots  # ||x - c||^2 - ||x||^2, as the torch path's baddbmm
        block_min, block_arg = tl.min(dist, axis=1, return_indices=True)  # first index on ties, as torch.argmin
        better = block_min < best  # strict: an earlier block keeps its tie
        best = tl.where(better, block_min, best)
        best_id = tl.where(better, block_arg + k0, best_id)
    tl.store(ids_ptr + rows.to(tl.int64) * M + m, best_id.to(tl.int64), mask=row_ok)


def nearest_centroids_fused(x: Tensor, books: Tensor, precision: str = "tf32x3") -> Tensor:
    """x (N, M * dsub) fp32 CUDA, books (M, K, dsub) fp32 -> (N, M) int64 nearest centroid ids by squared L2, as
    `model.quantizer.nearest_centroids`, which checks `precision` (KERNEL_PRECISIONS); ||c||^2 in fp32 (M, K)
    computed here, as the torch path does."""
    m, k, dsub = books.shape
    x, books = x.contiguous(), books.contiguous()
    norms = (books * books).sum(-1)
    ids = torch.empty(len(x), m, dtype=torch.int64, device=x.device)
    if len(x) == 0:
        return ids
    d1, d2 = dsub_slices(dsub)
    grid = lambda meta: (triton.cdiv(len(x), meta["BLOCK_N"]), m)  # noqa: E731
    _nearest_kernel[grid](x, books, norms, ids, len(x), x.stride(0), M=m, K=k, DSUB=dsub, D1=d1, D2=d2,
                          PRECISION=precision)
    return ids
