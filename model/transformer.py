"""Llama-style decoder whose first layers read explicit memory (paper §3.1-3.2, eq. 4).

Notable:
- Memory layers (the first `n_mem_layer` blocks) attend, in a single softmax, to the causal context and to the
  sparse key/values of the references retrieved for the query token's window. Other layers see context only.
- One attention definition, two execution forms. Training/prefill: every window of a long sequence sees its own
  memories through a boolean mask (FlexAttention on CUDA, masked SDPA elsewhere). Decoding (`Transformer.decode`):
  a static KV cache (gpt-fast style, per-sequence `input_pos`) whose memory layers reserve slots in front of the
  context for the current window's memories, written once per window (`KVCache.write_memory`) instead of being
  concatenated every step; each step reads only `key_len` context positions (a length bucket), not max_seq_len.
- Sequence layout: `[<s> <ref>] [memories] [<s> context...]`. The sink `<s> <ref>` stands for the paper's
  "<s>Reference:" BOS. RoPE positions: sink at 0..sink_len-1, memories share the next reference_len positions
  (parallel position encoding), context after them (`ModelConfig.rope_position`). With
  `memory_positions="ranked"` a window's j-th retrieved memory is moved j * reference_len positions further back
  (`rank_memory_positions`), so the model can tell the best match from the distractors by where it sits.
- Weight names and rotary convention match Hugging Face Llama, so its checkpoints load by renaming only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from model.config import ModelConfig


@dataclass
class MemoryBatch:
    """Sparse memories attended by one forward pass.

    keys/values: (B, n_mem_layer, n_kv_head, S, head_dim), S = memory slots x kept tokens, already rotated.
    mask: (B, T, S) bool, True where query token t may attend memory token s.
    """

    keys: Tensor
    values: Tensor
    mask: Tensor

    @classmethod
    def from_references(cls, memories: Tensor, n_valid: Tensor, visible: Tensor, input_pos: Tensor,
                        cfg: ModelConfig) -> "MemoryBatch":
        """Lay out per-reference memories for a batch.

        memories: (B, M, n_mem_layer, 2, n_kv_head, k, head_dim), the encoder's output for M slots per sequence.
        n_valid: (B, M) valid kept tokens per slot (0 for an empty slot).
        visible: (B, W, M) bool, window w may read slot m.
        input_pos: (B, T) context index of each query token.
        """
        B, M, L, _, H, k, D = memories.shape
        memories = rank_memory_positions(memories, cfg)
        kv = memories.permute(3, 0, 2, 4, 1, 5, 6).reshape(2, B, L, H, M * k, D)  # (2, B, L, H, M*k, D)
        token_ok = torch.arange(k, device=n_valid.device) < n_valid[..., None]  # (B, M, k)
        window = cfg.window_of(input_pos).clamp(max=visible.shape[1] - 1)  # (B, T)
        slot_ok = torch.gather(visible, 1, window[..., None].expand(-1, -1, M))  # (B, T, M)
        slot_ok = slot_ok & (input_pos >= cfg.sink_len)[..., None]  # the sink precedes all memories
        mask = (slot_ok[..., None] & token_ok[:, None]).reshape(B, input_pos.shape[1], M * k)
        return cls(kv[0], kv[1], mask)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(cfg: ModelConfig, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin for RoPE positions (B, T) -> (B, 1, T, head_dim), Hugging Face's half-split convention."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=positions.device).float() / cfg.head_dim))
    freqs = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def rank_memory_positions(memories: Tensor, cfg: ModelConfig) -> Tensor:
    """Memories (B, M, n_mem_layer, 2, n_kv_head, k, head_dim) laid out for `cfg.memory_positions`. Slot m holds a
    window's rank m % refs_per_window memory (slots go window by window, best retrieved first). 'ranked' rotates
    its keys back by rank * reference_len positions: RoPE rotations compose, so that equals encoding the
    reference that much earlier, and the best match sits right before the context."""
    if cfg.memory_positions == "parallel":
        return memories
    M, dtype = memories.shape[1], memories.dtype
    shift = -(torch.arange(M, device=memories.device) % cfg.refs_per_window) * cfg.reference_len
    cos, sin = (t.reshape(1, M, 1, 1, 1, cfg.head_dim) for t in rope_tables(cfg, shift[None], torch.float32))
    keys = apply_rope(memories[:, :, :, 0].float(), cos, sin).to(dtype)
    return torch.stack([keys, memories[:, :, :, 1]], dim=3)


class KVCache(nn.Module):
    """Static per-layer context cache. Rows are sequences; each writes at its own positions.

    `reserved` slots in front of the context hold the memories a row reads while decoding (memory layers only):
    the k/v buffers are (B, Hkv, reserved + max_len, D), so one contiguous slice [0, reserved + key_len) is the
    step's whole key set, memories first as in the concatenated form."""

    SPARE = 1
    """One position past max_len, never read: no slice [lo, reserved + key_len) then spans the whole buffer, a
    special case that made a compiled decode step compile again at key_len == max_len."""

    def __init__(self, batch: int, n_kv_head: int, max_len: int, head_dim: int, dtype: torch.dtype, device=None,
                 reserved: int = 0):
        super().__init__()
        self.reserved = reserved
        shape = (batch, n_kv_head, reserved + max_len + self.SPARE, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[2] - self.reserved - self.SPARE

    def rows(self, start: int, n: int) -> "KVCache":
        """A cache over rows start..start+n of this one (views: its writes land here), so a forward can run over
        some sequences of a batch only (continuous batching)."""
        _, heads, _, dim = self.k.shape
        view = KVCache(n, heads, 0, dim, self.k.dtype, self.k.device, reserved=self.reserved)
        view.k, view.v = self.k[start:start + n], self.v[start:start + n]
        return view

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, key_len: int | None = None,
               with_memory: bool = False) -> tuple[Tensor, Tensor]:
        """Write k/v (B, Hkv, T, D) at each row's positions; return the keys/values attended: context positions
        [0, key_len) (default all), preceded by the reserved memory slots if `with_memory`."""
        rows = torch.arange(k.shape[0], device=k.device)[:, None].expand_as(input_pos)
        self.k[rows, :, self.reserved + input_pos] = k.transpose(1, 2)  # (B, T, H, D) into (B, H, R + max_len, D)
        self.v[rows, :, self.reserved + input_pos] = v.transpose(1, 2)
        lo, hi = 0 if with_memory else self.reserved, self.reserved + (self.max_len if key_len is None else key_len)
        n = k.shape[0]  # the first n rows: a compiled decode step over any batch bucket uses the one cache module
        return self.k[:n, :, lo:hi], self.v[:n, :, lo:hi]

    def write_memory(self, rows: Tensor, keys: Tensor, values: Tensor) -> None:
        """Memories of `rows` into the reserved slots: keys/values (len(rows), Hkv, reserved, D), already rotated."""
        self.k[rows, :, :self.reserved] = keys
        self.v[rows, :, :self.reserved] = values


