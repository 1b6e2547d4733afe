"""One typed config per `memory3` command: field types, required keys (MISSING) and a docstring per field.

`configs/<command>.yaml` holds the documented defaults; `configs.load_config` merges it and the `key=value`
overrides over these dataclasses (`OmegaConf.structured`), so an unknown key or a value of the wrong type is an
error that names the key, and a job reads `cfg.batch_size` as an int without casting it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from model.config import ModelConfig
from model.quantizer import DEFAULT_KERNEL


# --- bank and retrieval ----------------------------------------------------------------------------------------

@dataclass
class IndexSettings:
    """The FAISS retrieval index of a bank (bank/index.py)."""

    factory: str = "Flat"
    """FAISS factory over normalised embeddings: Flat = exact cosine; e.g. IVF4096,PQ32 for large banks."""
    nprobe: int = 16
    """IVF lists searched per query."""
    refine_k_factor: int = 10
    """With a Refine stage in the factory (e.g. IVF4096,PQ32,Refine(SQ8)): candidates re-scored per result."""
    use_gpu: Any = "auto"
    """Train the index on GPU: auto (when FAISS sees one), true or false."""
    train_size: int = 200_000
    """Embeddings sampled to train IVF/PQ indexes."""
    shards: int = 1
    """> 1: the index split by bank row ranges into this many shards sharing one trained template (docs/scale.md)."""


@dataclass
class IndexConfig(IndexSettings):
    """`memory3 index bank=...`."""

    bank: str = MISSING
    """Bank folder or s3:// URI."""
    rebuild: bool = False
    """Rebuild from all embeddings instead of adding/removing rows."""


@dataclass
class BankConfig:
    """`memory3 bank verify|info|delete|compact bank=...`."""

    bank: str = MISSING
    """Bank folder or s3:// URI."""
    ids: List[str] = field(default_factory=list)
    """Reference ids to tombstone (`delete`)."""
    ray_address: Optional[str] = None
    """Ray to join for `compact` (null: RAY_ADDRESS or a new local instance)."""
    task_num_cpus: float = 1.0
    """CPUs per shard-rewrite task of `compact` (each reads and writes one shard)."""
    action: Optional[str] = None
    """The word after the command: verify, info, delete or compact."""


@dataclass
class EncodeConfig:
    """`memory3 encode corpus=... bank=... checkpoint=...` (pipelines/encode.py)."""

    corpus: str = MISSING
    """JSONL/Parquet documents: a file or a folder, local or s3://."""
    bank: str = MISSING
    """Output bank folder, local or s3://; an existing bank gets only the new documents."""
    checkpoint: str = MISSING
    """Checkpoint whose memory layers write the memories (local or s3://)."""
    ray_address: Optional[str] = None
    """Ray to join (null: RAY_ADDRESS or a new local instance)."""
    shard_documents: int = 256
    """Documents per shard; fixed for the life of a bank."""
    quantizer: Optional[str] = "auto"
    """auto: the paper's codec scaled to head_dim for GPU-sized models, bf16 for CPU models (the tiny preset), an
    existing bank's own codec; null: bf16; else a FAISS factory string (paper App. B)."""
    quantizer_sample: int = 512
    """References (first in corpus order) whose memories train the quantizer."""
    quantizer_kernel: str = DEFAULT_KERNEL
    """GPU: the nearest-centroid kernel's precision (tf32x3 | ieee | tf32); tf32 is 2.4x faster at the same error."""
    quantizer_threads: int = 0
    """FAISS threads that train the codebooks (0: every core of the node; the training runs alone, before any
    encoding: single-threaded, the 16,384-centroid k-means of a Residual2x14 level takes many minutes)."""
    embedder: Optional[str] = None
    """Retrieval embedder: null = all-MiniLM-L6-v2, or a sentence-transformers folder."""
    embed_batch_size: int = 64
    """Texts per embedder forward pass."""
    embeddings_from: Optional[str] = None
    """A bank of the same corpus (e.g. written by earlier weights) whose retrieval embeddings are reused for shards
    with the same references: they depend on the text, not on the model, so re-encoding after training only
    recomputes memories (paper Remark 9)."""
    actors: int = 2
    """Encoder actors in the Ray Data actor pool."""
    actor_num_cpus: float = 0.5
    """CPUs per encoder actor."""
    num_gpus: float = 0
    """GPUs per encoder actor."""
    task_num_cpus: float = 0.25
    """CPUs per read/chunk task."""
    batch_size: int = 32
    """References per encoder forward pass."""
    device: str = "auto"
    """auto (cuda when num_gpus > 0), cpu or cuda."""
    dtype: str = "auto"
    """auto (bf16 on GPU, float32 on CPU), float32, bfloat16 or float16."""
    compile: Any = "auto"
    """torch.compile the encoder: auto (on CUDA devices; eager on CPU), true or false."""
    overlap_writes: bool = True
    """Each encoder actor writes one part (host copy, pack, embed, write) while the next part encodes."""
    torch_threads: int = 1
    """torch/FAISS threads per actor."""
    max_restarts: int = -1
    """Times Ray restarts a dead encoder actor (-1: always)."""
    max_task_retries: int = -1
    """Times a part is retried after its actor died (-1: always)."""
    forward_aws_env: bool = True
    """Pass the driver's AWS_* settings to the Ray workers."""
    build_index: bool = True
    """Build (or update) the retrieval index at the end; false: later with `memory3 index` (no FAISS needed for
    bf16 banks)."""
    index: IndexSettings = field(default_factory=IndexSettings)
    """The retrieval index built at the end."""


