"""`memory3 train`: two-stage pretraining (paper §3.6) as one Ray Train `TorchTrainer` with DeepSpeed workers.

Stage 1, `stage=warmup`: plain LM pretraining, no memory. Stage 2, `stage=continual init=<warmup checkpoint>
bank=<bank>`: the same loop, but every training window reads references retrieved for it, encoded inside each
step with the live weights (pipelines/train_loop.py). Training with memory from scratch teaches the model to
ignore memory; continuing a memory-less checkpoint with memory works (paper §3.6, Fig. 11), hence two stages.

The driver checks everything (data, tokenizer, init shape, bank) before any step, precomputes the retrieval
(pipelines/retrieval_assign.py, a Ray Data pass), runs the trainer (checkpoints in <storage_path>/<run_name>,
resumable, FailureConfig restarts), then exports <out>/final (model.checkpoint format: serving and evaluation load
it), <out>/metrics.jsonl, <out>/loss.png and <out>/train_summary.json.
"""
from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field

import torch
from omegaconf import OmegaConf

from bank import storage
from configs import model_config, typed
from configs.schema import TrainConfig, TrainMemorySettings
from model.checkpoint import CONFIG, TOKENIZER, WEIGHTS, save_checkpoint
from model.config import ModelConfig
from model.tokenizer import Tokenizer
from model.transformer import Transformer
from pipelines import console
from pipelines.prepare import arrow_filesystem, load_manifest
from pipelines.train_loop import DS_TAG, METRICS_FILE, PROGRESS_KEY, n_windows, train_loop_per_worker

log = logging.getLogger(__name__)

# Fields that change parameter shapes or what the weights compute: a checkpoint must agree on all of them.
WEIGHT_KEYS = ("vocab_size", "n_layer", "n_head", "n_kv_head", "head_dim", "mlp_hidden", "tie_embeddings",
               "rope_theta")
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints


@dataclass
class TrainPlan:
    """Everything the run needs, validated before Ray starts a worker."""

    stage: str
    out: str
    model: ModelConfig
    manifest: dict
    data_uri: str
    tokenizer: Tokenizer
    init: str | None = None  # exported model folder the weights start from
    init_run: str | None = None  # the run folder that holds init (for its metrics.jsonl)
    bank: str | None = None
    storage_path: str = ""
    run_dir: str = ""
    resume: bool = False
    resume_from: str | None = None  # newest checkpoint found in storage (used when Ray Train has none registered)
    notes: list[str] = field(default_factory=list)


def _parent(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0] if storage.is_remote(uri) else os.path.dirname(os.path.abspath(uri))


def resolve_init(uri: str) -> tuple[str, str]:
    """(exported model folder, its run folder) from either of them."""
    if storage.exists(storage.join(uri, WEIGHTS)):
        return uri, _parent(uri)
    if storage.exists(storage.join(uri, "final", WEIGHTS)):
        return storage.join(uri, "final"), uri
    raise FileNotFoundError(f"init={uri} is not a model checkpoint (no {WEIGHTS}, nor final/{WEIGHTS})")


def check_same_weights_shape(init_cfg: ModelConfig, cfg: ModelConfig, init: str) -> None:
    diff = {k: (getattr(init_cfg, k), getattr(cfg, k)) for k in WEIGHT_KEYS if getattr(init_cfg, k) != getattr(cfg, k)}
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a} vs run {b}" for k, (a, b) in diff.items())
        raise ValueError(f"init checkpoint {init} has another model shape ({detail}); pass the matching model=...")