FLEX_BLOCK = 128
"""FlexAttention's tile. A query length off this multiple runs the kernel 2.4x slower (2047 vs 2048 tokens on an
H200, benchmarks/attention.py --seq), and training feeds seq_len - 1 tokens, so sequences are padded to it."""


def flex_block_mask(input_pos: Tensor, mem_mask: Tensor | None):
    """The SDPA mask below as a FlexAttention block mask: memory tokens first, then causal context. Queries and
    context keys are padded to a multiple of FLEX_BLOCK; the padding sits after every real position and reads no
    memory, so no real token sees it (`flex_attention` pads q/k/v to match and drops the padded rows)."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = input_pos.shape
    S = 0 if mem_mask is None else mem_mask.shape[-1]
    pad = -T % FLEX_BLOCK
    if pad:
        tail = input_pos.max() + 1 + torch.arange(pad, device=input_pos.device)
        input_pos = torch.cat([input_pos, tail.expand(B, pad)], dim=1)
        mem_mask = None if mem_mask is None else F.pad(mem_mask, (0, 0, 0, pad))

    def mask_mod(b, h, q_idx, kv_idx):
        ctx = kv_idx - S
        causal = (ctx >= 0) & (input_pos[b, ctx.clamp(min=0)] <= input_pos[b, q_idx])
        if mem_mask is None:
            return causal
        return causal | ((kv_idx < S) & mem_mask[b, q_idx, kv_idx.clamp(max=S - 1)])

    return create_block_mask(mask_mod, B, None, T + pad, S + T + pad, device=input_pos.device)


_FLEX = None
CAUSAL = "causal"  # mask sentinel: positions are 0..T-1 in every row, no memory
RESERVED = "reserved"  # memory sentinel: read the memories held in the cache's reserved slots (decoding)


def flex_attention(q: Tensor, k: Tensor, v: Tensor, block_mask) -> Tensor:
    """q (B, H, T, D), k/v (B, Hkv, S + T, D) with a block mask from `flex_block_mask` (padded lengths)."""
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention as flex

        _FLEX = torch.compile(flex, dynamic=False)
    T = q.shape[2]
    pad = block_mask.seq_lengths[0] - T
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    return _FLEX(q, k, v, block_mask=block_mask, enable_gqa=True)[:, :, :T]


def fuse_linears(*linears: nn.Linear) -> nn.Linear:
    """One bias-free Linear whose output is the given ones' outputs side by side: one GEMM reads all their weights
    (decoding is bound by reading weights, and a few large GEMMs read them faster than many small ones)."""
    weight = torch.cat([linear.weight.detach() for linear in linears], dim=0)
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")  # no weight of its own to init
    fused.weight = nn.Parameter(weight, requires_grad=False)
    return fused


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        kv_dim = cfg.n_kv_head * cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, kv_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, kv_dim, bias=False)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.qkv_proj: nn.Linear | None = None  # `Transformer.fuse_projections`: q, k and v as one GEMM
        self.cache: KVCache | None = None

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.qkv_proj is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        kv_dim = self.cfg.n_kv_head * self.cfg.head_dim
        return self.qkv_proj(x).split([self.cfg.dim, kv_dim, kv_dim], dim=-1)

    def fuse(self) -> None:
        self.qkv_proj = fuse_linears(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor, mask, memory: tuple | str | None = None,
                capture: list | None = None, key_len: int | None = None) -> Tensor:
        """mask: bool (B, T, S + Tk) for SDPA, a FlexAttention BlockMask, or CAUSAL; memory: (keys, values), or
        RESERVED for the cache's memory slots; key_len: context positions of the cache attended (default all)."""
        B, T, _ = x.shape
        c = self.cfg
        q, k, v = self.project(x)
        q = q.view(B, T, c.n_head, c.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, c.n_kv_head, c.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, c.n_kv_head, c.head_dim).transpose(1, 2)
        if capture is not None:  # the memory encoder scores un-rotated q/k (§3.3) and stores rotated k and v
            capture.append((q, k, apply_rope(k, cos, sin), v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None:
            k, v = self.cache.update(input_pos, k, v, key_len, with_memory=memory is RESERVED)
        if isinstance(memory, tuple):
            k, v = torch.cat([memory[0], k], dim=2), torch.cat([memory[1], v], dim=2)
        if mask is CAUSAL:  # plain layer over a whole sequence: the fused causal kernel (FlashAttention on CUDA)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif isinstance(mask, Tensor) and T == 1:
            # one query: the query heads of a KV group become its query rows, so the fused masked kernel runs
            # without repeating k/v per query head (what enable_gqa with a mask falls back to)
            y = F.scaled_dot_product_attention(q.reshape(B, c.n_kv_head, c.group_size, c.head_dim), k, v,
                                               attn_mask=mask[:, None]).reshape(B, c.n_head, 1, c.head_dim)
        elif isinstance(mask, Tensor):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)
        else:
            y = flex_attention(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, c.dim))


