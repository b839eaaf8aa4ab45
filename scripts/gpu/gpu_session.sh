#!/usr/bin/env bash
# The project's GPU checks (issues 4, 5 and 7) for a session that is lent the device. A session has
# ~15 minutes of device time in all, the machine's start included, and 10 minutes per call: one call
# of `all` is what fits. Most important first, each step under its own time limit so that a slow
# step cannot starve the next, and every step writes into $OUT as it goes (a timeout keeps what
# finished).
#
#   here, once:   bash scripts/gpu/gpu_session.sh prepare   # .whl/ (wheels the GPU lacks) and .device/ (data,
#                                                           # installer); both git-ignored
#   device call:  bash scripts/gpu/gpu_session.sh all       # carry [".whl", ".device"], timeout_s 590
#
# Travels: the tracked tree (~7 MB) + .whl (~48 MB) + .device (~4 MB), under the 64 MiB limit.
# all (~9 min: ~1 min of install, then the steps' limits, 505 s in all):
#   loss_memory     70  loss-path memory at 16k tokens x 152k vocab, chunk sweep (issue 7)
#   benchmark_0.5b 155  the benchmark on the Qwen2-0.5B shape, rows most important first: the targets'
#                       rows (ours vs TRL vs MFTCoder-style padding, issue 7), then the chunked loss,
#                       then the other attention backends (issue 4's layouts x backends table)
#   benchmark_smollm2 60  the real-model rows (issue 17) on SmolLM2-135M's shape, random weights:
#                       the real weights (538 MB, or the 93 MB GGUF) cannot travel in 64 MiB, nor can the
#                       quality experiment (docs/experiments/mft_quality), which needs them
#   benchmark_1.5b 100  our best row and TRL's on the 1.5B shape: the MFU target (issue 7)
#   training        75  QLoRA on CUDA (bf16, 4-bit kernels) under DDP and FSDP2 (issue 5)
#   packing_probes  45  per-backend leak probes between packed samples and loss comparison (issue 4)
# part1 and part2 split the same checks with more time each (the full 0.5B benchmark, every training
# combination), for a session with more device time.
#
# To check this script on a CPU first: OUT=/tmp/gpu_out TINY=1 bash scripts/gpu/gpu_session.sh all (tiny sizes,
# the example data; the installer's failure without .whl is logged and the venv's packages are used).
set -uo pipefail
cd "$(dirname "$0")/../.."
part=${1:?usage: gpu_session.sh prepare|all|part1|part2}

if [ "$part" = prepare ]; then
  set -e
  # Where this checkout finds the four-task data, the wheels the GPU machine lacks and their
  # installer (docs/benchmarks.md, "GPU"); the defaults are this workplace's folder beside the checkout.
  shared=${SHARED:-../shared}
  bash "$shared/gpu/fetch_wheels.sh" >/dev/null
  mkdir -p .device
  cp -r "${DATA:-$shared/data}" "$shared/gpu/install_on_device.sh" .device/  # the tokenizer travels in examples/
  du -sh .whl .device
  exit 0
fi

OUT=${OUT:?run on the device machine, where \$OUT is set}
began=$(date +%s)
log() { echo "[$(( $(date +%s) - began ))s] $*" | tee -a "$OUT/session.log"; }
# Run a part under a time limit, its output in $OUT/<name>.log (and its tail in the call's output).
step() {
  local name=$1 limit=$2; shift 2
  log "$name: start (limit ${limit}s)"
  timeout -k 5 "$limit" "$@" >"$OUT/$name.log" 2>&1
  log "$name: exit $?"
  tail -n 25 "$OUT/$name.log"
}

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
bash .device/install_on_device.sh >"$OUT/install.log" 2>&1 || { log "install failed"; tail "$OUT/install.log"; }
export PYTHONPATH=/tmp/site:$PWD
python -c "import torch, transformers, trl, datasets; print(torch.__version__, transformers.__version__, trl.__version__, datasets.__version__)" | tee "$OUT/versions.txt"
data=(--data .device/data --tokenizer examples/tokenizers/gpt2)
tiny=() memory_size=(--tokens 16384) model05=(--model qwen2-0.5b) model15=(--model qwen2-1.5b)
smollm2=(--model examples/models/smollm2-135m --tokenizer examples/tokenizers/smollm2-135m-instruct --data .device/data)
varlen=torch_varlen smollm2_budget=50
if [ "${TINY:-0}" = 1 ]; then
  data=(--data examples/data --tokenizer examples/tokenizers/gpt2) tiny=(--tiny)
  memory_size=(--tokens 256 --vocab 2048 --hidden 64) model05=(--tiny) model15=(--tiny)
  # a config-only directory as on the GPU, at the tiny model's size; sdpa (torch_varlen is CUDA's kernel)
  smollm2=(--model examples/models/tiny-llama --tokenizer examples/tokenizers/gpt2 --data examples/data --tiny)
  varlen=sdpa smollm2_budget=150  # a busy 2-core CPU needs longer than the GPU for the same rows