def plan_run(cfg: TrainConfig) -> TrainPlan:
    """Validate the request; raises ValueError/FileNotFoundError with a clear message before any training."""
    cfg = typed("train", cfg)
    stage = cfg.stage
    if stage not in ("warmup", "continual"):
        raise ValueError(f"stage={stage!r} must be warmup or continual")
    mcfg = model_config(cfg)
    data = cfg.data
    manifest = load_manifest(data)
    tokenizer = Tokenizer.from_str(storage.read_text(storage.join(data, "tokenizer.json")))
    if tokenizer.sha256 != manifest["tokenizer_sha256"]:
        raise ValueError(f"{data}/tokenizer.json does not match the tokenizer its sequences were written with "
                         "(prepare.json tokenizer_sha256); re-run `memory3 prepare`")
    if tokenizer.vocab_size > mcfg.vocab_size:
        raise ValueError(f"data tokenizer has {tokenizer.vocab_size} tokens > model vocab_size={mcfg.vocab_size}")
    if manifest["seq_len"] > mcfg.max_seq_len:
        raise ValueError(f"data sequences are up to {manifest['seq_len']} tokens > model max_seq_len="
                         f"{mcfg.max_seq_len}")
    if manifest["sink_len"] != mcfg.sink_len:
        raise ValueError(f"data sequences start with a {manifest['sink_len']}-token sink, model sink_len="
                         f"{mcfg.sink_len}")
    ds = cfg.deepspeed
    per_step = cfg.scaling.num_workers * ds.micro_batch
    if manifest["sequences"] < per_step:
        raise ValueError(f"{manifest['sequences']} sequences cannot fill one micro-batch on every worker "
                         f"(num_workers * micro_batch = {per_step})")
    for key in ("max_steps", "checkpoint_every", "report_every"):
        if cfg[key] < 1:
            raise ValueError(f"{key}={cfg[key]} must be >= 1")
    out = cfg.out
    plan = TrainPlan(stage, out, mcfg, manifest, storage.join(data, manifest["data_dir"]), tokenizer,
                     resume=cfg.resume)

    if cfg.init:
        plan.init, plan.init_run = resolve_init(cfg.init)
        init_cfg = ModelConfig.from_dict(json.loads(storage.read_text(storage.join(plan.init, CONFIG)))["model"])
        check_same_weights_shape(init_cfg, mcfg, plan.init)
        tok_uri = storage.join(plan.init, TOKENIZER)
        if not storage.exists(tok_uri):
            raise FileNotFoundError(f"init checkpoint {plan.init} has no {TOKENIZER}")
        init_tok = Tokenizer.from_str(storage.read_text(tok_uri))
        if init_tok.sha256 != tokenizer.sha256:
            raise ValueError(f"tokenizer mismatch: init checkpoint {plan.init} and data {data} were tokenized "
                             "differently (prepare the data with tokenizer=<the checkpoint's tokenizer.json>)")
    if stage == "continual":
        if not plan.init:
            raise ValueError("stage=continual needs init=<warmup checkpoint> (training with memory from scratch "
                             "teaches the model to ignore memory, paper §3.6)")
        if not cfg.bank:
            raise ValueError("stage=continual needs bank=<memory bank uri>")
        plan.bank = cfg.bank
        check_memory_slots(mcfg, cfg.memory)
        check_bank(plan)
    elif cfg.bank:
        raise ValueError("bank= is read by stage=continual only; the warmup stage trains without memory")

    plan.storage_path = cfg.storage_path or out
    plan.run_dir = storage.join(plan.storage_path, cfg.run_name)
    newest = newest_checkpoint(plan.run_dir, cfg.scaling.num_workers)
    if storage.exists(storage.join(plan.run_dir, SNAPSHOT)) or newest:
        if not plan.resume:
            raise ValueError(f"{plan.run_dir} already holds a run: pass resume=true to continue it, or another out")
        plan.resume_from = newest
    elif plan.resume:
        plan.notes.append(f"resume=true but {plan.run_dir} holds no checkpoint yet: starting from step 0")
    return plan


def check_memory_slots(model: ModelConfig, memory: TrainMemorySettings) -> None:
    """A training window reads its own references and those of `lookback` earlier windows (paper §3.6: 1 x (1 + 4)
    = 5); decoding gives a window the model's refs_per_window slots. Training must not teach more memories per
    window than decoding can give it."""
    windows = n_windows(model.max_seq_len, model)
    reads = memory.refs_per_window * min(1 + memory.lookback, windows)
    if reads > model.refs_per_window:
        raise ValueError(f"memory.refs_per_window={memory.refs_per_window} x (1 + memory.lookback={memory.lookback}, "
                         f"at most {windows} windows) = {reads} memories per training window > the model's "
                         f"refs_per_window={model.refs_per_window} decode slots; lower memory.refs_per_window or "
                         f"memory.lookback, or raise model.refs_per_window")
    if model.memory_positions == "ranked" and (memory.lookback or memory.refs_per_window != model.refs_per_window):
        raise ValueError(f"model.memory_positions=ranked places a window's memories by retrieval rank, as decoding "
                         f"does: it needs memory.lookback=0 and memory.refs_per_window=model.refs_per_window="
                         f"{model.refs_per_window} (got {memory.lookback} and {memory.refs_per_window}), e.g. "
                         f"memory.lookback=0 memory.refs_per_window={model.refs_per_window}")


