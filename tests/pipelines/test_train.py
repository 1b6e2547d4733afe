"""`memory3 train`: real Ray Train (2 CPU workers, gloo) + DeepSpeed ZeRO-2 on a shrunk tiny model.

One uninterrupted warmup run is the baseline: a killed-then-resumed run and a run whose worker dies mid-way
(FailureConfig restart, checkpoints on S3) must reproduce its losses exactly (CPU fp32). The continual stage
starts from it with a real bank built by pipelines.encode from the warmup weights.
"""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from bank import storage
from configs import load_config
from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import ModelConfig
from model.encoder import encode_references
from model.tokenizer import Tokenizer
from model.transformer import MemoryBatch, Transformer
from pipelines.geo_corpus import build_geo_corpus
from pipelines.prepare import prepare
from pipelines.ray_runtime import check_cpus_left
from pipelines.retrieval_assign import lcs_length, overlap, select_references
from pipelines.train import build_dataset, plan_run, train, worker_env
from pipelines.train_loop import (IGNORE, ReferenceTokens, TrainBatch, collate, forward_loss, memory_slots,
                                  skip_cpu_inference_allreduce, wsd_lr_factor)

MODEL = {"n_layer": 2, "n_head": 2, "n_kv_head": 1, "head_dim": 32, "mlp_hidden": 128, "vocab_size": 384,
         "max_seq_len": 96, "n_mem_layer": 1, "reference_len": 32, "mem_tokens": 8, "window": 32}
RUN = {"max_steps": 8, "checkpoint_every": 4, "optim.warmup_steps": 2, "optim.lr": 0.003, "deepspeed.micro_batch": 4,
       "deepspeed.zero_stage": 2, "shuffle_buffer": 16}


def overrides(**kw) -> list[str]:
    merged = {**{f"model.{k}": v for k, v in MODEL.items()}, **kw}
    return [f"{k}={v}" for k, v in merged.items() if v is not None]


def train_cfg(**kw):
    return load_config("train", overrides(**{**RUN, **kw}))