fi

# bitsandbytes initialises CUDA when transformers imports it, which stops the benchmark from forking
# its rows from a preloaded process (it would start a fresh interpreter per row, ~2 min more): it is
# set aside for the benchmarks and put back for the training checks.
# Entry by entry, replacing what an earlier call on the same machine left, so that a move never fails.
move_bitsandbytes() {
  local from=$1 to=$2 entry
  mkdir -p "$to"
  for entry in "$from"/bitsandbytes*; do
    [ -e "$entry" ] || continue
    rm -rf "$to/$(basename "$entry")" && mv "$entry" "$to/"
  done
}
hide_bitsandbytes() { move_bitsandbytes /tmp/site /tmp/site_hidden; }
show_bitsandbytes() { move_bitsandbytes /tmp/site_hidden /tmp/site; }

case "$part" in
  all)
    hide_bitsandbytes
    step loss_memory 70 python scripts/benchmarks/benchmark_loss_memory.py "${memory_size[@]}" \
      --chunk_size 0,2048,4096 --out "$OUT/loss_memory.json"
    step benchmark_0.5b 155 python scripts/benchmarks/benchmark.py "${model05[@]}" "${data[@]}" --budget_s 145 \
      --steps 6 --warmup 2 --workdir /tmp/bench --out "$OUT/benchmark_0.5b.json" --table "$OUT/benchmark_0.5b.md"
    step benchmark_smollm2 "$((smollm2_budget + 10))" python scripts/benchmarks/benchmark.py "${smollm2[@]}" \
      --budget_s "$smollm2_budget" --steps 6 --warmup 2 \
      --only "mft pack $varlen,trl rows $varlen,mft padding sdpa plain,mft padding_free $varlen chunked" \
      --skip coba --workdir /tmp/bench_smollm2 --out "$OUT/benchmark_smollm2.json" --table "$OUT/benchmark_smollm2.md"
    step benchmark_1.5b 100 python scripts/benchmarks/benchmark.py "${model15[@]}" "${data[@]}" --budget_s 90 \
      --steps 6 --warmup 2 --only "mft pack torch_varlen plain,trl rows torch_varlen" --skip coba --workdir /tmp/bench15 \
      --out "$OUT/benchmark_1.5b.json" --table "$OUT/benchmark_1.5b.md"
    show_bitsandbytes
    # The example data (100 conversations) is enough for a few QLoRA steps and saves the tokenizing.
    step training 75 python scripts/gpu/gpu_check_training.py "${tiny[@]}" --data examples/data \
      --tokenizer examples/tokenizers/gpt2 --only qlora_ddp qlora_fsdp2 --out "$OUT/training.json"
    step packing_probes 45 python scripts/gpu/gpu_check_packing.py "${tiny[@]}" "${data[@]}" --steps 2 --warmup 1 \
      --layouts pack,padding_free --out "$OUT/gpu_check_packing.json"
    ;;
  part1)
    hide_bitsandbytes
    # The default chunk (832 positions at this vocabulary) beside larger ones: fewer passes over the
    # output weight's float32 gradient, more memory.
    step loss_memory 120 python scripts/benchmarks/benchmark_loss_memory.py "${memory_size[@]}" \
      --chunk_size 0,2048,4096 --out "$OUT/loss_memory.json"
    step benchmark_0.5b 380 python scripts/benchmarks/benchmark.py "${model05[@]}" "${data[@]}" --budget_s 370 \
      --workdir /tmp/bench --out "$OUT/benchmark_0.5b.json" --table "$OUT/benchmark_0.5b.md"
    ;;
  part2)
    show_bitsandbytes
    step training 240 python scripts/gpu/gpu_check_training.py "${tiny[@]}" "${data[@]}" --out "$OUT/training.json"
    step benchmark_1.5b 180 python scripts/benchmarks/benchmark.py "${model15[@]}" "${data[@]}" --budget_s 170 \
      --only "mft pack torch_varlen,trl rows torch_varlen,mft padding sdpa plain,mft padding_free_samples torch_varlen" \
      --skip coba --workdir /tmp/bench15 --out "$OUT/benchmark_1.5b.json" --table "$OUT/benchmark_1.5b.md"
    step packing_probes 100 python scripts/gpu/gpu_check_packing.py "${tiny[@]}" "${data[@]}" --steps 2 --warmup 1 \
      --layouts pack,padding_free --out "$OUT/gpu_check_packing.json"
    ;;
  *) echo "unknown part $part: prepare, all, part1 or part2" >&2; exit 2 ;;
esac
log "done"