def newest_checkpoint(run_dir: str, world_size: int) -> str | None:
    """The newest step_* checkpoint folder of a run that every rank finished uploading. Ray Train resumes from the
    checkpoints its controller registered (its snapshot file), but a run killed right after the workers uploaded
    a checkpoint can leave one that was never registered, or no snapshot at all: the loop falls back to this."""
    if not storage.exists(run_dir):
        return None
    for name in sorted((n for n in storage.listdir(run_dir) if n.startswith("step_")), reverse=True):
        names = set(storage.listdir(storage.join(run_dir, name)))
        if {METRICS_FILE, DS_TAG} | {f"rng_rank{r}.pt" for r in range(world_size)} <= names:
            return storage.join(run_dir, name)
    return None


def check_bank(plan: TrainPlan) -> None:
    """The bank must exist, be written with the data's tokenizer, and hold references the model can encode."""
    if not storage.exists(plan.bank):
        raise FileNotFoundError(f"memory bank {plan.bank} does not exist (build it with `memory3 encode`)")
    from bank.reader import MemoryBank

    bank = MemoryBank.open(plan.bank, expect_tokenizer_sha=plan.tokenizer.sha256)
    if bank.config.reference_len > plan.model.reference_len:
        raise ValueError(f"bank {plan.bank} holds references of up to {bank.config.reference_len} tokens > model "
                         f"reference_len={plan.model.reference_len}")
    if len(bank) == 0:
        raise ValueError(f"memory bank {plan.bank} is empty")


def refuse_if_starved(cfg: TrainConfig, count: int, cpus_each: float, keys: tuple[str, str], what: str) -> None:
    """`check_cpus_left` on the Ray cluster joined. A local Ray instance's CPUs are all there will be: refuse a run
    that would wait forever. A cluster may add nodes when asked (autoscaling): go on, and say why it may wait."""
    import ray

    from pipelines.ray_runtime import check_cpus_left

    problem = check_cpus_left(count, cpus_each, ray.cluster_resources().get("CPU", 0), keys=keys, what=what)
    if problem and not (cfg.ray_address or os.environ.get("RAY_ADDRESS")):
        raise ValueError(problem)
    if problem:
        log.warning("%s (unless the cluster adds nodes)", problem)


def worker_env(cfg: TrainConfig) -> dict:
    """The driver's S3 settings plus what CPU workers need, for the train workers' runtime_env."""
    env = storage.aws_env()
    if not cfg.scaling.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def build_dataset(plan: TrainPlan, cfg: TrainConfig, env: dict):
    """Training rows as a Ray Dataset, in a deterministic order so a resumed or restarted run sees the same one.

    warmup: the prepared Parquet. continual: the prepared rows plus `ref_rows`, computed once by the retrieval
    pass and written to <out>/retrieval-<key>/ (reused by a resumed run with the same data, bank and settings).
    Returns the dataset and the retrieval pass's cost and statistics."""
    import ray

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    uri, info = plan.data_uri, {}
    if plan.stage == "continual":
        uri, info = precompute_retrieval(plan, cfg, env)
    fs, path = arrow_filesystem(uri)
    files = parquet_files(fs, path)
    if sum(size for _, size in files) <= cfg.in_memory_max_mb * 2**20:
        # Small enough to hold: the driver reads it once, one block per file. Every epoch's split then starts at
        # once; a lazy read launches its listing and read tasks again each epoch, and on a busy 2-core box their
        # new worker processes took 10 s of the first step.
        import pyarrow.parquet as pq

        ds = ray.data.from_arrow([pq.read_table(f, filesystem=fs) for f, _ in files])
    else:
        ds = ray.data.read_parquet(path, filesystem=fs)
    # Global order: a seeded block order here plus each worker's seeded local shuffle buffer every epoch
    # (train_loop); a full random_shuffle would move every row through the object store on every run.
    return ds.randomize_block_order(seed=cfg.seed), info


def parquet_files(fs, path: str) -> list[tuple[str, int]]:
    """(path, bytes) of every Parquet file under `path`, in name order."""
    import pyarrow.fs as pafs

    infos = (fs or pafs.LocalFileSystem()).get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted((i.path, i.size) for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))


