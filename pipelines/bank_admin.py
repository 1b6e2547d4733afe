"""`memory3 bank verify|info|delete|compact bank=...`: bank maintenance from the command line.

`compact` is a Ray Data job: one task per shard that holds deleted rows rewrites it without them
(bank/compact.py's `rewrite_shard`), then the driver renumbers the index and switches the manifest.
"""
from __future__ import annotations

import json
import sys

from bank.compact import compact_bank, rewrite_shard
from bank.edits import delete_references
from bank import storage
from bank.format import BankError
from bank.manifest import read_manifest
from bank.reader import MemoryBank
from configs import typed
from configs.schema import BankConfig
from pipelines import console


def _rewrite_row(row: dict, bank_uri: str, record_bytes: int) -> dict:
    result = rewrite_shard(bank_uri, json.loads(row["task"]), record_bytes)
    return {"result": json.dumps(result)}


def compact(cfg: BankConfig) -> dict:
    """Rewrite every shard holding tombstoned rows without them, as Ray Data tasks; returns the summary."""
    import ray

    from pipelines.ray_runtime import ensure_ray

    def rewrite_all(bank_uri: str, tasks: list[dict], record_bytes: int) -> list[dict]:
        ensure_ray(cfg.ray_address or None)
        env = storage.aws_env()
        options = {"num_cpus": cfg.task_num_cpus, **({"runtime_env": {"env_vars": env}} if env else {})}
        ds = ray.data.from_items([{"task": json.dumps(t)} for t in tasks], override_num_blocks=len(tasks))
        ds = ds.map(_rewrite_row, fn_kwargs={"bank_uri": bank_uri, "record_bytes": record_bytes}, **options)
        results = []
        with console.stage("rewrite shards without deleted rows") as line:
            line.follow(None, total=len(tasks), unit="shards")
            for row in ds.iter_rows():
                results.append(json.loads(row["result"]))
                line.update(1)
            line.done(f"{sum(r['status'] != 'failed' for r in results)}/{len(tasks)} shards rewritten")
        return results

    return compact_bank(cfg.bank, rewrite_all)


def main(cfg: BankConfig) -> int:
    """`memory3 bank verify|info|delete|compact bank=...`"""
    cfg = typed("bank", cfg)
    action = cfg.get("action")
    if action not in ("verify", "info", "delete", "compact"):
        raise ValueError("say what to do: `memory3 bank verify|info|delete|compact bank=DIR_OR_S3 [ids=[...]]`")
    if action == "compact":
        summary = compact(cfg)
        console.say(json.dumps(summary))
        for failed in summary["failed_shards"]:
            console.say(f"memory3 bank compact: shard {failed['shard']} left as it is: {failed['error']}")
        return 0 if summary["ok"] else 1
    if action == "delete":
        n = delete_references(cfg.bank, list(cfg.ids))
        console.say(json.dumps({"bank": cfg.bank, "deleted": n}))
        return 0
    if action == "info":
        manifest = read_manifest(cfg.bank)
        console.say(json.dumps({k: v for k, v in manifest.items() if k not in ("shards", "tombstones")}, indent=1))
        return 0
    try:
        summary = MemoryBank.open(cfg.bank).verify()
    except BankError as e:
        console.say(json.dumps({"ok": False, "bank": cfg.bank, "error": str(e)}))
        print(f"memory3 bank verify: {e}", file=sys.stderr)
        return 1
    console.say(json.dumps(summary))
    return 0
