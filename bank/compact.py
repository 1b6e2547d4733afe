"""Compaction: rewrite the shards that hold deleted (tombstoned) rows without them, so deleted knowledge leaves
the bank's files, not just its index (docs/bank-format.md, "Erasing a document").

A delete only tombstones a row (bank/edits.py): its text, tokens, embedding and memory record stay in the shard.
Compaction copies each such shard's live rows — records byte for byte, metadata row for row — into a shard under a
new name (`<part>-g<generation>`), so readers of the current manifest keep reading the old files meanwhile. Then:

    new shards written (markers last) ─▶ index ids renumbered, new index file ─▶ manifest committed (generation + 1)
        ─▶ replaced shard files and the old index file removed

Killed before the commit: the old version is intact and a rerun reuses every new shard whose marker records the
same source (same old files, same deleted rows). Killed after it: a rerun has nothing to rewrite and removes the
leftovers. A shard whose files fail their size or sha256 check is reported and left as it is (its rows stay
tombstoned). Rows after a compaction are renumbered; `generation` in the manifest says that this happened.
"""
from __future__ import annotations

import io
import json
import time
from typing import Callable, Iterable

import numpy as np

from bank import storage
from bank.edits import write_lock
from bank.format import SHARDS, BankError, bytes_sha256
from bank.index import (index_settings, load_index, remove_stale_index_files, renumber_rows,
                        write_index_file)
from bank.manifest import (list_shard_markers, manifest_entry, read_manifest, shard_uri, source_part, write_manifest,
                           write_shard_table)

SHARD_EXTS = ("mem", "parquet", "json")


def generation(manifest: dict) -> int:
    """How many compactions the bank has had: rows are renumbered by each one."""
    return int(manifest.get("generation", 0))


def plan_compaction(manifest: dict) -> list[dict]:
    """One task per shard with tombstoned rows: {"shard" (manifest entry), "removed" (rows inside it),
    "new_name", "source"}. `source` identifies the inputs, so a rerun can reuse a shard it already wrote."""
    deleted = np.asarray(sorted(manifest["tombstones"]), dtype=np.int64)
    tasks = []
    for entry in manifest["shards"]:
        start = entry["row_offset"]
        inside = deleted[(deleted >= start) & (deleted < start + entry["rows"])] - start
        if not len(inside):
            continue
        removed = inside.tolist()
        source = bytes_sha256(json.dumps([entry["mem_sha256"], entry["meta_sha256"], removed]).encode())
        tasks.append({"shard": entry, "removed": removed, "source": source,
                      "new_name": f"{source_part(entry['name'])}-g{generation(manifest) + 1}"})
    return tasks


def _checked_bytes(bank_uri: str, entry: dict, ext: str, key: str) -> bytes:
    path = shard_uri(bank_uri, entry["name"], ext)
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise BankError(f"shard {entry['name']}: {path} is missing") from None
    if len(data) != entry[f"{key}_bytes"]:
        raise BankError(f"shard {entry['name']}: {path} has {len(data)} bytes, the manifest says "
                        f"{entry[f'{key}_bytes']} (truncated?)")
    if bytes_sha256(data) != entry[f"{key}_sha256"]:
        raise BankError(f"shard {entry['name']}: {path} fails its sha256 check (corrupt)")
    return data


def rewrite_shard(bank_uri: str, task: dict, record_bytes: int) -> dict:
    """Write task["new_name"]: the shard's rows minus task["removed"]. Returns {"name", "new_name", "status":
    "written" | "reused" | "failed", "marker", "error"}; a shard that fails its checks is not touched."""
    import pyarrow.parquet as pq

    entry = task["shard"]
    result = {"name": entry["name"], "new_name": task["new_name"], "removed": len(task["removed"]),
              "marker": None, "error": None}
    marker_uri = shard_uri(bank_uri, task["new_name"], "json")
    if storage.exists(marker_uri):
        marker = json.loads(storage.read_text(marker_uri))
        if marker.get("compacted_from") == entry["name"] and marker.get("source") == task["source"]:
            return {**result, "status": "reused", "marker": marker}
    try:
        mem = _checked_bytes(bank_uri, entry, "mem", "mem")
        meta = _checked_bytes(bank_uri, entry, "parquet", "meta")
        records = np.frombuffer(mem, dtype=np.uint8).reshape(entry["rows"], record_bytes)
        table = pq.read_table(io.BytesIO(meta))
        if table.num_rows != entry["rows"]:
            raise BankError(f"shard {entry['name']}: metadata has {table.num_rows} rows, manifest says "
                            f"{entry['rows']}")
    except (BankError, ValueError, OSError) as e:  # ValueError: reshape, pyarrow's ArrowInvalid
        return {**result, "status": "failed", "error": str(e)}
    keep = np.setdiff1d(np.arange(entry["rows"]), np.asarray(task["removed"], dtype=np.int64))
    marker = write_shard_table(bank_uri, task["new_name"], table.take(keep), records[keep],
                               compacted_from=entry["name"], source=task["source"])
    return {**result, "status": "written", "marker": marker}


def _remove_shard_files(bank_uri: str, names: Iterable[str]) -> int:
    removed = 0
    for name in names:
        for ext in SHARD_EXTS:
            uri = shard_uri(bank_uri, name, ext)
            if storage.exists(uri):
                storage.remove(uri)
                removed += 1
    return removed