def precompute_retrieval(plan: TrainPlan, cfg: TrainConfig, env: dict) -> tuple[str, dict]:
    """Run (or reuse) the retrieval pass; returns the folder of assigned rows and its statistics."""
    import hashlib

    import ray

    from bank.reader import MemoryBank
    from pipelines import retrieval_assign

    mem = cfg.memory
    windows = n_windows(plan.model.max_seq_len, plan.model)
    key = {"data": plan.data_uri, "tokenizer": plan.tokenizer.sha256, "bank": plan.bank,
           "bank_manifest": hashlib.sha256(json.dumps(MemoryBank.open(plan.bank).manifest, sort_keys=True,
                                                      default=str).encode()).hexdigest(),
           "windows": windows, "window": plan.model.window, "sink_len": plan.model.sink_len,
           "memory": {k: OmegaConf.to_container(mem)[k] for k in
                      ("refs_per_window", "candidates", "overlap_threshold", "embedder")}}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = storage.join(plan.out, f"retrieval-{digest}")
    done = storage.join(folder, "_done.json")
    if storage.exists(done):
        return folder, {**json.loads(storage.read_text(done))["stats"], "reused": True}
    storage.remove(folder)
    refuse_if_starved(cfg, mem.retrieval_actors, mem.retrieval_cpus,
                      ("memory.retrieval_actors", "memory.retrieval_cpus"), "the retrieval pass")
    fs, path = arrow_filesystem(plan.data_uri)
    t0 = time.perf_counter()
    assigned = retrieval_assign.assign_references(
        ray.data.read_parquet(path, filesystem=fs), bank_uri=plan.bank, tokenizer_json=plan.tokenizer.to_str(),
        cfg=plan.model, n_windows=windows, refs_per_window=mem.refs_per_window,
        candidates=mem.candidates, overlap_threshold=mem.overlap_threshold, embedder=mem.embedder,
        actors=mem.retrieval_actors, cpus_per_actor=mem.retrieval_cpus, batch_size=mem.retrieval_batch,
        gpus_per_actor=mem.retrieval_gpus, env_vars=env)
    out_fs, out_path = arrow_filesystem(folder)
    assigned.write_parquet(out_path, filesystem=out_fs)
    seconds = time.perf_counter() - t0
    stats = retrieval_assign.assignment_stats(ray.data.read_parquet(out_path, filesystem=out_fs), windows)
    stats.update(mode="precomputed: Ray Data pass with a Retriever actor pool, before training", folder=folder,
                 seconds=round(seconds, 3), windows_per_second=round(stats["windows"] / max(seconds, 1e-9), 2))
    storage.write_text(done, json.dumps({"key": key, "stats": stats}, indent=2))
    return folder, {**stats, "reused": False}


def loop_config(plan: TrainPlan, cfg: TrainConfig) -> dict:
    c = OmegaConf.to_container(cfg, resolve=True)
    return {
        "stage": plan.stage, "model": plan.model.to_dict(), "init": plan.init, "bank": plan.bank,
        "seed": cfg.seed, "max_steps": cfg.max_steps, "checkpoint_every": cfg.checkpoint_every,
        "report_every": cfg.report_every, "shuffle_buffer": cfg.shuffle_buffer,
        "seq_len": plan.model.max_seq_len, "pad_id": plan.tokenizer.pad_id, "sink_ids": plan.tokenizer.sink_ids,
        "deepspeed": c["deepspeed"], "optim": c["optim"], "memory": c["memory"],
        "use_gpu": cfg.scaling.use_gpu, "threads": max(1, int(cfg.scaling.cpus_per_worker)),
        "fail_at_step": cfg.fail_at_step, "fail_marker_dir": plan.out, "resume_from": plan.resume_from,
    }


def make_trainer(plan: TrainPlan, cfg: TrainConfig, dataset, env: dict):
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    sc = cfg.scaling
    resources = {"CPU": sc.cpus_per_worker}
    if sc.use_gpu:
        resources["GPU"] = 1
    fs, path = arrow_filesystem(plan.storage_path)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config(plan, cfg),
        scaling_config=ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo"),
        run_config=RunConfig(name=cfg.run_name, storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                             worker_runtime_env={"env_vars": env}),
        datasets={"train": dataset},
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
    )


def exported_state_dict(checkpoint_dir: str, zero_stage: int) -> dict:
    """Model weights from a DeepSpeed checkpoint: the module states (ZeRO 0-2 keep full weights there), or the
    fp32 partitions gathered back together (ZeRO-3)."""
    if zero_stage >= 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=DS_TAG)
    states = torch.load(os.path.join(checkpoint_dir, DS_TAG, "mp_rank_00_model_states.pt"), map_location="cpu",
                        weights_only=False)
    return states["module"]


