"""Model checkpoints where they live (a local folder or s3://): one loader for the jobs and the server.

A Ray worker or Serve replica may run on a node without the checkpoint: an s3:// checkpoint is downloaded once per
node into the temp dir, and counts as there only when its weights and config both are.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

from bank import storage
from model.checkpoint import CONFIG, TOKENIZER, TOKENIZER_FILES, WEIGHTS, load_checkpoint
from model.tokenizer import Tokenizer
from model.transformer import Transformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str, device: str = "cpu") -> torch.dtype:
    """A dtype setting: float32, bfloat16, float16, or auto (bf16 on a GPU, the paper's precision §5.1; float32 on
    the CPU)."""
    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {name!r}")
    return DTYPES[name]


def local_checkpoint(uri: str) -> Path:
    """The checkpoint folder on this machine; FileNotFoundError when a local one does not exist."""
    if not storage.is_remote(uri):
        path = Path(uri)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint {uri} does not exist")
        return path
    target = Path(tempfile.gettempdir()) / "memory3-checkpoints" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if not all((target / name).is_file() for name in (WEIGHTS, CONFIG)):
        fs, path = storage.filesystem(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent))
        for name in (WEIGHTS, CONFIG, *TOKENIZER_FILES):
            remote = f"{path.rstrip('/')}/{name}"
            if fs.exists(remote):
                fs.get(remote, str(tmp / name))
        try:
            os.replace(tmp, target)
        except OSError:  # another process on this node won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_model(uri: str, device: str = "cpu", dtype: str = "float32") -> tuple[Transformer, Tokenizer]:
    """Model and tokenizer of a checkpoint; decoding and encoding both need the tokenizer."""
    model, tokenizer = load_checkpoint(local_checkpoint(uri), device=device, dtype=parse_dtype(dtype, device))
    if tokenizer is None:
        raise FileNotFoundError(f"checkpoint {uri} has no {TOKENIZER}")
    return model, tokenizer


def load_tokenizer(uri: str) -> Tokenizer:
    path = local_checkpoint(uri) / TOKENIZER
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {uri} has no {TOKENIZER}")
    return Tokenizer.load(path)
