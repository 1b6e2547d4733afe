"""The `memory3 encode` Ray Data job end to end, with 1..N encoder actors, beside the bare encoder measured in the
same run: how close the job comes to its encoder, and how it scales with GPUs. One JSON line per actor count,
then the speed-up of each count over the first.

    python -m benchmarks.encode_job                                          # CPU, tiny, 1 and 2 CPU actors
    python -m benchmarks.encode_job --preset 2.4b --num-gpus 1 --actors 1,2 --embedder random --no-index

It writes a random-weight checkpoint of the preset and a synthetic corpus, times the bare encoder (compiled on a
GPU, as `compile: auto` runs it in the actors; same batch), then runs the real job (read → chunk → actor pool →
shards → index) once per actor count into a fresh bank, deleted after. Rates per run, references/s:
  bare_encoder: `encode_references` alone on one device (benchmarks/encode.py), the ceiling;
  end_to_end: the job's wall clock (Ray start, model loading, compilation and the index included);
  stream: the actors' parts from the first begun to the last written (start-up paid);
  per_actor: each actor's references over its own first-begun-to-last-written span, averaged: the figure its
    `memory3_encode_references_per_second` gauge shows; per_actor_over_bare is the target ratio (>= 0.9);
  per_actor_encoder: each actor's references per second of device work.
Beside them, disk_write_mb_per_s (one fsync'd write where the banks go) and the ceiling it sets in references/s: a
bf16 2.4B record is 450,568 bytes, so 1,200 references/s needs ~540 MB/s of disk (`--bank-dir /dev/shm` takes the
disk out of the measurement).
The bank is bf16 (`--quantizer null`) unless told; `--quantizer auto` writes the preset's VQ codes (2.4b: the paper's
39,432-byte records), quantized on the GPU by the torch codec, after the codebooks train on the node's cores.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np
import torch

from benchmarks.encode import bench_encode
from benchmarks.model import commit, device_name
from model.checkpoint import save_checkpoint
from model.config import ModelConfig
from model.quantizer import DEFAULT_KERNEL
from model.tokenizer import Tokenizer
from model.transformer import Transformer

WORDS = ["river", "city", "north", "station", "harbour", "valley", "bridge", "market", "tower", "castle", "road",
         "lake", "forest", "mill", "square", "church", "garden", "hill", "port", "island", "school", "museum"]


def synthetic_corpus(path: str, documents: int, words: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, words)) + f" {i}." for i in range(documents)]
    with open(path, "w") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": f"doc{i}", "text": text}) + "\n")
    return texts


def random_checkpoint(path: str, preset: str, texts: list[str]) -> None:
    cfg = ModelConfig.from_name(preset)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # initialising 2.4B on a CPU takes minutes
        model = Transformer(cfg).to(torch.bfloat16 if preset != "tiny" else torch.float32)
    save_checkpoint(path, model, Tokenizer.train(texts[:2000], min(4096, cfg.vocab_size)))
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def random_embedder(path: str, texts: list[str]) -> str:
    """A sentence-transformers folder with all-MiniLM-L6-v2's architecture (6 layers, 384 wide, mean pooling) and
    random weights, for machines without the bundled model files: the same compute, no retrieval quality."""
    from sentence_transformers import SentenceTransformer, models
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    hf = os.path.join(path, "hf")
    os.makedirs(hf, exist_ok=True)
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(texts[:2000], vocab_size=30522)
    wordpiece.save_model(hf)
    BertTokenizerFast(os.path.join(hf, "vocab.txt")).save_pretrained(hf)
    BertModel(BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                         intermediate_size=1536)).save_pretrained(hf)
    st = SentenceTransformer(modules=[(t := models.Transformer(hf, max_seq_length=256)),
                                      models.Pooling(t.get_word_embedding_dimension(), "mean"), models.Normalize()])
    st.save(os.path.join(path, "st"))
    return os.path.join(path, "st")


def disk_bytes_per_second(folder: str, size: int = 512 << 20) -> float:
    """One fsync'd file write in `folder` (shards are written so): bytes/s a bank can be written at, at most."""
    os.makedirs(folder, exist_ok=True)
    path, data = os.path.join(folder, ".write-probe"), bytes(size)
    t = time.perf_counter()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t
    os.remove(path)
    return size / seconds