class MLP(nn.Module):
    """Gated two-layer network without bias (paper App. A), SiLU gate."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.dim, bias=False)
        self.gate_up_proj: nn.Linear | None = None  # `Transformer.fuse_projections`: gate and up as one GEMM

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)

    def fuse(self) -> None:
        self.gate_up_proj = fuse_linears(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos, sin, input_pos, mask, memory=None, capture=None, key_len=None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos, mask, memory, capture, key_len)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.weights_captured = False
        """Set once a compiled or CUDA-graph step (model/generate.py) holds these weights: they may not change."""
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def setup_caches(self, batch: int, max_len: int, dtype: torch.dtype | None = None, memory_slots: int = 0) -> None:
        """Allocate static KV caches for decoding; `clear_caches` returns to the training form. Memory layers
        reserve `memory_slots` positions per row for the memories `decode` reads."""
        dtype = dtype or self.embed_tokens.weight.dtype
        for i, layer in enumerate(self.layers):
            reserved = memory_slots if i < self.cfg.n_mem_layer else 0
            layer.self_attn.cache = KVCache(batch, self.cfg.n_kv_head, max_len, self.cfg.head_dim, dtype, self.device,
                                            reserved)

    def caches(self) -> list[KVCache]:
        """The per-layer caches in use (after `setup_caches`)."""
        return [layer.self_attn.cache for layer in self.layers]

    def use_caches(self, caches: list[KVCache]) -> None:
        """Decode with these per-layer caches (e.g. row views of the caches of `setup_caches`)."""
        for layer, cache in zip(self.layers, caches, strict=True):
            layer.self_attn.cache = cache

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.self_attn.cache = None

    def fuse_projections(self) -> "Transformer":
        """For decoding: each layer's q/k/v projections become one GEMM, and its gate/up projections another (the
        same outputs, from 4 weight reads per layer instead of 7). In place and before any decode step is compiled
        or captured (those hold the weights they saw); the fused state dict is no longer a checkpoint's."""
        if self.weights_captured:
            raise RuntimeError("fuse_projections() must run before the model's decode steps are compiled or captured")
        for layer in self.layers:
            if layer.self_attn.qkv_proj is None:
                layer.self_attn.fuse()
                layer.mlp.fuse()
        return self

    def forward(self, idx: Tensor, input_pos: Tensor | None = None, memory: MemoryBatch | None = None,
                n_layers: int | None = None, capture: list | None = None, return_hidden: bool = False,
                rope_pos: Tensor | None = None) -> Tensor:
        """idx (B, T) token ids; input_pos (B, T) context index of each token (default 0..T-1); rope_pos
        overrides the rotary positions (default: the context layout, `ModelConfig.rope_position`).

        Returns logits (B, T, vocab). `n_layers` stops early (the memory encoder runs only the memory layers),
        `capture` collects per-layer q/k/v for it.
        """
        B, T = idx.shape
        plain_positions = input_pos is None
        if input_pos is None:
            input_pos = torch.arange(T, device=idx.device).expand(B, T)
        n_layers = n_layers or self.cfg.n_layer
        x = self.embed_tokens(idx)
        rope_pos = self.cfg.rope_position(input_pos) if rope_pos is None else rope_pos
        cos, sin = rope_tables(self.cfg, rope_pos, x.dtype)
        plain_mask, memory_mask = self.attention_masks(input_pos, memory, plain_positions)
        key_len = T if plain_positions else None  # a prefill from position 0 reads only its own T positions
        for i, layer in enumerate(self.layers[:n_layers]):
            reads_memory = memory is not None and i < self.cfg.n_mem_layer
            layer_memory = (memory.keys[:, i].to(x.dtype), memory.values[:, i].to(x.dtype)) if reads_memory else None
            x = layer(x, cos, sin, input_pos, memory_mask if reads_memory else plain_mask, layer_memory, capture,
                      key_len)
        if n_layers < self.cfg.n_layer or return_hidden:
            return x
        return self.lm_head(self.norm(x))

    def decode(self, idx: Tensor, input_pos: Tensor, key_len: int, memory_valid: Tensor | None = None) -> Tensor:
        """One token per row against the caches (gpt-fast's decode step; static shapes, no host sync, so it can
        be captured in a CUDA graph). idx, input_pos (B, 1); key_len: context positions read, a static bound above
        every row's input_pos; memory_valid (B, reserved) bool: which reserved memory slots of each row hold a
        memory token (None: no row reads memory). Returns logits (B, vocab)."""
        x = self.embed_tokens(idx)
        cos, sin = rope_tables(self.cfg, self.cfg.rope_position(input_pos), x.dtype)
        causal = torch.arange(key_len, device=idx.device) <= input_pos  # (B, key_len)
        plain_mask = causal[:, None]  # (B, 1, key_len)
        if memory_valid is not None:  # the sink precedes all memories
            memory_mask = torch.cat([memory_valid & (input_pos >= self.cfg.sink_len), causal], dim=-1)[:, None]
        for i, layer in enumerate(self.layers):
            reads_memory = memory_valid is not None and i < self.cfg.n_mem_layer
            x = layer(x, cos, sin, input_pos, memory_mask if reads_memory else plain_mask,
                      RESERVED if reads_memory else None, key_len=key_len)
        return self.lm_head(self.norm(x))[:, -1]

    def attention_masks(self, input_pos: Tensor, memory: MemoryBatch | None, plain_positions: bool = False):
        """Masks for plain and memory layers: one definition, as SDPA bool masks or FlexAttention block masks."""
        cache = self.layers[0].self_attn.cache
        if input_pos.is_cuda and cache is None and input_pos.shape[1] > 1 and self.cfg.head_dim >= 16:
            plain = CAUSAL if plain_positions else flex_block_mask(input_pos, None)
            return plain, memory and flex_block_mask(input_pos, memory.mask)
        if cache is not None and plain_positions:  # prefill into the cache: keys are this forward's own tokens
            causal = input_pos[:, None] <= input_pos[:, :, None]  # (B, T, T)
            return CAUSAL, memory and torch.cat([memory.mask, causal], dim=-1)
        key_pos = torch.arange(cache.max_len, device=input_pos.device)[None, None] if cache else input_pos[:, None]
        causal = key_pos <= input_pos[:, :, None]  # (B, T, Tk)
        return causal, memory and torch.cat([memory.mask, causal], dim=-1)


def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index)