def export_final(plan: TrainPlan, state: dict, meta: dict) -> str:
    """<out>/final in model.checkpoint format (safetensors + config + tokenizer), uploaded when out is remote."""
    model = Transformer(plan.model)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    dest = storage.join(plan.out, "final")
    if not storage.is_remote(plan.out):
        save_checkpoint(dest, model, plan.tokenizer, meta)
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        local = save_checkpoint(os.path.join(tmp, "final"), model, plan.tokenizer, meta)
        for name in (WEIGHTS, CONFIG, TOKENIZER):
            storage.write_bytes(storage.join(dest, name), (local / name).read_bytes())
    return dest


def read_metrics(uri: str) -> list[dict]:
    if not storage.exists(uri):
        return []
    return [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]


def plot_loss(history: list[dict], warmup: list[dict], stage: str) -> bytes:
    """Loss per optimizer step; a continual run also draws the warmup run it started from."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    offset = 0
    if warmup:
        ax.plot([r["step"] for r in warmup], [r["loss"] for r in warmup], label="warmup (no memory)")
        offset = warmup[-1]["step"]
    label = "continual (with memory)" if stage == "continual" else stage
    ax.plot([offset + r["step"] for r in history], [r["loss"] for r in history], label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("Memory³ two-stage pretraining")
    ax.legend()
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def main(cfg: TrainConfig) -> int:
    """`memory3 train ...`; prints the run summary as one JSON line."""
    console.say(json.dumps(train(cfg)))
    return 0


def train(cfg: TrainConfig) -> dict:
    """Run a stage end to end; returns the summary also written to <out>/train_summary.json."""
    from pipelines.ray_runtime import ensure_ray

    t0 = time.time()
    cfg = typed("train", cfg)
    plan = plan_run(cfg)
    for note in plan.notes:
        console.say(f"memory3 train: {note}")
    ensure_ray(cfg.ray_address)
    refuse_if_starved(cfg, cfg.scaling.num_workers, cfg.scaling.cpus_per_worker,
                      ("scaling.num_workers", "scaling.cpus_per_worker"),
                      "training (its workers stream their rows from Ray Data)")
    env = worker_env(cfg)
    timings = {"validate_and_start": time.time() - t0}
    with console.stage(f"train {plan.stage}") as line:
        dataset, retrieval = build_dataset(plan, cfg, env)
        timings["dataset"] = time.time() - t0 - sum(timings.values())
        line.follow(PROGRESS_KEY, total=cfg.max_steps, unit="steps")
        result = make_trainer(plan, cfg, dataset, env).fit()
        if result.error:
            raise result.error
        timings["fit"] = time.time() - t0 - sum(timings.values())
        with result.checkpoint.as_directory() as d:
            history = read_metrics(os.path.join(d, METRICS_FILE))
            state = exported_state_dict(d, cfg.deepspeed.zero_stage)
        last = history[-1] if history else {}
        meta = {"stage": plan.stage, "steps": last.get("step"), "loss": last.get("loss"), "init": plan.init,
                "bank": plan.bank, "data": cfg.data, "tokenizer_sha256": plan.tokenizer.sha256}
        final = export_final(plan, state, meta)
        storage.write_text(storage.join(plan.out, METRICS_FILE), "".join(json.dumps(r) + "\n" for r in history))
        warmup = read_metrics(storage.join(plan.init_run, METRICS_FILE)) if plan.init_run and plan.stage == "continual" \
            else []
        storage.write_bytes(storage.join(plan.out, "loss.png"), plot_loss(history, warmup, plan.stage))
        summary = {"stage": plan.stage, "out": plan.out, "final": final, "checkpoint": result.checkpoint.path,
                   "steps": last.get("step"), "loss": last.get("loss"), "first_loss": history[0]["loss"] if history else None,
                   "retrieval": retrieval, "seconds": round(time.time() - t0, 2),
                   "step_seconds": sum(r["seconds"] for r in history[1:]) / max(1, len(history) - 1),
                   "phases": {k: round(v, 2) for k, v in timings.items()}, "notes": plan.notes}
        line.done(f"loss {summary['first_loss']:.3f} -> {summary['loss']:.3f}" if history else "no steps")
    storage.write_text(storage.join(plan.out, "train_summary.json"), json.dumps(summary, indent=2))
    return summary
