"""The per-worker training loop (Ray Train + DeepSpeed) and the step it runs.

`forward_loss` is the one training step definition, shared with benchmarks/train.py:
- warmup (paper §3.6 stage 1): plain next-token loss, no memory.
- continual (stage 2): the references retrieved for each `window`-token window (`ref_rows`, precomputed by
  pipelines/retrieval_assign.py) are ENCODED IN THE STEP with the live weights (`encode_references`, paper §3.6,
  §5.3: "the references need to be encoded in real time"), then every window reads its own references and those
  of the previous `lookback` windows (paper: 1 per window + 4 back = 5). The bank supplies reference token ids
  only, never its stored memory tensors, which were written by other weights (Remark 9).

`train_loop_per_worker` wraps it in `deepspeed.initialize` (ZeRO, bf16/fp32, accumulation, clipping) with a
warmup-stable-decay LR (MiniCPM, paper §5.1), reads its shard with `ray.train.get_dataset_shard`, and checkpoints
through `ray.train.report` so `resume` and FailureConfig restarts continue bit-for-bit (same data order and RNG).
"""
from __future__ import annotations

import functools
import json
import os
import random
import shutil
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from model.config import ModelConfig
from model.encoder import encode_references, pad_references
from model.transformer import MemoryBatch, Transformer, cross_entropy
from pipelines import console

IGNORE = -100
PROGRESS_KEY = "train"  # optimizer steps taken, for the driver's progress bar (pipelines/console.py)
METRICS_FILE = "metrics.jsonl"
DS_TAG = "ds"


# ---------------------------------------------------------------- schedule and optimizer
def wsd_lr_factor(step: int, *, max_steps: int, warmup_steps: int, decay_fraction: float,
                  min_lr_ratio: float) -> float:
    """Warmup-stable-decay (MiniCPM, paper §5.1): linear ramp, flat, then the last `decay_fraction` of the steps
    decay exponentially to `min_lr_ratio` ("decays rapidly to near zero")."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_start = max_steps * (1.0 - decay_fraction)
    if step < decay_start or decay_fraction <= 0:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1.0, max_steps - decay_start))
    return min_lr_ratio ** progress


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay (paper §5.1: 0.1) on matrices only; norm gains are not decayed [guess, the usual choice]."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    plain = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def deepspeed_config(ds: dict) -> dict:
    return {
        "train_micro_batch_size_per_gpu": int(ds["micro_batch"]),
        "gradient_accumulation_steps": int(ds["grad_accum"]),
        "gradient_clipping": float(ds["gradient_clipping"]),
        "zero_optimization": {"stage": int(ds["zero_stage"])},
        "bf16": {"enabled": bool(ds["bf16"])},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


# ---------------------------------------------------------------- batches
@dataclass
class TrainBatch:
    """inputs/targets (B, T) token ids (targets IGNORE on the sink and padding); ref_rows (B, W, r) bank rows
    retrieved per window (-1 = none), None in the warmup stage."""

    inputs: Tensor
    targets: Tensor
    ref_rows: np.ndarray | None = None


def collate(batch: dict, seq_len: int, pad_id: int, sink_len: int, device="cpu") -> TrainBatch:
    """Ray Data numpy batch -> padded tensors. Sequences are padded to the batch's longest (a multiple of 8, at
    most seq_len): short unpacked documents then cost what they hold. Inputs are tokens[:-1], targets
    tokens[1:]; predicting the constant sink is not a task, padding is ignored, and so is a prompt before
    `loss_start` (prepare.py)."""
    rows = [np.asarray(t, dtype=np.int64) for t in batch["tokens"]]
    longest = max(len(t) for t in rows)
    tokens = np.full((len(rows), min(seq_len, -(-longest // 8) * 8)), pad_id, dtype=np.int64)
    for i, t in enumerate(rows):
        tokens[i, :len(t)] = t[:seq_len]
    tokens = torch.from_numpy(tokens).to(device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:].clone()
    targets[targets == pad_id] = IGNORE
    targets[:, :sink_len] = IGNORE  # target j is token j+1: the rest of the sink and the context <s> are constant
    for i, start in enumerate(batch.get("loss_start", ())):  # a prompt record: the loss covers its answer only
        targets[i, :max(0, int(start) - 1)] = IGNORE
    ref_rows = None
    if "ref_rows" in batch:
        ref_rows = np.stack([np.stack([np.asarray(w, dtype=np.int64) for w in seq]) for seq in batch["ref_rows"]])
    return TrainBatch(inputs.contiguous(), targets, ref_rows)


def n_windows(seq_len: int, cfg: ModelConfig) -> int:
    """Windows of a training sequence: its seq_len - 1 input positions (paper §3.6: 2048 -> 32)."""
    return cfg.n_windows(seq_len - 1)


def memory_slots(ref_rows: np.ndarray, lookback: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lay the retrieved references out as memory slots.

    ref_rows (B, W, r) -> unique bank rows (N,), slot_ref (B, M=W*r) index into them (-1 = empty), and
    visible (B, W, M): window w reads the slots of windows w-lookback..w (paper §3.6), each reference once
    (a reference retrieved by two of those windows would otherwise take two slots of the same window)."""
    B, W, r = ref_rows.shape
    flat = ref_rows.reshape(B, W * r)  # slot m = window m // r, rank m % r
    valid = flat >= 0
    unique, inverse = np.unique(flat[valid], return_inverse=True)
    slot_ref = np.full(flat.shape, -1, dtype=np.int64)
    slot_ref[valid] = inverse
    slot_window = np.arange(W * r) // r
    w = np.arange(W)[:, None]
    in_reach = (slot_window[None] <= w) & (slot_window[None] >= w - lookback)  # (W, M)
    visible = in_reach[None] & valid[:, None, :]  # (B, W, M)
    same = (slot_ref[:, :, None] == slot_ref[:, None, :]) & valid[:, :, None]  # (B, M, M)
    earlier = np.tril(np.ones((W * r, W * r), dtype=bool), k=-1)  # earlier[m, m'] = m' < m
    shadowed = np.einsum("bwj,bmj->bwm", visible.astype(np.int32), (same & earlier[None]).astype(np.int32)) > 0
    return unique, slot_ref, visible & ~shadowed


