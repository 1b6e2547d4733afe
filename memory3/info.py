"""`memory3 info`: what a model shape costs — parameters and the bytes of its explicit memory (paper §3.3)."""
from __future__ import annotations

import json

from omegaconf import DictConfig

from configs import model_config
from model.quantizer import MemoryQuantizer, default_factory, factory_for


def describe(cfg: DictConfig) -> dict:
    m = model_config(cfg)
    factory = factory_for(m.head_dim) if cfg.quantizer == "auto" else cfg.quantizer
    code_bytes = MemoryQuantizer(factory, m.head_dim).code_size
    per_ref = m.memory_bytes(code_bytes_per_vector=code_bytes)
    n = cfg.references
    return {
        "parameters": m.num_params(),
        "parameters_non_embedding": m.num_params(non_embedding=True),
        "layers": m.n_layer,
        "memory_layers": f"0-{m.n_mem_layer - 1}",
        "memory_shape": list(m.memory_shape),
        "quantizer": factory,
        "encode_default": default_factory(m) or "bfloat16",  # what `memory3 encode` writes with quantizer=auto
        "quantizer_bytes_per_vector": code_bytes,
        "reference_memory_bytes": per_ref,
        "bank_references": n,
        "bank_bytes": {k: v * n for k, v in per_ref.items()},
        "bank_tib": {k: round(v * n / 2**40, 2) for k, v in per_ref.items()},
    }


def main(cfg: DictConfig) -> None:
    print(json.dumps(describe(cfg), indent=2))
