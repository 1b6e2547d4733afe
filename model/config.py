"""Model shape and explicit-memory settings, with named presets.

One dataclass holds both the decoder shape and the memory layout, because the memory layout is part of the
model: memories written by one shape/layout are unreadable by another (paper Remark 9). Presets live in
configs/model/*.yaml; `ModelConfig.from_name` reads them. Every number taken from the paper is recorded with its
section in docs/paper-notes.md.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "model"


@dataclass
class ModelConfig:
    # --- decoder shape (paper §3.4, App. A) ---
    vocab_size: int = 60416
    """Embedding rows; the paper pads its 60299-token vocabulary to 60416."""
    n_layer: int = 44
    n_head: int = 40
    n_kv_head: int = 8
    """Grouped-query attention: each KV head is shared by n_head // n_kv_head query heads."""
    head_dim: int = 80
    mlp_hidden: int = 3200
    """Width of the SwiGLU MLP (paper: W = d = 3200; activation not named, SiLU chosen)."""
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    """The paper does not say; untied like LLaMA."""
    max_seq_len: int = 2048
    """Longest context sequence (including the sink tokens)."""
    init_std: float = 0.02

    # --- explicit memory (paper §3.1-3.3) ---
    n_mem_layer: int = 22
    """The first n_mem_layer blocks write and read explicit memory (paper: the first half)."""
    reference_len: int = 128
    """A reference chunk holds at most this many tokens (paper: 128)."""
    mem_tokens: int = 8
    """Tokens kept per KV head per memory layer when a reference is sparsified (paper: top-8 of 128)."""
    window: int = 64
    """Context tokens per retrieval window (paper: 64)."""
    refs_per_window: int = 5
    """Memory slots of one window: the memories a window attends when decoding (paper: 5). Training's
    `memory.refs_per_window` x (1 + lookback) must fit in them (checked by `memory3 train`)."""
    sink_len: int = 2
    """The constant '<s> <ref>' prefix that stands for the paper's '<s>Reference:' BOS (§3.2)."""
    selection: str = "softmax"
    """Token-selection weights: 'softmax' (the paper's definition) or 'exp' (its cheaper approximation)."""
    memory_positions: str = "parallel"
    """Where a window's memories sit: 'parallel' (the paper, §3.2: all share one reference_len interval, so their
    order carries nothing) or 'ranked' (the window's j-th retrieved memory sits j intervals further from the
    context, so the retrieval rank is a cue the model can read: `Transformer` docs, BENCHMARKS.md #14)."""

    def __post_init__(self) -> None:
        problems = []
        if self.n_head % self.n_kv_head:
            problems.append(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even for rotary positions")
        if not 0 < self.n_mem_layer <= self.n_layer:
            problems.append(f"n_mem_layer={self.n_mem_layer} must be in 1..n_layer={self.n_layer}")
        if not 0 < self.mem_tokens <= self.reference_len:
            problems.append(f"mem_tokens={self.mem_tokens} must be in 1..reference_len={self.reference_len}")
        if self.selection not in ("softmax", "exp"):
            problems.append(f"selection={self.selection!r} must be 'softmax' or 'exp'")
        if self.memory_positions not in ("parallel", "ranked"):
            problems.append(f"memory_positions={self.memory_positions!r} must be 'parallel' or 'ranked'")
        for name in ("vocab_size", "n_layer", "head_dim", "mlp_hidden", "window", "refs_per_window", "max_seq_len"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if self.sink_len < 1:
            problems.append("sink_len must be >= 1 (the modified BOS)")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    # --- derived quantities ---
    @property
    def dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def group_size(self) -> int:
        return self.n_head // self.n_kv_head

    @property
    def reference_seq_len(self) -> int:
        """Tokens the encoder runs per reference: the sink prefix plus the padded chunk."""
        return self.sink_len + self.reference_len

    @property
    def memory_shape(self) -> tuple[int, int, int, int, int]:
        """One reference's sparse memory: (memory layers, key/value, KV heads, kept tokens, head dim)."""
        return (self.n_mem_layer, 2, self.n_kv_head, self.mem_tokens, self.head_dim)

    # --- the window schedule (paper §3.1: retrieval every `window` context tokens; the sink is in window 0) ---
    def window_of(self, index):
        """Retrieval window of context index `index` (an int or a tensor of them)."""
        shifted = index - self.sink_len
        return (shifted.clamp(min=0) if hasattr(shifted, "clamp") else max(shifted, 0)) // self.window

    def window_span(self, w: int) -> tuple[int, int]:
        """[start, end) context indices of window w."""
        start = self.sink_len + w * self.window
        return start, start + self.window

    def n_windows(self, n_positions: int) -> int:
        """Windows that context indices 0..n_positions-1 reach (at least one)."""
        return self.window_of(n_positions - 1) + 1

    def starts_window(self, index: int) -> bool:
        """Whether context index `index` is the first token of a window (where decoding re-retrieves)."""
        return index >= self.sink_len and (index - self.sink_len) % self.window == 0

    def rope_position(self, seq_index):
        """RoPE position of context index t: the sink sits at 0..sink_len-1, then a gap of reference_len
        positions that all memories share (parallel position encoding, §3.2), then the context. References
        are encoded at plain positions 0..reference_seq_len-1, so their tokens fill exactly that gap."""
        return seq_index + (seq_index >= self.sink_len) * self.reference_len

    def num_params(self, non_embedding: bool = False) -> int:
        d, kv = self.dim, self.n_kv_head * self.head_dim
        per_layer = 2 * d * d + 2 * d * kv + 3 * d * self.mlp_hidden + 2 * d
        body = self.n_layer * per_layer + d
        if non_embedding:
            return body
        return body + self.vocab_size * d * (1 if self.tie_embeddings else 2)

    def memory_bytes(self, bytes_per_value: int = 2, code_bytes_per_vector: int | None = None) -> dict:
        """Bytes of one reference's memory: dense (all layers/heads/tokens), sparsified, and quantized."""
        vectors = math.prod(self.memory_shape[:-1])
        dense = self.n_layer * 2 * self.n_head * self.reference_len * self.head_dim * bytes_per_value
        out = {"dense": dense, "sparse": vectors * self.head_dim * bytes_per_value}
        if code_bytes_per_vector is not None:
            out["quantized"] = vectors * code_bytes_per_vector
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelConfig":
        """A preset from configs/model/<name>.yaml, or a path to such a YAML file."""
        from omegaconf import OmegaConf

        path = Path(name) if name.endswith((".yaml", ".yml")) else PRESET_DIR / f"{name}.yaml"
        if not path.is_file():
            raise ValueError(f"unknown model preset {name!r}; presets: {preset_names()}")
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        data.update(overrides)
        return cls.from_dict(data)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