class ReferenceTokens:
    """Bank row -> reference token ids (MemoryBank.records "tokens"), LRU-cached: neighbouring windows and sequences
    retrieve the same references often (paper §3.1). A call pads its rows to their longest (`pad_references`)."""

    def __init__(self, records, reference_len: int, pad_id: int, cache_size: int = 65536):
        self.records, self.reference_len, self.pad_id, self.cache_size = records, reference_len, pad_id, cache_size
        self.cache: OrderedDict[int, list[int]] = OrderedDict()

    def __call__(self, rows: np.ndarray) -> tuple[Tensor, Tensor]:
        missing = [int(r) for r in rows if int(r) not in self.cache]
        if missing:
            for row, rec in zip(missing, self.records(missing)):
                toks = list(rec["tokens"])
                if len(toks) > self.reference_len:
                    raise ValueError(f"bank row {row} has {len(toks)} tokens > reference_len={self.reference_len}")
                self.cache[row] = toks
        lists = []
        for r in rows:
            lists.append(self.cache[int(r)])
            self.cache.move_to_end(int(r))
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return pad_references(lists, self.reference_len, self.pad_id)


def forward_loss(model: Transformer, batch: TrainBatch, references=None, *, sink_ids: list[int], lookback: int = 4,
                 encode_grad: bool = True) -> tuple[Tensor, dict]:
    """One micro-batch: loss and statistics. With `batch.ref_rows` and `references` (rows -> padded tokens,
    lengths), references are encoded with the current weights inside this step and read by the memory layers."""
    cfg = model.cfg
    device = batch.inputs.device
    memory, stats = None, {"target_tokens": int((batch.targets != IGNORE).sum())}
    if batch.ref_rows is not None:
        unique, slot_ref, visible = memory_slots(batch.ref_rows, lookback)
        per_window = visible.sum(-1)  # (B, W) references each window reads
        stats.update(refs_per_window=float(per_window.mean()), windows_with_refs=float((per_window > 0).mean()),
                     refs_encoded=int(len(unique)), reference_tokens=0)
        if len(unique):
            tokens, lengths = references(unique)
            stats["reference_tokens"] = int(lengths.sum())
            with torch.set_grad_enabled(encode_grad and torch.is_grad_enabled()):
                sparse = encode_references(model, tokens.to(device), lengths.to(device), sink_ids)
            mems = torch.cat([sparse.memories, sparse.memories.new_zeros((1, *sparse.memories.shape[1:]))])
            n_valid = torch.cat([sparse.n_valid, sparse.n_valid.new_zeros(1)])
            index = torch.from_numpy(np.where(slot_ref >= 0, slot_ref, len(unique))).to(device)  # (B, M)
            input_pos = torch.arange(batch.inputs.shape[1], device=device).expand_as(batch.inputs)
            memory = MemoryBatch.from_references(mems[index], n_valid[index], torch.from_numpy(visible).to(device),
                                                 input_pos, cfg)
    logits = model(batch.inputs, memory=memory)
    return cross_entropy(logits, batch.targets, ignore_index=IGNORE), stats