def losses(out) -> list[float]:
    rows = [json.loads(line) for line in storage.read_text(f"{out}/metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    return [r["loss"] for r in rows]


# ---------------------------------------------------------------- fixtures: data, baseline run, bank
@pytest.fixture(scope="module")
def geo(tmp_path_factory):
    path = tmp_path_factory.mktemp("geo")
    build_geo_corpus(path, n_trained=40, n_memory_only=10)
    # plain text only: packed into full multi-window sequences (prompt records would each get a short one)
    lines = (path / "train.jsonl").read_text().splitlines()
    (path / "train.jsonl").write_text("".join(f"{x}\n" for x in lines if '"prompt"' not in x))
    return path


@pytest.fixture(scope="module")
def data(geo, tmp_path_factory, ray_local):
    out = str(tmp_path_factory.mktemp("prepared"))
    prepare(load_config("prepare", overrides(corpus=geo / "train.jsonl", out=out, vocab_size=MODEL["vocab_size"])))
    return out


@pytest.fixture(scope="module")
def warmup(data, tmp_path_factory):
    """The uninterrupted baseline run."""
    out = str(tmp_path_factory.mktemp("warmup"))
    summary = train(train_cfg(stage="warmup", data=data, out=out))
    return out, summary


@pytest.fixture(scope="module")
def bank(warmup, geo, tmp_path_factory):
    """A real bank: the geo references encoded by the warmup weights (pipelines.encode)."""
    from pipelines.encode import encode_corpus

    uri = str(tmp_path_factory.mktemp("bank") / "bank")
    encode_corpus(load_config("encode", [f"corpus={geo / 'references.jsonl'}", f"bank={uri}",
                                         f"checkpoint={warmup[0]}/final", "actors=1", "shard_documents=512"]))
    return uri


# ---------------------------------------------------------------- pieces (no Ray)
def test_lcs_and_eq6_overlap_match_brute_force():
    rng = np.random.default_rng(0)

    def lcs_dp(a, b):
        t = np.zeros((len(a) + 1, len(b) + 1), dtype=int)
        for i in range(len(a)):
            for j in range(len(b)):
                t[i + 1, j + 1] = t[i, j] + 1 if a[i] == b[j] else max(t[i, j + 1], t[i + 1, j])
        return t[-1, -1]

    for _ in range(40):
        ref = rng.integers(0, 6, rng.integers(1, 9)).tolist()
        train = rng.integers(0, 6, rng.integers(1, 60)).tolist()
        assert lcs_length(ref, train) == lcs_dp(ref, train)
        spans = [lcs_dp(ref, train[s:s + 2 * len(ref) + 1]) for s in range(max(1, len(train) - 2 * len(ref)))]
        assert overlap(train, ref) == pytest.approx(max(spans) / len(ref))
    ref = list(range(100, 120))
    copied = list(range(50)) + ref[:19] + list(range(60, 90))  # 95% of the reference, contiguous
    spread = list(range(50)) + [t for r in ref for t in (r, 7, 7)] + [1]  # all of it, but spread over 3|r|
    assert overlap(copied, ref) == pytest.approx(0.95)
    assert overlap(spread, ref) < 0.9 and lcs_length(ref, spread) == 20


def test_select_references_drops_own_document_and_copies():
    records = {1: {"doc_id": "d1", "tokens": [5, 6, 7, 8]}, 2: {"doc_id": "d2", "tokens": [9, 9, 1, 2]},
               3: {"doc_id": "d3", "tokens": [30, 31, 32, 33]}, 4: {"doc_id": "d4", "tokens": [40, 41, 42, 43]}}
    counts = {"same_document": 0, "overlap": 0}
    train = [1, 2, 30, 31, 32, 33, 3]  # row 3 is copied into the training text
    assert select_references([1, 3, 2, 4], records, train, {"d1"}, 2, 0.9, counts) == [2, 4]
    assert counts == {"same_document": 1, "overlap": 1}
    assert select_references([1, 3], records, train, {"d1"}, 2, 0.9, counts) == [-1, -1]


def test_ranked_memory_positions_need_the_decoding_layout():
    """Ranked memory positions mean 'the window's j-th retrieved reference': training must lay slots out as
    decoding does (its own references only, as many as the model's slots), else a bad setting is named."""
    from configs.schema import TrainMemorySettings
    from pipelines.train import check_memory_slots

    ranked = ModelConfig.from_name("tiny", memory_positions="ranked")
    with pytest.raises(ValueError, match="memory.lookback=0 memory.refs_per_window=3"):
        check_memory_slots(ranked, TrainMemorySettings(refs_per_window=1, lookback=2))
    check_memory_slots(ranked, TrainMemorySettings(refs_per_window=3, lookback=0))
    check_memory_slots(ModelConfig.from_name("tiny"), TrainMemorySettings(refs_per_window=1, lookback=2))


def test_memory_slots_lookback_and_duplicates():
    rows = np.array([[[7], [8], [7], [-1], [9], [5]]])  # (B=1, W=6, r=1)
    unique, slot_ref, visible = memory_slots(rows, lookback=2)
    assert unique.tolist() == [5, 7, 8, 9]
    read = [[unique[slot_ref[0, m]] for m in range(6) if visible[0, w, m]] for w in range(6)]
    # window w reads windows w-2..w, each reference once, nothing from empty windows
    assert read == [[7], [7, 8], [7, 8], [8, 7], [7, 9], [9, 5]]


def test_reference_tokens_pad_to_the_longest_and_report_oversized_rows():
    rows = {3: [7, 8, 9], 5: list(range(10, 21)), 6: list(range(40))}
    source = ReferenceTokens(lambda asked: [{"tokens": rows[r]} for r in asked], reference_len=32, pad_id=0)
    tokens, lengths = source(np.array([5, 3]))
    assert tokens.shape == (2, 16) and lengths.tolist() == [11, 3]  # longest 11, rounded up to 8
    assert tokens[0, :11].tolist() == rows[5] and tokens[1].tolist() == [7, 8, 9] + [0] * 13
    with pytest.raises(ValueError, match="bank row 6 has 40 tokens"):
        source(np.array([6]))


def test_wsd_schedule_and_collate_targets():
    f = [wsd_lr_factor(s, max_steps=100, warmup_steps=10, decay_fraction=0.1, min_lr_ratio=0.01) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[50] == 1.0 and f[89] == 1.0
    assert f[95] < f[91] < 1.0 and f[99] == pytest.approx(0.01 ** 0.9, rel=1e-6)
    b = collate({"tokens": [np.array([2, 4, 2, 10, 11, 12]), np.array([2, 4, 2, 20])]}, 8, pad_id=0, sink_len=2)
    assert b.inputs.tolist() == [[2, 4, 2, 10, 11, 12, 0], [2, 4, 2, 20, 0, 0, 0]]
    assert b.targets.tolist() == [[IGNORE, IGNORE, 10, 11, 12, IGNORE, IGNORE], [IGNORE, IGNORE, 20] + [IGNORE] * 4]


def test_cpu_training_never_waits_on_a_stale_deepspeed_build_lock(tmp_path, monkeypatch):
    """An interrupted JIT build leaves torch's lock file behind; DeepSpeed's CPU init used to wait on it forever."""
    import threading

    from deepspeed.accelerator import get_accelerator
    from deepspeed.comm.torch import build_shm_op

    if get_accelerator().device_name() != "cpu":
        pytest.skip("the shared-memory op is built only by DeepSpeed's CPU accelerator")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    (tmp_path / "deepspeed_shm_comm").mkdir()
    (tmp_path / "deepspeed_shm_comm" / "lock").touch()
    skip_cpu_inference_allreduce()
    built = []
    init = threading.Thread(target=lambda: built.append(build_shm_op()), daemon=True)
    init.start()
    init.join(timeout=60)
    assert built == [None], "DeepSpeed's CPU init is waiting on a stale build lock"


def test_continual_step_encodes_references_with_live_weights():
    """The memory reaches the loss, and gradients flow through the reference encoding (encode_grad)."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", **MODEL)
    model = Transformer(cfg)
    tokens = torch.randint(5, cfg.vocab_size, (2, cfg.max_seq_len))
    refs = {r: torch.randint(5, cfg.vocab_size, (cfg.reference_len,)).tolist() for r in range(4)}
    source = ReferenceTokens(lambda rows: [{"tokens": refs[r]} for r in rows], cfg.reference_len, pad_id=0)
    ref_rows = np.array([[[0], [1], [2]], [[3], [-1], [0]]])
    batch = TrainBatch(tokens[:, :-1].contiguous(), tokens[:, 1:].clone(), ref_rows)
    plain = TrainBatch(batch.inputs, batch.targets)
    sink = [2, 4]
    loss_mem, stats = forward_loss(model, batch, source, sink_ids=sink, lookback=4)
    loss_plain, _ = forward_loss(model, plain, sink_ids=sink)
    assert not torch.isclose(loss_mem, loss_plain) and stats["refs_encoded"] == 4
    assert stats["refs_per_window"] == pytest.approx((1 + 2 + 3 + 1 + 1 + 2) / 6)
    # the same result by hand: encode, lay out, forward
    sparse = encode_references(model, *source(np.array([0, 1, 2, 3])), sink)
    mems = torch.stack([sparse.memories[[0, 1, 2]], torch.cat([sparse.memories[[3]], 0 * sparse.memories[:1],
                                                                sparse.memories[[0]]])])
    n_valid = torch.tensor([[8, 8, 8], [8, 0, 8]])
    vis = torch.tensor([[[1, 0, 0], [1, 1, 0], [1, 1, 1]], [[1, 0, 0], [1, 0, 0], [1, 0, 1]]], dtype=torch.bool)
    pos = torch.arange(batch.inputs.shape[1]).expand_as(batch.inputs)
    logits = model(batch.inputs, memory=MemoryBatch.from_references(mems, n_valid, vis, pos, cfg))
    by_hand = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), batch.targets.reshape(-1),
                                                ignore_index=IGNORE)
    assert torch.allclose(loss_mem, by_hand, atol=1e-6)

    def memory_layer_grad(encode_grad):
        model.zero_grad()
        forward_loss(model, batch, source, sink_ids=sink, encode_grad=encode_grad)[0].backward()
        return model.layers[0].self_attn.k_proj.weight.grad.clone()

    assert not torch.allclose(memory_layer_grad(True), memory_layer_grad(False))


# ---------------------------------------------------------------- Ray Train + DeepSpeed runs
def test_warmup_trains_checkpoints_and_exports(warmup, data):
    out, summary = warmup
    curve = losses(out)
    assert len(curve) == RUN["max_steps"] and summary["steps"] == RUN["max_steps"]
    assert curve[-1] < curve[0] - 0.5, curve  # it learns
    model, tk = load_checkpoint(f"{out}/final")
    assert tk.sha256 == Tokenizer.load(f"{data}/tokenizer.json").sha256
    assert [p.shape for p in model.parameters()] == [p.shape for p in Transformer(model.cfg).parameters()]
    assert storage.read_bytes(f"{out}/loss.png")[:4] == b"\x89PNG"
    assert sorted(storage.listdir(f"{out}/checkpoints"))[-2:] == ["step_00000004", "step_00000008"]


def test_killed_run_resumes_and_a_dead_worker_restarts_with_identical_losses(warmup, data, tmp_path, s3_bucket):
    """Checkpoints on S3. Run 1 loses a worker at step 6 with no restarts allowed, so the run dies; run 2 resumes
    from its step-4 checkpoint, loses a worker again at step 7, FailureConfig restarts the group from the newest
    checkpoint, and it finishes. Every step's loss equals the uninterrupted run's (same data order, same RNG)."""
    out = str(tmp_path / "interrupted")
    ckpts = f"{s3_bucket}/ray/checkpoints"
    run = dict(stage="warmup", data=data, out=out, storage_path=f"{s3_bucket}/ray")
    with pytest.raises(Exception):
        train(train_cfg(**run, fail_at_step=6))
    assert storage.exists(f"{out}/.fail_at_step_6") and storage.listdir(ckpts)[-1] == "step_00000004"
    # As if the run died before Ray Train's controller registered the uploaded step-4 checkpoint (a race that a
    # loaded machine hits): no snapshot. The run is still found, and resumed from that checkpoint.
    storage.remove(f"{ckpts}/checkpoint_manager_snapshot.json")
    with pytest.raises(ValueError, match="resume=true"):
        plan_run(train_cfg(**run))  # an existing run is never silently overwritten
    summary = train(train_cfg(**run, resume="true", fail_at_step=7, max_failures=1))
    assert storage.exists(f"{out}/.fail_at_step_7")  # a worker really died in the resumed run too
    assert summary["checkpoint"].endswith("step_00000008") and "step_00000008" in storage.listdir(ckpts)
    assert losses(out) == losses(warmup[0])
    rows = [json.loads(line) for line in storage.read_text(f"{out}/metrics.jsonl").splitlines()]
    assert [r["since_step"] for r in rows] == [0] * 4 + [4] * 4  # resumed at 4; the restart after 7 at 4 again


def test_training_rows_come_in_one_order_held_in_memory_or_streamed_local_or_on_s3(data, tmp_path, s3_bucket):
    """Small data is read once by the driver and held; larger data streams through read tasks every epoch. Either
    way, from a folder or from S3, the workers get every row, in an order fixed by the seed."""
    import pyarrow.parquet as pq

    split = tmp_path / "split"
    shutil.copytree(data, split)
    (part,) = split.glob("sequences-*/*.parquet")
    table = pq.read_table(part)
    part.unlink()
    for i in range(4):  # four files, so the seeded block order has something to order
        pq.write_table(table.slice(i * table.num_rows // 4, table.num_rows // 4), part.parent / f"part-{i}.parquet")
    fs, root = storage.filesystem(s3_bucket)
    fs.put(str(split), f"{root}/prepared", recursive=True)

    def rows(data_uri, in_memory_max_mb, seed=0):
        cfg = train_cfg(stage="warmup", data=data_uri, out=str(tmp_path / "never"), seed=seed,
                        in_memory_max_mb=in_memory_max_mb)
        ds, _ = build_dataset(plan_run(cfg), cfg, worker_env(cfg))
        return [(list(r["tokens"]), r["text"]) for r in ds.take_all()]

    held = rows(str(split), 256)
    assert len(held) == 4 * (table.num_rows // 4)
    assert rows(f"{s3_bucket}/prepared", 256) == held
    other_seed = rows(str(split), 256, seed=1)
    assert other_seed != held and sorted(other_seed) == sorted(held)
    # Ray Data decides how streamed files make blocks, so its order may differ from the held one; it is its own.
    streamed = rows(str(split), 0)
    assert sorted(streamed) == sorted(held) and rows(str(split), 0) == streamed


def test_bad_inputs_fail_before_any_training_step(warmup, data, bank, tmp_path):
    init = f"{warmup[0]}/final"
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="needs bank"):
        plan_run(train_cfg(stage="continual", data=data, out=out, init=init))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(train_cfg(stage="continual", data=data, out=out, init=init, bank=tmp_path / "no-bank"))
    with pytest.raises(ValueError, match="another model shape.*n_layer"):
        train(train_cfg(stage="continual", data=data, out=out, init=init, bank=bank, **{"model.n_layer": 3}))
    # data tokenized with another tokenizer than the checkpoint and the bank
    other = tmp_path / "other-data"
    shutil.copytree(data, other)
    tk = Tokenizer.train([f"text number {i}" for i in range(200)], 300)
    tk.save(other / "tokenizer.json")
    manifest = json.loads((other / "prepare.json").read_text())
    (other / "prepare.json").write_text(json.dumps({**manifest, "tokenizer_sha256": tk.sha256}))
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        train(train_cfg(stage="continual", data=other, out=out, init=init, bank=bank))
    other_init = tmp_path / "other-init"
    save_checkpoint(other_init, Transformer(ModelConfig.from_name("tiny", **MODEL)), tk)
    with pytest.raises(ValueError, match="tokenizer"):
        train(train_cfg(stage="continual", data=other, out=out, init=other_init, bank=bank))
    # one worker holding both of the test cluster's CPUs: Ray Data could never read its rows (it used to hang)
    with pytest.raises(ValueError, match="scaling.num_workers x scaling.cpus_per_worker = 1 x 2"):
        train(train_cfg(stage="warmup", data=data, out=out, **{"scaling.num_workers": 1,
                                                               "scaling.cpus_per_worker": 2}))
    assert not out.exists()  # nothing ran


@pytest.fixture(scope="module")
def continual(warmup, data, bank, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("continual"))
    summary = train(train_cfg(stage="continual", data=data, out=out, init=warmup[0], bank=bank, max_steps=4))
    return out, summary


def test_continual_stage_reads_memories_from_the_warmup_checkpoint(continual, warmup, bank):
    out, summary = continual
    rows = [json.loads(line) for line in storage.read_text(f"{out}/metrics.jsonl").splitlines()]
    assert len(rows) == 4 and all(math.isfinite(r["loss"]) for r in rows)
    # 3 windows, 1 reference each, lookback 4: windows read 1, 2, 3 references
    assert all(r["refs_per_window"] > 1.5 and r["refs_encoded"] > 0 and r["reference_tokens"] > 0 for r in rows)
    # it continues the warmup weights: below what a fresh model reaches in as many steps
    assert min(r["loss"] for r in rows[1:]) < losses(warmup[0])[3]
    assert summary["retrieval"]["windows_with_refs"] > 0.9 * summary["retrieval"]["windows"]
    model, _ = load_checkpoint(f"{out}/final")
    assert model.cfg.n_layer == MODEL["n_layer"]
    meta = json.loads(storage.read_text(f"{out}/final/config.json"))["meta"]
    assert meta["stage"] == "continual" and meta["bank"] == bank
    assert storage.read_bytes(f"{out}/loss.png")[:4] == b"\x89PNG"


def test_no_training_sequence_receives_a_reference_from_its_own_document(continual, data, bank):
    """Checked on the rows the continual run trained on (its precomputed retrieval folder)."""
    import pyarrow.parquet as pq

    from bank.index import Retriever
    from bank.reader import MemoryBank

    folder = continual[1]["retrieval"]["folder"]
    rows = pq.read_table(folder).to_pylist()
    assert len(rows) == json.loads(storage.read_text(f"{data}/prepare.json"))["sequences"]
    bank_ = MemoryBank.open(bank)
    docs = bank_.doc_ids()
    attached = [(r, ref) for r in rows for window in r["ref_rows"] for ref in window if ref >= 0]
    assert len(attached) > len(rows)
    assert [ref for r, ref in attached if docs[ref] in r["source_ids"]] == []  # same-document rule
    refs = sorted({ref for _, ref in attached})
    tokens = dict(zip(refs, (rec["tokens"] for rec in bank_.records(refs))))
    assert max(overlap(r["tokens"][2:], tokens[ref]) for r, ref in attached) <= 0.9  # eq. 6 rule
    assert continual[1]["retrieval"]["dropped_overlap"] > 0
    # The check can fail: unfiltered, retrieval does return the sequences' own documents.
    tk = Tokenizer.load(f"{data}/tokenizer.json")
    first_windows = [tk.decode(list(r["tokens"][2:34])) for r in rows]
    hits = Retriever.open(bank).search(first_windows, 2)
    own = sum(docs[ref] in r["source_ids"] for r, refs in zip(rows, hits) for ref in refs)
    assert own > len(rows) // 4, own


def test_a_run_that_would_hold_every_cpu_is_refused_with_the_keys_and_an_example():
    """Its actors or workers holding every CPU, Ray Data's read and write tasks never run and the run waits forever
    (seen with 4 x 0.5 retrieval actors, and with one training worker of 2 CPUs, on 2 cores): the check names both
    keys and an example that fits, which itself passes."""
    retrieval = {"keys": ("memory.retrieval_actors", "memory.retrieval_cpus"), "what": "the retrieval pass"}
    assert check_cpus_left(2, 0.5, 2, **retrieval) is None  # the quickstart on 2 cores: one CPU left
    problem = check_cpus_left(4, 0.5, 2, **retrieval)
    assert "memory.retrieval_actors" in problem and "memory.retrieval_cpus" in problem and "4 x 0.5" in problem
    example = dict(kv.split("=") for kv in problem.split("For example: ")[1].split())
    assert check_cpus_left(int(example["memory.retrieval_actors"]), float(example["memory.retrieval_cpus"]), 2,
                           **retrieval) is None
    assert check_cpus_left(1, 1, 1, **retrieval) is not None and check_cpus_left(8, 1, 16, **retrieval) is None
    training = {"keys": ("scaling.num_workers", "scaling.cpus_per_worker"), "what": "training"}
    problem = check_cpus_left(1, 2, 2, **training)
    assert problem.startswith("scaling.num_workers x scaling.cpus_per_worker = 1 x 2") and "training" in problem
    example = dict(kv.split("=") for kv in problem.split("For example: ")[1].split())
    assert check_cpus_left(int(example["scaling.num_workers"]), float(example["scaling.cpus_per_worker"]), 2,
                           **training) is None
