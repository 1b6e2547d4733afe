"""Checkpoint access for replicas: a checkpoint may live on local disk or on S3 (each replica copies it once)."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch

from model.checkpoint import load_checkpoint
from model.tokenizer import Tokenizer
from model.transformer import Transformer
from pipelines import storage

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def local_checkpoint(uri: str) -> Path:
    """The checkpoint folder on this machine; an s3:// checkpoint is downloaded once per node into the temp dir."""
    if not storage.is_remote(uri):
        path = Path(uri)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint {uri} does not exist")
        return path
    target = Path(tempfile.gettempdir()) / "memory3-checkpoints" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if not (target / "config.json").is_file():
        fs, path = storage.filesystem(uri)
        tmp = Path(tempfile.mkdtemp(dir=target.parent if target.parent.exists() else None))
        fs.get(path.rstrip("/") + "/", str(tmp), recursive=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, target)
        except OSError:  # another replica on this node won the race
            pass
    return target


def load_model(uri: str, device: str = "cpu", dtype: str = "float32") -> tuple[Transformer, Tokenizer]:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    model, tokenizer = load_checkpoint(local_checkpoint(uri), device=device, dtype=DTYPES[dtype])
    if tokenizer is None:
        raise FileNotFoundError(f"checkpoint {uri} has no tokenizer.json; serving needs it")
    return model, tokenizer


def load_tokenizer(uri: str) -> Tokenizer:
    path = local_checkpoint(uri) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {uri} has no tokenizer.json; serving needs it")
    return Tokenizer.load(path)