# ---------------------------------------------------------------- checkpoint helpers
def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def load_init_weights(model: Transformer, uri: str) -> None:
    """Weights of an exported checkpoint (model.checkpoint layout; local or s3://) into `model`."""
    from safetensors.torch import load as load_safetensors

    from bank import storage
    from model.checkpoint import WEIGHTS

    state = load_safetensors(storage.read_bytes(storage.join(uri, WEIGHTS)))
    if model.cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state)


def skip_cpu_inference_allreduce() -> None:
    """DeepSpeed's CPU backend JIT-builds (g++) a shared-memory all-reduce on init that only its inference path uses.
    That build waits forever on the lock file an interrupted build leaves (Ctrl-C during a first run hung every later
    run), so CPU training marks the op unavailable; gradients reduce over Ray's gloo group either way."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _maybe_fail(config: dict, step: int, rank: int, world: int) -> None:
    """Test hook for FailureConfig: one worker dies once at `fail_at_step` (a marker file makes it once)."""
    if config.get("fail_at_step") is None or step != int(config["fail_at_step"]) or rank != min(1, world - 1):
        return
    from bank import storage

    marker = storage.join(config["fail_marker_dir"], f".fail_at_step_{step}")
    if not storage.exists(marker):
        storage.write_text(marker, f"rank {rank} exited at step {step}\n")
        os._exit(1)


# ---------------------------------------------------------------- the loop
def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker. `config` is plain data built by pipelines/train.py."""
    import deepspeed
    import ray.train
    import torch.distributed as dist
    from ray.train import Checkpoint

    t_start = time.perf_counter()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    torch.manual_seed(config["seed"])
    np.random.seed(config["seed"])
    random.seed(config["seed"])
    mcfg = ModelConfig.from_dict(config["model"])
    ds, optim = config["deepspeed"], config["optim"]
    device = torch.device("cuda", torch.cuda.current_device()) if config["use_gpu"] else torch.device("cpu")

    with device:  # built where it trains (a 2.4B random init takes a minute on CPU); same seed: same on every rank
        model = Transformer(mcfg)
    if config.get("init"):
        load_init_weights(model, config["init"])
    optimizer = torch.optim.AdamW(param_groups(model, optim["weight_decay"]), lr=optim["lr"],
                                  betas=tuple(optim["betas"]), eps=optim["eps"])
    schedule = functools.partial(wsd_lr_factor, max_steps=config["max_steps"], warmup_steps=optim["warmup_steps"],
                                 decay_fraction=optim["decay_fraction"], min_lr_ratio=optim["min_lr_ratio"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    if not config["use_gpu"]:  # just before deepspeed.initialize, which probed the ops here before
        skip_cpu_inference_allreduce()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(ds))
    state = {"step": 0, "epoch": 0, "micro": 0}  # micro: micro-batches consumed in the current epoch
    history: list[dict] = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config["resume_from"]:  # uploaded but never registered by Ray Train (train.py)
        from pipelines.prepare import arrow_filesystem

        fs, path = arrow_filesystem(config["resume_from"])
        checkpoint = Checkpoint(path, filesystem=fs)
    if checkpoint:
        with checkpoint.as_directory() as d:
            _, client = engine.load_checkpoint(d, tag=DS_TAG)
            state = dict(client["train_state"])
            set_rng_state(torch.load(os.path.join(d, f"rng_rank{rank}.pt"), weights_only=False))
            with open(os.path.join(d, METRICS_FILE)) as f:
                history = [json.loads(line) for line in f if line.strip()]

    since_step = state["step"]  # where this worker group started: 0, or the checkpoint it resumed from
    references = None
    continual = config["stage"] == "continual"
    if continual:
        from bank.reader import MemoryBank

        bank = MemoryBank.open(config["bank"])
        references = ReferenceTokens(bank.records, mcfg.reference_len, config["pad_id"])
    gauges = _metric_instruments() if rank == 0 else None
    mem = config["memory"]
    seq_len, mb, ga = config["seq_len"], int(ds["micro_batch"]), int(ds["grad_accum"])
    shard = ray.train.get_dataset_shard("train")

    def save(metrics: dict) -> None:
        tmp = tempfile.mkdtemp(prefix=f"memory3-ckpt-r{rank}-")
        engine.save_checkpoint(tmp, tag=DS_TAG, client_state={"train_state": dict(state)})
        torch.save(rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
        if rank == 0:
            with open(os.path.join(tmp, METRICS_FILE), "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in history)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"step_{state['step']:08d}")
        shutil.rmtree(tmp, ignore_errors=True)

    acc = _Accumulator()
    last_saved = state["step"] if checkpoint else -1
    t_step = time.perf_counter()
    setup_seconds = t_step - t_start  # model, DeepSpeed, restore: reported with the first step of this process
    while state["step"] < config["max_steps"]:
        batches = shard.iter_batches(batch_size=mb, drop_last=True, batch_format="numpy",
                                     local_shuffle_buffer_size=config["shuffle_buffer"] or None,
                                     local_shuffle_seed=config["seed"] + state["epoch"])
        consumed = 0
        for i, raw in enumerate(batches):
            consumed = i + 1
            if i < state["micro"]:  # resume mid-epoch: the order is deterministic, skip what was trained
                continue
            batch = collate(raw, seq_len, config["pad_id"], mcfg.sink_len, device)
            loss, stats = forward_loss(engine.module, batch, references, sink_ids=config["sink_ids"],
                                       lookback=mem["lookback"], encode_grad=mem["encode_grad"])
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            lr = engine.get_lr()[0]
            engine.step()
            state["micro"] = i + 1
            acc.add(loss.item(), stats)
            if not boundary:
                continue
            state["step"] += 1
            row = acc.reduce(dist, world, device)
            seconds = time.perf_counter() - t_step
            t_step = time.perf_counter()
            grad_norm = engine.get_global_grad_norm()
            row.update(step=state["step"], since_step=since_step, epoch=state["epoch"], lr=lr, stage=config["stage"],
                       grad_norm=float(grad_norm) if grad_norm is not None else None, seconds=seconds,
                       tokens_per_second=row["tokens"] / max(seconds, 1e-9))
            if setup_seconds is not None:
                row["setup_seconds"], setup_seconds = round(setup_seconds, 3), None
            history.append(row)
            if gauges:
                gauges["loss"].set(row["loss"])
                gauges["tps"].set(row["tokens_per_second"])
                gauges["steps"].inc()
            if rank == 0:
                console.set_progress(PROGRESS_KEY, state["step"])
            _maybe_fail(config, state["step"], rank, world)
            done = state["step"] >= config["max_steps"]
            if done or state["step"] % config["checkpoint_every"] == 0:
                save(row)
                last_saved = state["step"]
            elif state["step"] % config["report_every"] == 0:
                ray.train.report(row)
            if done:
                break
        else:
            if consumed == 0:
                raise ValueError("this worker's data shard yields no micro-batch: fewer sequences than "
                                 "num_workers * micro_batch")
            state["epoch"] += 1
            state["micro"] = 0
            continue
        break
    if last_saved != state["step"]:
        save(history[-1] if history else {})


class _Accumulator:
    """Sums micro-batch losses/statistics until an optimizer step, then averages over micro-batches and ranks."""

    KEYS = ("refs_per_window", "windows_with_refs", "refs_encoded", "reference_tokens")

    def __init__(self):
        self.reset()

    def reset(self):
        self.loss, self.n, self.tokens, self.sums = 0.0, 0, 0, {k: 0.0 for k in self.KEYS}
        self.memory = False

    def add(self, loss: float, stats: dict):
        self.loss += loss
        self.n += 1
        self.tokens += stats["target_tokens"]
        if "refs_per_window" in stats:
            self.memory = True
            for k in self.KEYS:
                self.sums[k] += stats[k]

    def reduce(self, dist, world: int, device: torch.device) -> dict:
        """device: where the process group's backend reduces (NCCL: the worker's GPU; gloo: the CPU)."""
        values = torch.tensor([self.loss, self.n, self.tokens, *self.sums.values()], dtype=torch.float64, device=device)
        if world > 1 and dist.is_initialized():
            dist.all_reduce(values)
        loss, n, tokens, *rest = values.tolist()
        row = {"loss": loss / n, "tokens": int(tokens)}
        if self.memory:
            row.update({k: v / n for k, v in zip(self.KEYS[:2], rest[:2])})
            row.update({k: int(v) for k, v in zip(self.KEYS[2:], rest[2:])})
        self.reset()
        return row


def _metric_instruments() -> dict:
    """The train metrics named in common.md (Prometheus shows them with a `ray_` prefix)."""
    from ray.util.metrics import Counter, Gauge

    return {"loss": Gauge("memory3_train_loss", description="training loss of the last optimizer step"),
            "tps": Gauge("memory3_train_tokens_per_second", description="trained tokens per second, all workers"),
            "steps": Counter("memory3_train_steps_total", description="optimizer steps taken")}
