"""`memory3 bank verify|info|delete bank=...`: bank maintenance from the command line."""
from __future__ import annotations

import json
import sys

from bank.edits import delete_references
from bank.format import BankError
from bank.manifest import read_manifest
from bank.reader import MemoryBank
from configs import typed
from configs.schema import BankConfig


def main(cfg: BankConfig) -> int:
    """`memory3 bank verify|info|delete bank=...`"""
    cfg = typed("bank", cfg)
    action = cfg.get("action")
    if action not in ("verify", "info", "delete"):
        raise ValueError("say what to do: `memory3 bank verify|info|delete bank=DIR_OR_S3 [ids=[...]]`")
    if action == "delete":
        n = delete_references(cfg.bank, list(cfg.ids))
        print(json.dumps({"bank": cfg.bank, "deleted": n}))
        return 0
    if action == "info":
        manifest = read_manifest(cfg.bank)
        print(json.dumps({k: v for k, v in manifest.items() if k not in ("shards", "tombstones")}, indent=1))
        return 0
    try:
        summary = MemoryBank.open(cfg.bank).verify()
    except BankError as e:
        print(json.dumps({"ok": False, "bank": cfg.bank, "error": str(e)}))
        print(f"memory3 bank verify: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0