def mean(values) -> float:
    values = list(values)
    return sum(values) / max(len(values), 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--actors", default="1,2", help="comma list of encoder actor counts")
    ap.add_argument("--num-gpus", type=float, default=0, help="GPUs per actor (0: CPU actors)")
    ap.add_argument("--actor-cpus", type=float, default=None, help="CPUs per actor (default 4 with GPUs, 0.5 without)")
    ap.add_argument("--documents", type=int, default=None, help="default 400 (tiny) / 12288")
    ap.add_argument("--words", type=int, default=None, help="words per document (default: ~2 references' worth)")
    ap.add_argument("--shard-documents", type=int, default=None,
                    help="documents per part (default documents/32 on CPU, 2 batches' worth on GPUs)")
    ap.add_argument("--batch", type=int, default=None, help="references per encoder forward (default 32 / 256)")
    ap.add_argument("--compile", default="auto", help="auto (compiled on GPUs), true or false")
    ap.add_argument("--quantizer", default="null", help="the bank's codec: null = bf16, auto, or a FAISS factory")
    ap.add_argument("--quantizer-sample", type=int, default=512,
                    help="references whose memories train the codebooks (before encoding: not in the rates)")
    ap.add_argument("--quantizer-kernel", default=DEFAULT_KERNEL,
                    help="GPU: the codes' kernel precision (tf32x3, ieee, tf32)")
    ap.add_argument("--no-index", action="store_true", help="skip the FAISS index at the end (build_index=false)")
    ap.add_argument("--bare-references", type=int, default=None, help="for the bare encoder (default 256 / 2048)")
    ap.add_argument("--profile", action="store_true", help="also print the bare encoder's top kernels")
    ap.add_argument("--embedder", default=None, help="sentence-transformers dir; 'random': MiniLM-shaped, random")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--bank-dir", default=None, help="where the banks go (default the workdir; e.g. /dev/shm to "
                    "measure the pipeline apart from the disk, whose write rate is reported beside)")
    args = ap.parse_args()
    gpu = args.num_gpus > 0
    documents = args.documents or (400 if args.preset == "tiny" else 12288)
    batch = args.batch or (256 if gpu else 32)
    cfg = ModelConfig.from_name(args.preset)

    from pipelines.encode import compile_encoder, encode_corpus

    device = "cuda" if gpu else "cpu"
    compile = compile_encoder({"auto": "auto", "true": True, "false": False}[args.compile.lower()], device)
    common = {"bench": "encode_job", "preset": args.preset, "device": device_name(device), "commit": commit(),
              "num_gpus_per_actor": args.num_gpus, "documents": documents, "batch": batch, "compile": compile,
              "quantizer": args.quantizer, "quantizer_kernel": args.quantizer_kernel}
    t = time.perf_counter()  # first, on a quiet process (no tokenizer or Ray threads yet)
    bare = bench_encode(cfg, device, torch.bfloat16 if gpu else torch.float32,
                        (args.bare_references or (2048 if gpu else 256)) // batch * batch, batch, common, compile,
                        args.profile)
    common["bare_encoder_s"] = round(time.perf_counter() - t, 1)  # compilation included
    if gpu:
        torch.cuda.empty_cache()

    import ray

    from configs import load_config

    work = args.workdir or tempfile.mkdtemp(prefix="memory3-encode-job-")
    os.makedirs(work, exist_ok=True)
    texts = synthetic_corpus(os.path.join(work, "corpus.jsonl"), documents, args.words or cfg.reference_len * 2 // 3)
    t = time.perf_counter()
    random_checkpoint(os.path.join(work, "checkpoint"), args.preset, texts)
    embedder = random_embedder(os.path.join(work, "embedder"), texts) if args.embedder == "random" else args.embedder
    common["setup_s"] = round(time.perf_counter() - t, 1)
    bank_dir = args.bank_dir or work
    disk = disk_bytes_per_second(bank_dir)
    common.update(bank_dir=bank_dir, disk_write_mb_per_s=round(disk / 1e6, 1))
    ray.init(include_dashboard=False, logging_level="WARNING")
    common["cluster"] = ray.cluster_resources()
    rates = {}
    for actors in [int(a) for a in args.actors.split(",")]:
        bank = f"{bank_dir}/bank-{actors}"
        overrides = [f"corpus={work}/corpus.jsonl", f"bank={bank}", f"checkpoint={work}/checkpoint",
                     f"actors={actors}", f"num_gpus={args.num_gpus}",
                     f"actor_num_cpus={args.actor_cpus or (4 if gpu else 0.5)}",
                     f"shard_documents={args.shard_documents or (2 * batch if gpu else max(1, documents // 32))}",
                     f"batch_size={batch}", f"compile={compile}", f"quantizer={args.quantizer}",
                     f"quantizer_sample={args.quantizer_sample}", f"quantizer_kernel={args.quantizer_kernel}",
                     f"build_index={not args.no_index}", f"torch_threads={4 if gpu else 1}"] + \
                    ([f"embedder={embedder}"] if embedder else [])
        s = encode_corpus(load_config("encode", overrides))
        shutil.rmtree(bank, ignore_errors=True)
        per_actor = mean(a["references_per_second"] for a in s["actors"].values())
        rates[actors] = {"stream": s["stream_references_per_second"], "end_to_end": s["references_per_second"],
                         "encoder": s["encoder_references_per_second"]}
        print(json.dumps({**common, "actors": actors, "references": s["encoded_references"],
                          "tokens": s["encoded_tokens"], "seconds": s["seconds"],
                          "bare_encoder_references_per_s": round(bare, 1),
                          "end_to_end_references_per_s": s["references_per_second"],
                          "stream_references_per_s": s["stream_references_per_second"],
                          "per_actor_references_per_s": round(per_actor, 1),
                          "per_actor_encoder_references_per_s": round(
                              mean(a["encoder_references_per_second"] for a in s["actors"].values()), 1),
                          "per_actor_over_bare": round(per_actor / bare, 3),
                          "stream_over_bare": round(s["stream_references_per_second"] / (bare * actors), 3),
                          "actor_detail": s["actors"], "write_seconds": s["write_seconds"],
                          "bytes_written": s["bytes_written"], "record_bytes": s["record_bytes"],
                          "disk_references_per_s_ceiling": round(disk / s["record_bytes"], 1)}), flush=True)
    base = min(rates)
    for actors, r in rates.items():
        if actors != base:
            print(json.dumps({**common, "bench": "encode_job_scaling", "actors": actors, "over_actors": base,
                              **{f"{k}_speedup": round(v / rates[base][k], 3) for k, v in r.items()}}), flush=True)


if __name__ == "__main__":
    main()