@dataclass
class InfoConfig:
    """`memory3 info`: what a model shape costs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """A preset in configs/model/ or its fields."""
    quantizer: str = "auto"
    """FAISS factory string of the memory vector quantizer; auto: the one `memory3 encode` picks for this head_dim
    (the paper's `OPQ20_80,Residual2x14,PQ8x10` for 2.4b)."""
    references: int = 110_000_000
    """Bank size to report."""


# --- data --------------------------------------------------------------------------------------------------------

@dataclass
class CorpusConfig:
    """`memory3 corpus geo out=DIR`: the bundled real-facts corpus."""

    out: str = MISSING
    """Output folder."""
    seed: int = 0
    """One seeded RNG: same seed and sizes give byte-identical files."""
    n_trained: int = 2000
    """Cities whose facts are in the warmup training text."""
    n_continual: int = 0
    """Cities whose questions train stage 2; their facts only in the bank."""
    n_memory_only: int = 300
    """Cities whose facts exist only in the bank."""
    n_reading: int = 0
    """Cities seen only in warmup reading examples: reference texts with distractors, a question, its answer."""
    n_counterfactual: int = 0
    """Trained cities whose bank reference states another country; stage 2 answers from the bank."""
    distractors: int = 2
    """Other cities' references beside the right one in each reading example."""
    questions_per_city: int = 2
    """Training questions per city: its country and others drawn from continent, time zone, population."""
    min_population: int = 15000
    """Smallest city considered."""
    layout: str = "varied"
    """City references: 'varied' templates in random order, 'fixed' (one order, the city first) or 'named' (fixed,
    the city named in every sentence)."""
    reading_loss: str = "answer"
    """Reading examples train on 'answer' only or on 'all' their tokens (references and question too)."""
    reading_distractors: str = "random"
    """Reading examples' other references: 'random' reading cities or 'lookalike' (names sorted nearest)."""
    reading_any_country: float = 0.0
    """Share of reading cities placed in a random country, so warmup copies every country name from a text."""
    continual_any_country: float = 0.0
    """Share of continual cities placed in a random country, so stage 2 copies every country name from memory."""
    continual_any_timezone: float = 0.0
    """Share of continual cities given a random time zone (and asked it), so stage 2 copies zones from memory."""
    reading_variants: int = 1
    """Reading examples per reading city and question; repeats change all four facts, so a model that can learn its
    reading cities by heart still has to read."""
    action: Optional[str] = None
    """The word after the command: geo."""


@dataclass
class PrepareConfig:
    """`memory3 prepare corpus=... out=...` (pipelines/prepare.py)."""

    corpus: str = MISSING
    """JSONL or Parquet documents: a file or a folder, local or s3://."""
    out: str = MISSING
    """Output folder (local or s3://)."""
    tokenizer: Optional[str] = None
    """An existing tokenizer.json to reuse."""
    vocab_size: Optional[int] = None
    """BPE vocabulary when training a tokenizer; null = model.vocab_size."""
    tokenizer_docs: int = 200_000
    """At most this many valid documents train the tokenizer."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model preset or fields: max_seq_len sets the sequence length, vocab_size the ceiling."""
    pack: bool = True
    """Pack documents into max_seq_len sequences; false: one document per sequence."""
    source_field: Optional[str] = "source_id"
    """Record field naming the source document (leakage filter, paper §3.6)."""
    batch_docs: int = 512
    """Documents per Ray Data batch."""
    num_cpus: float = 0.5
    """CPUs per tokenize task."""
    ray_address: Optional[str] = None
    """Ray cluster to join."""


# --- training ----------------------------------------------------------------------------------------------------

@dataclass
class ScalingSettings:
    num_workers: int = 2
    """Data-parallel workers (one per GPU on a cluster)."""
    use_gpu: bool = False
    """One GPU per worker and NCCL; false: CPU workers over gloo."""
    cpus_per_worker: float = 0.5
    """CPUs reserved per worker (torch threads = max(1, floor))."""


@dataclass
class DeepSpeedSettings:
    zero_stage: int = 2
    """ZeRO stage 0-3."""
    bf16: bool = False
    """bf16 parameters/activations with fp32 optimizer states; false = fp32."""
    micro_batch: int = 4
    """Sequences per worker per micro-step."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    gradient_clipping: float = 1.0
    """Global grad-norm clip."""


@dataclass
class OptimSettings:
    lr: float = 3.0e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.01
    """LR at the end of the decay phase, relative to lr."""
    warmup_steps: int = 20
    """Linear ramp steps."""
    decay_fraction: float = 0.1
    """Last fraction of max_steps that decays (warmup-stable-decay, paper §5.1)."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices."""
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    eps: float = 1.0e-8
    """AdamW epsilon."""


@dataclass
class TrainMemorySettings:
    """Continual stage: which references each training window reads (paper §3.6)."""

    refs_per_window: int = 1
    """References retrieved for each training window (paper §3.6: 1). Not the model's refs_per_window: a window
    reads these of its own and of `lookback` earlier windows, which must fit the model's decode slots."""
    lookback: int = 4
    """A window also reads the references of this many previous windows (paper §3.6: 4)."""
    candidates: int = 8
    """Neighbours fetched per window before the leakage filter picks refs_per_window."""
    overlap_threshold: float = 0.9
    """Drop a reference whose eq. 6 overlap with the training sequence exceeds this."""
    encode_grad: bool = True
    """Backpropagate through the real-time reference encoding."""
    embedder: Optional[str] = None
    """Retrieval embedder (null: the bank's default)."""
    retrieval_actors: int = 1
    """Retriever actors in the precompute pass."""
    retrieval_cpus: float = 0.5
    """CPUs per retrieval actor."""
    retrieval_gpus: float = 0
    """GPUs per retrieval actor (> 0: the embedder runs there; the pass ends before training takes the GPUs)."""
    retrieval_batch: int = 512
    """Sequences per retrieval batch."""


@dataclass
class TrainConfig:
    """`memory3 train stage=warmup|continual data=... out=...` (pipelines/train.py)."""

    stage: str = "warmup"
    """warmup: no memory (stage 1) | continual: retrieved references encoded in each step (stage 2)."""
    data: str = MISSING
    """Prepared folder from `memory3 prepare`."""
    out: str = MISSING
    """Output folder (local or s3://)."""
    init: Optional[str] = None
    """Checkpoint to start from (continual needs one)."""
    bank: Optional[str] = None
    """Continual: memory bank uri, for retrieval and reference tokens."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model preset or fields."""
    resume: bool = False
    """Continue the run in storage_path/run_name from its newest checkpoint."""
    seed: int = 0
    """Model init and data order."""
    max_steps: int = 200
    """Optimizer steps of this stage."""
    checkpoint_every: int = 50
    """Steps between checkpoints (and one at the end)."""
    keep_checkpoints: int = 2
    """Newest Ray Train checkpoints kept in storage."""
    report_every: int = 10
    """Steps between ray.train.report calls."""
    storage_path: Optional[str] = None
    """Ray Train storage (local or s3://); null = out."""
    run_name: str = "checkpoints"
    """Run folder under storage_path."""
    shuffle_buffer: int = 256
    """Rows in each worker's local shuffle buffer (0 = none)."""
    in_memory_max_mb: int = 256
    """Training data up to this size is read once by the driver and held in the object store; larger streams."""
    max_failures: int = 0
    """Worker-group restarts from the last checkpoint before the run fails."""
    fail_at_step: Optional[int] = None
    """Test hook: worker rank 1 exits once after this step."""
    ray_address: Optional[str] = None
    """Ray cluster to join."""
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    memory: TrainMemorySettings = field(default_factory=TrainMemorySettings)


# --- evaluation and serving ----------------------------------------------------------------------------------------

@dataclass
class EvalConfig:
    """`memory3 eval checkpoint=... bank=... qa=...` (pipelines/evaluate.py)."""

    checkpoint: str = MISSING
    """A memory3 checkpoint folder."""
    bank: str = MISSING
    """Memory bank written with this checkpoint's weights."""
    qa: str = MISSING
    """JSONL of {"prompt", "answer", "group"}."""
    modes: List[str] = field(default_factory=lambda: ["memory", "none", "rag"])
    """Explicit memory, no memory, reference texts in the prompt."""
    groups: Optional[List[str]] = None
    """Which qa groups to score (default: all)."""
    limit_per_group: int = 200
    """Questions per group and kind of fact (0 = all)."""
    leakage_threshold: float = 0.6667
    """Drop a retrieved reference whose overlap (paper eq. 6) with the question exceeds this (paper §6: 2/3);
    1 turns the filter off."""
    refs: Optional[int] = None
    """References per window (default: the model's refs_per_window)."""
    batch_size: int = 16
    """Questions decoded together."""
    max_new_tokens: int = 16
    """Answer length limit."""
    speed_prompts: int = 8
    """Prompts timed per mode at batch 1 (0: no timing)."""
    speed_tokens: int = 32
    """Tokens generated per timed prompt."""
    device: str = "cpu"
    """Where the model decodes: cpu or cuda (retrieval embeds on the CPU either way)."""
    dtype: str = "auto"
    """Model precision: auto (bfloat16 on cuda, float32 on cpu), float32, bfloat16, float16."""
    seed: int = 0
    """Sampling seed of the evaluation."""
    out: Optional[str] = None
    """Write the full report (every answer) as JSON here."""


@dataclass
class ServeDefaults:
    memory_mode: str = "memory"
    """A request without memory_mode gets this."""
    max_tokens: int = 64
    """A request without max_tokens gets this."""


@dataclass
class ServeLimits:
    """Requests outside these are 4xx with an OpenAI-style error body."""

    max_prompt_chars: int = 32000
    """Prompt / all chat messages / one admin document, in characters."""
    max_tokens: int = 1024
    """The largest max_tokens a request may ask."""
    max_documents: int = 64
    """Documents per POST /v1/memories."""
    max_body_bytes: int = 1_000_000
    """Larger request bodies are 413s, refused before they are read."""
    snippet_chars: int = 200
    """Characters of each reference's text shown in the `memories` field."""


@dataclass
class DecodingSettings:
    """The generator deployment."""

    device: str = "cpu"
    """cpu | cuda (set deployments.generator.num_gpus too)."""
    dtype: str = "float32"
    """float32 | bfloat16 | float16."""
    max_batch_size: int = 8
    """Decode slots per generator replica."""
    retrieval_timeout_s: float = 30
    """A window's retrieval + memory load slower than this fails its request."""
    retrieval_concurrency: int = 0
    """Engine retrieval threads: a waiting request's prompt windows are retrieved on them while the batch decodes,
    and a decode window's retrieval begins on one a step before it is due (the windows due together are one
    call); 0 = max_batch_size, 1 = no thread: retrieve when due, on the engine thread."""
    torch_threads: int = 0
    """torch intra-op threads per replica; 0 = Ray's default."""
    fuse_projections: bool = True
    """Each layer's q/k/v and gate/up projections as one GEMM each (`Transformer.fuse_projections`)."""
    stream_interval_s: float = 0.05
    """After a request's first token, its tokens leave at most once per this interval (0: as soon as decoded):
    fewer Ray Serve stream items when a replica decodes hundreds of tokens/s for each of dozens of requests (each
    item holds the replica's GIL ~0.2 ms, beside the engine thread; 50 ms: 20 updates a second, BENCHMARKS.md)."""
    prefill_graphs: bool = True
    """On CUDA, prompts of up to 256 tokens are prefilled from a CUDA graph per batch and 32-token length bucket
    (captured on first use): a prefill interrupts the batch for its GPU time only; false: eager."""
    capture_at_start: bool = False
    """On CUDA, compile and capture every decode graph (batch x length bucket) before the replica takes traffic, so
    no request waits for a compilation; false: each on first use (opt-in until it has run at 2.4B: docs/serving.md)."""
    seed: Optional[int] = None
    """Sampling seed of each replica; null = from the clock."""


@dataclass
class RetrievalSettings:
    """The retriever deployment (paper §3.1)."""

    embedder: Optional[str] = None
    """sentence-transformers name or folder; null = the one the bank was indexed with."""
    device: str = "cpu"
    """Where the embedder runs."""
    max_batch_size: int = 128
    """Queries embedded and searched together (@serve.batch): a generator's whole wave of prompt windows (32
    requests x 3 windows) in one search."""
    batch_wait_s: float = 0.002
    """How long a query waits for others to batch with."""
    shard_actors: bool = True
    """A sharded index (index.shards > 1): each shard in its own Ray actor, searched in parallel; false: all shards
    in the replica's process."""
    shard_num_cpus: float = 0.5
    """CPUs per shard actor."""
    shard_strategy: str = "SPREAD"
    """Ray scheduling strategy of the shard actors: SPREAD puts them on different nodes where it can."""


@dataclass
class MemorySettings:
    cache_size: int = 4096
    """Memories kept per replica (LRU)."""
    dtype: str = "float32"
    """dtype memories travel to the generator in."""
    generator_tier: Optional[bool] = None
    """A MemoryStore inside each generator replica (decoded memories on its device, stored bytes in its host RAM),
    so memories never cross Ray; null = on when decoding.device is cuda."""
    generator_cache_size: int = 2048
    """Decoded memories the generator's tier keeps on its device (LRU)."""
    generator_host_cache_size: int = 16384
    """Stored memories (VQ codes or bf16, as on disk) its host-RAM tier keeps, with decoding.device cuda."""


@dataclass
class WriterSettings:
    """The bank writer deployment (admin API; always one replica)."""

    device: str = "cpu"
    """Where new documents are encoded into memories."""
    dtype: str = "float32"
    """Model dtype for that encoding."""
    refresh_s: float = 2.0
    """Re-read the bank manifest this often, to notice offline edits."""


@dataclass
class DeploymentSettings:
    """Ray Serve options of one deployment."""

    num_replicas: int = 1
    """Fixed replica count (when autoscaling_config is null)."""
    autoscaling_config: Optional[Dict[str, Any]] = None
    """Ray Serve autoscaling (min_replicas, max_replicas, target_ongoing_requests, ...)."""
    num_cpus: float = 0.2
    """CPUs per replica."""
    num_gpus: float = 0
    """GPUs per replica."""
    max_ongoing_requests: int = 64
    """Requests a replica takes at once; the rest wait in its queue."""


@dataclass
class ServeDeployments:
    ingress: DeploymentSettings = field(default_factory=DeploymentSettings)
    generator: DeploymentSettings = field(default_factory=DeploymentSettings)
    retriever: DeploymentSettings = field(default_factory=DeploymentSettings)
    memory_store: DeploymentSettings = field(default_factory=DeploymentSettings)
    bank_writer: DeploymentSettings = field(default_factory=DeploymentSettings)


@dataclass
class ServeConfig:
    """`memory3 serve checkpoint=...` and `serve.app:build_app(args)` (docs/serving.md)."""

    checkpoint: str = MISSING
    """Model checkpoint folder or s3:// URI."""
    bank: Optional[str] = None
    """Memory bank folder or s3:// URI; null serves without memory."""
    check_bank: bool = True
    """Refuse to start when the bank was written by other weights or tokenizer."""
    model_name: str = "memory3"
    """The "model" clients send and GET /v1/models lists."""
    admin_token: Optional[str] = None
    """Bearer token of the admin API; env MEMORY3_ADMIN_TOKEN wins; null = admin off."""
    host: str = "127.0.0.1"
    """`memory3 serve` listen address."""
    port: int = 8000
    """`memory3 serve` HTTP port."""
    app_name: str = "memory3"
    """Ray Serve application name."""
    ray_address: Optional[str] = None
    """`memory3 serve` joins this Ray cluster; null = RAY_ADDRESS, else a local Ray."""
    startup_timeout_s: float = 600
    """`memory3 serve` gives up when /healthz is not 200 within this many seconds."""
    replica_failure_retries: int = 2
    """A request whose generator replica dies before it produced text is retried this often."""
    defaults: ServeDefaults = field(default_factory=ServeDefaults)
    limits: ServeLimits = field(default_factory=ServeLimits)
    decoding: DecodingSettings = field(default_factory=DecodingSettings)
    retrieval: RetrievalSettings = field(default_factory=RetrievalSettings)
    memory: MemorySettings = field(default_factory=MemorySettings)
    writer: WriterSettings = field(default_factory=WriterSettings)
    deployments: ServeDeployments = field(default_factory=ServeDeployments)
    action: Optional[str] = None


@dataclass
class QuickstartConfig:
    """`memory3 quickstart out=DIR`: the whole pipeline on the bundled corpus. Sections are the commands' own
    settings (configs/<command>.yaml), checked when the quickstart runs each command."""

    out: str = "runs/quickstart"
    profile: Optional[str] = None
    """A named set of values from `profiles` (smoke, gpu), applied under the command line's overrides."""
    profiles: Dict[str, Any] = field(default_factory=dict)
    fresh: bool = True
    seed: int = 0
    ray_address: Optional[str] = None
    num_cpus: Optional[float] = None
    model_preset: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    corpus: Dict[str, Any] = field(default_factory=dict)
    scaling: Dict[str, Any] = field(default_factory=dict)
    deepspeed: Dict[str, Any] = field(default_factory=dict)
    warmup: Dict[str, Any] = field(default_factory=dict)
    continual: Dict[str, Any] = field(default_factory=dict)
    encode: Dict[str, Any] = field(default_factory=dict)
    eval: Dict[str, Any] = field(default_factory=dict)
    probes: Dict[str, Any] = field(default_factory=dict)
    serve: Dict[str, Any] = field(default_factory=dict)


SCHEMAS = {"index": IndexConfig, "bank": BankConfig, "encode": EncodeConfig, "info": InfoConfig,
           "corpus": CorpusConfig, "prepare": PrepareConfig, "train": TrainConfig, "eval": EvalConfig,
           "serve": ServeConfig, "quickstart": QuickstartConfig}