def remove_replaced_files(bank_uri: str, manifest: dict, keep: Iterable[str] = ()) -> int:
    """Delete shard files the manifest no longer names but whose part it holds under another name (replaced by
    a compaction, or written by one that was killed), and unfinished temp files of such shards. Unrelated unlisted
    shards (an interrupted encode's) are left for that encode to finish, and so is `keep` (shards a rerun reuses).
    Returns the number of files removed."""
    listed = {s["name"] for s in manifest["shards"]} | set(keep)
    parts = {source_part(n) for n in listed}
    stale, temps = set(), []
    for entry in storage.listdir(storage.join(bank_uri, SHARDS)):
        # a temp file of an atomic write is ".<name>.<ext>.<random>.<hex>" (bank/storage.py)
        name = entry[1:].rsplit(".", 3)[0] if entry.startswith(".") else entry.rsplit(".", 1)[0]
        if name not in listed and source_part(name) in parts:
            (temps.append(entry) if entry.startswith(".") else stale.add(name))
    for entry in temps:
        storage.remove(storage.join(bank_uri, SHARDS, entry))
    return _remove_shard_files(bank_uri, sorted(stale)) + len(temps)


def commit_compaction(bank_uri: str, planned: dict, results: list[dict]) -> dict:
    """Switch the manifest to the rewritten shards (renumbered rows, renumbered index) in one write, then remove
    what it replaced. `planned` is the manifest the tasks were planned from; a bank changed since is refused."""
    manifest = read_manifest(bank_uri)
    if ([s["name"] for s in manifest["shards"]], manifest["tombstones"]) != \
            ([s["name"] for s in planned["shards"]], planned["tombstones"]):
        raise BankError(f"bank {bank_uri} changed during the compaction; run it again (finished shards are reused)")
    done = {r["name"]: r for r in results if r["status"] in ("written", "reused")}
    if not done:
        return manifest
    dead = np.zeros(manifest["references"], dtype=bool)
    dead[np.asarray(manifest["tombstones"], dtype=np.int64)] = True
    new_row = np.full(manifest["references"], -1, dtype=np.int64)
    shards, tombstones, offset = [], [], 0
    for entry in manifest["shards"]:
        rows = np.arange(entry["row_offset"], entry["row_offset"] + entry["rows"])
        if entry["name"] in done:
            kept = rows[~dead[rows]]
            new_row[kept] = np.arange(offset, offset + len(kept))
            entry = manifest_entry(done[entry["name"]]["marker"])
        else:  # untouched (no tombstones, or failed its checks): same rows, shifted
            new_row[rows] = np.arange(offset, offset + entry["rows"])
            tombstones += new_row[rows[dead[rows]]].tolist()
        shards.append(entry)
        offset += entry["rows"]
    old_index = manifest.get("index")
    if old_index:
        manifest["index"] = write_index_file(bank_uri, renumber_rows(load_index(bank_uri, manifest), new_row),
                                             **index_settings(old_index))
    manifest.update(shards=shards, tombstones=tombstones, generation=generation(manifest) + 1)
    manifest = write_manifest(bank_uri, manifest)  # the switch: readers see the old version or this one
    remove_stale_index_files(bank_uri, old_index, manifest.get("index"))
    return manifest


def compact_bank(bank_uri: str, rewrite_all: Callable[[str, list[dict], int], list[dict]] | None = None) -> dict:
    """Compact a bank in place; returns a summary. `rewrite_all(bank_uri, tasks, record_bytes)` runs
    `rewrite_shard` over the tasks (default: one after the other, in this process; `memory3 bank compact` passes
    a Ray Data job). Holds this process's write lock for the bank throughout; other processes must not write the
    bank meanwhile (the commit refuses a bank that changed)."""
    t0 = time.perf_counter()
    with write_lock(bank_uri):
        before = read_manifest(bank_uri)
        tasks = plan_compaction(before)
        # leftovers of a run killed after its commit (a run killed before it left shards this one reuses)
        files_removed = remove_replaced_files(bank_uri, before, keep=[t["new_name"] for t in tasks])
        rewrite_all = rewrite_all or rewrite_serially
        results = rewrite_all(bank_uri, tasks, before["record"]["record_bytes"]) if tasks else []
        after = commit_compaction(bank_uri, before, results)
        files_removed += remove_replaced_files(bank_uri, after)
    failed = [{"shard": r["name"], "error": r["error"]} for r in results if r["status"] == "failed"]
    return {"ok": not failed, "bank": str(bank_uri), "generation": generation(after),
            "shards_rewritten": sum(r["status"] == "written" for r in results),
            "shards_reused": sum(r["status"] == "reused" for r in results), "failed_shards": failed,
            "removed_references": before["references"] - after["references"],
            "references": after["references"], "live_references": after["live_references"],
            "tombstones": len(after["tombstones"]), "bytes_before": before["bytes"], "bytes_after": after["bytes"],
            "files_removed": files_removed, "seconds": round(time.perf_counter() - t0, 3)}


def rewrite_serially(bank_uri: str, tasks: list[dict], record_bytes: int) -> list[dict]:
    return [rewrite_shard(bank_uri, task, record_bytes) for task in tasks]
