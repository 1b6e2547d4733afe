"""`memory3 index bank=...`: build or update the FAISS retrieval index of a bank (bank/index.py does the work)."""
from __future__ import annotations

import json

from bank.index import update_index
from bank.manifest import read_manifest
from configs import typed
from configs.schema import IndexConfig, IndexSettings
from pipelines import console


def index_options(cfg: IndexSettings) -> dict:
    """update_index's keyword arguments; use_gpu "auto" is None (FAISS decides)."""
    return {"factory": cfg.factory, "nprobe": cfg.nprobe,
            "use_gpu": None if cfg.use_gpu in (None, "auto") else bool(cfg.use_gpu), "train_size": cfg.train_size,
            "shards": cfg.shards, "refine_k_factor": cfg.refine_k_factor}


def main(cfg: IndexConfig) -> int:
    """`memory3 index bank=...`: build or update the bank's FAISS index; prints one JSON summary."""
    cfg = typed("index", cfg)
    read_manifest(cfg.bank)  # a clear error before any work
    summary = update_index(cfg.bank, rebuild=cfg.rebuild, **index_options(cfg))
    console.say(json.dumps({"bank": cfg.bank, **summary}))
    return 0
