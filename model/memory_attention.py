"""Memory-layer attention over a whole sequence (training and prefill) without a masked attention kernel.

A memory layer's softmax runs over the union of two key sets (paper eq. 4): the sparse memories its window may
read (a few hundred keys, any mask) and the causal context (thousands of keys). A block-masked kernel over the
union runs at a third of the fused causal kernel's speed (benchmarks/attention.py), so the two parts run apart
and are joined exactly through their log-sum-exps:

    out = exp(lse_ctx - lse) * out_ctx + exp(S_mem - lse) @ V_mem,      lse = logaddexp(lse_ctx, lse_mem)

The context goes through the fused flash kernel, the memories through a small dense product in float32. Backward
gives the flash kernel's own backward the joined output and log-sum-exp: with them it returns exactly the context
keys' share of the union's gradient (P = exp(S - lse), D = rowsum(dO * O)), the dense part adds the memory keys'
share (the blockwise / ring attention identity). Grouped-query heads are never expanded.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def supported(dtype: torch.dtype, device: torch.device) -> bool:
    """The flash kernel's inputs: half precision on CUDA, any float on the CPU."""
    return dtype in (torch.float16, torch.bfloat16) if device.type == "cuda" else dtype.is_floating_point


def _flash_forward(q: Tensor, k: Tensor, v: Tensor, scale: float):
    if q.is_cuda:
        out, lse, cq, ck, mq, mk, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, True, False, scale=scale)
        return out, lse, (cq, ck, mq, mk, seed, offset)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
    return out, lse, None


def _flash_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, state, scale: float):
    if state is not None:
        cq, ck, mq, mk, seed, offset = state
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            do, q, k, v, out, lse, cq, ck, mq, mk, 0.0, True, seed, offset, scale=scale)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do, q, k, v, out, lse, 0.0, True, scale=scale)


def _memory_scores(qg: Tensor, mem_k: Tensor, bias: Tensor, scale: float) -> Tensor:
    """float32 (B, Hkv, G, T, S) scores of grouped queries against the memory keys, -inf where not visible."""
    return torch.einsum("bhgtd,bhsd->bhgts", qg.float(), mem_k.float()).mul_(scale).add_(bias)


class _MemoryAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mem_k, mem_v, mask):
        B, H, T, D = q.shape
        Hkv, G = k.shape[1], H // k.shape[1]
        scale = 1.0 / math.sqrt(D)
        out_ctx, lse_ctx, state = _flash_forward(q, k, v, scale)
        bias = torch.zeros(mask.shape, dtype=torch.float32, device=q.device).masked_fill_(~mask, float("-inf"))
        bias = bias[:, None, None]  # (B, 1, 1, T, S)
        scores = _memory_scores(q.view(B, Hkv, G, T, D), mem_k, bias, scale)
        lse = torch.logaddexp(lse_ctx.view(B, Hkv, G, T), scores.logsumexp(dim=-1))  # (B, Hkv, G, T)
        probs = scores.sub_(lse[..., None]).exp_()
        joined = torch.einsum("bhgts,bhsd->bhgtd", probs, mem_v.float()).reshape(B, H, T, D)
        joined += out_ctx.float() * (lse_ctx - lse.view(B, H, T)).exp()[..., None]
        out = joined.to(q.dtype)
        lse = lse.view(B, H, T).contiguous()
        ctx.save_for_backward(q, k, v, mem_k, mem_v, bias, out, lse)
        ctx.state, ctx.scale = state, scale
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, mem_k, mem_v, bias, out, lse = ctx.saved_tensors
        B, H, T, D = q.shape
        Hkv, G = k.shape[1], H // k.shape[1]
        do = do.contiguous()
        dq, dk, dv = _flash_backward(do, q, k, v, out, lse, ctx.state, ctx.scale)
        qg, dog = q.view(B, Hkv, G, T, D), do.view(B, Hkv, G, T, D).float()
        probs = _memory_scores(qg, mem_k, bias, ctx.scale).sub_(lse.view(B, Hkv, G, T, 1)).exp_()
        rowdot = (do.float() * out.float()).sum(-1).view(B, Hkv, G, T, 1)  # D = rowsum(dO * O)
        dmem_v = torch.einsum("bhgts,bhgtd->bhsd", probs, dog)
        dscores = probs.mul_(torch.einsum("bhgtd,bhsd->bhgts", dog, mem_v.float()).sub_(rowdot)).mul_(ctx.scale)
        dq = dq + torch.einsum("bhgts,bhsd->bhgtd", dscores, mem_k.float()).reshape(B, H, T, D).to(dq.dtype)
        dmem_k = torch.einsum("bhgts,bhgtd->bhsd", dscores, qg.float())
        return dq, dk, dv, dmem_k.to(mem_k.dtype), dmem_v.to(mem_v.dtype), None


def memory_attention(q: Tensor, k: Tensor, v: Tensor, mem_k: Tensor, mem_v: Tensor, mask: Tensor) -> Tensor:
    """q (B, H, T, D); k, v (B, Hkv, T, D) the causal context at positions 0..T-1; mem_k, mem_v (B, Hkv, S, D)
    memories (already rotated); mask (B, T, S) bool, which memory tokens each query may read. -> (B, H, T, D),
    equal to one softmax over [memories; causal context]."""
    return _MemoryAttention.apply(q, k, v, mem_k, mem_v, mask)
