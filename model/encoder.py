"""Memory encoder: a reference's sparse explicit memory (paper §3.1-3.3).

Each reference runs alone through the memory layers as `<s> <ref> tokens... <pad>...`. In every memory layer and
for every KV head we keep the `mem_tokens` tokens that receive the most attention,
    w_j = sum_i softmax_j(q_i . k_j / sqrt(d)),
computed without causal mask and without rotary positions, over real tokens only (the sink and padding take no
part), summed over the query heads of the KV head's group. We store the *rotated* keys and the values the layer
really attended with, so a memory keeps its positions inside the reference (RoPE before sparsification).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from model.config import ModelConfig
from model.transformer import Transformer


@dataclass
class SparseMemory:
    """memories: (N, n_mem_layer, 2, n_kv_head, k, head_dim); n_valid: (N,) real kept tokens per reference;
    positions: (N, n_mem_layer, n_kv_head, k) index into the reference's tokens of each kept token (-1 if empty)."""

    memories: Tensor
    n_valid: Tensor
    positions: Tensor


def selection_weights(q: Tensor, k: Tensor, valid: Tensor, cfg: ModelConfig) -> Tensor:
    """Attention each token receives, per KV head: q (N, H, T, D) and k (N, Hkv, T, D) un-rotated,
    valid (N, T) bool. Returns (N, Hkv, T) with -inf at invalid tokens.

    Only indices leave the selection, so it runs without autograd (in continual training it would otherwise keep
    an fp32 (N, Hkv, G, T, T) score tensor per memory layer alive until backward), and in place where it can.

    Precision: the q.k GEMM runs in the activations' own dtype when that is bf16 (the GPU encoder), so on tensor
    cores: its inputs lose nothing, it accumulates in fp32 (cuBLAS and CPU kernels alike), and only its output
    is rounded to bf16 (relative error <= 2^-9 per score). The scaling, softmax and the sum over queries that
    rank the tokens run in fp32, so two tokens swap only where their weights are within that rounding (a near
    tie, which any change of GEMM kernel can also flip; tests/model/test_encoder.py bounds how often). fp32
    activations (CPU) keep the all-fp32 path."""
    N, H, T, D = q.shape
    gemm_dtype = torch.bfloat16 if q.dtype == torch.bfloat16 else torch.float32
    with torch.no_grad():
        qg = q.detach().to(gemm_dtype).view(N, cfg.n_kv_head, cfg.group_size, T, D)
        scores = torch.einsum("nhgid,nhjd->nhgij", qg, k.detach().to(gemm_dtype))  # (N, Hkv, G, Ti, Tj)
        scores = scores.float().div_(math.sqrt(D))
        key_ok = valid[:, None, None, None, :]
        if cfg.selection == "softmax":
            probs = scores.masked_fill_(~key_ok, float("-inf")).softmax(dim=-1)
        else:  # the paper's un-normalised approximation
            probs = scores.exp_().masked_fill_(~key_ok, 0.0)
        probs.masked_fill_(~valid[:, None, None, :, None], 0.0)  # invalid queries give nothing
        w = probs.sum(dim=(2, 3))  # (N, Hkv, Tj)
    return w.masked_fill_(~valid[:, None, :], float("-inf"))


def pad_references(token_lists: list, reference_len: int, pad_id: int, multiple: int = 8) -> tuple[Tensor, Tensor]:
    """Right-padded token ids (N, R) and lengths (N,), the encoder's input. R is the longest reference rounded up
    to `multiple`, at most reference_len: the encoder's causal mask keeps trailing padding from ever reaching a
    real token, so a batch of short references costs what it holds (the last chunk of every document is short)."""
    lengths = [len(t) for t in token_lists]
    if max(lengths, default=0) > reference_len:
        raise ValueError(f"a reference has {max(lengths)} tokens > reference_len={reference_len}")
    R = min(reference_len, max(multiple, -(-max(lengths, default=1) // multiple) * multiple))
    tokens = torch.full((len(token_lists), R), pad_id, dtype=torch.long)
    for i, t in enumerate(token_lists):
        tokens[i, :len(t)] = torch.as_tensor(t, dtype=torch.long)
    return tokens, torch.tensor(lengths, dtype=torch.long)


def select_tokens(weights: Tensor, k: int) -> Tensor:
    """Indices of the k largest weights per row, ties to the earlier token, returned in sequence order with
    invalid (-inf) picks last. weights (..., T) -> (..., k)."""
    order = torch.sort(weights, dim=-1, descending=True, stable=True).indices[..., :k]
    picked_ok = torch.gather(weights, -1, order) > float("-inf")
    key = torch.where(picked_ok, order, order + weights.shape[-1])
    return torch.gather(order, -1, key.argsort(dim=-1))


def encode_references(model: Transformer, tokens: Tensor, lengths: Tensor, sink_ids: list[int]) -> SparseMemory:
    """tokens: (N, R) right-padded reference token ids, R <= reference_len (`pad_references`); lengths: (N,) real
    tokens in each.

    Gradients flow unless the caller disables them (continual training encodes with the live weights)."""
    cfg = model.cfg
    N, R = tokens.shape
    if R > cfg.reference_len:
        raise ValueError(f"references are at most reference_len={cfg.reference_len} tokens, got {R}")
    if R < cfg.mem_tokens:  # references all shorter than k: k candidates per head, the extra ones padding
        tokens, R = torch.nn.functional.pad(tokens, (0, cfg.mem_tokens - R)), cfg.mem_tokens
    sink = torch.tensor(sink_ids, dtype=tokens.dtype, device=tokens.device).expand(N, -1)
    idx = torch.cat([sink, tokens], dim=1)  # (N, sink_len + R)
    T = idx.shape[1]
    capture: list = []
    t = torch.arange(T, device=tokens.device)
    model(idx, n_layers=cfg.n_mem_layer, capture=capture, rope_pos=t.expand(N, T))  # sink 0.., reference after
    valid = (t >= cfg.sink_len) & (t < cfg.sink_len + lengths[:, None])  # (N, T)
    kept, positions = [], []
    for q, k_raw, k_rot, v in capture:
        picks = select_tokens(selection_weights(q, k_raw, valid, cfg), cfg.mem_tokens)  # (N, Hkv, k)
        gather = picks[..., None].expand(-1, -1, -1, cfg.head_dim)
        kept.append(torch.stack([torch.gather(k_rot, 2, gather), torch.gather(v, 2, gather)], dim=1))
        positions.append(picks - cfg.sink_len)
    memories = torch.stack(kept, dim=1)  # (N, L_mem, 2, Hkv, k, D)
    n_valid = lengths.clamp(max=cfg.mem_tokens)
    slot_ok = torch.arange(cfg.mem_tokens, device=tokens.device) < n_valid[:, None]  # (N, k)
    memories = memories * slot_ok[:, None, None, None, :, None]
    positions = torch.stack(positions, dim=1).masked_fill(~slot_ok[:, None, None, :], -1)
    return SparseMemory(memories, n_valid, positions)
