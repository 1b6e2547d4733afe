"""`memory3 bank compact`: the Ray Data job over the shards to rewrite, on a real local Ray."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipelines import bank_admin
from bank.reader import MemoryBank
from test_bank import _one_thread, build_bank, embedder, make_documents, tiny_checkpoint  # noqa: F401 (fixtures)
from test_compact import DOOMED_DOCS, assert_no_file_holds, delete_documents


def test_bank_compact_command_erases_and_reports_a_corrupt_shard(ray_local, tmp_path, tiny_checkpoint, embedder,
                                                               capsys):
    uri = build_bank(str(tmp_path / "bank"), tiny_checkpoint, make_documents(24), embedder)
    spare = str(shutil.copytree(uri, tmp_path / "spare"))
    gone = delete_documents(uri, DOOMED_DOCS)
    assert bank_admin.main({"bank": uri, "action": "compact"}) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["ok"] and summary["shards_rewritten"] == 2 and summary["removed_references"] == len(gone["ids"])
    assert_no_file_holds(uri, gone)
    MemoryBank.open(uri, verify=True)

    delete_documents(spare, DOOMED_DOCS)
    bad = MemoryBank.open(spare).shards[0]["name"]
    Path(spare, "shards", bad + ".mem").write_bytes(b"short")
    assert bank_admin.main({"bank": spare, "action": "compact"}) == 1
    out = capsys.readouterr().out
    assert f"shard {bad} left as it is" in out and "truncated" in out
    assert Path(spare, "shards", bad + ".mem").read_bytes() == b"short"
