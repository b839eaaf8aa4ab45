#!/usr/bin/env bash
# The project's GPU checks (issues 4, 5 and 7) for a session that is lent the device (~15 minutes in
# all, 10 per call). Most important first, each part under its own time limit so that a slow part
# cannot starve the next, and every part writes into $OUT as it goes (a timeout keeps what finished).
#
#   here, once:   bash scripts/gpu_session.sh prepare   # .whl/ (wheels the GPU lacks) and .device/ (data,
#                                                       # tokenizer, installer); both git-ignored
#   device call:  bash scripts/gpu_session.sh part1     # carry [".whl", ".device"], timeout_s 590
#   if time left: bash scripts/gpu_session.sh part2     # same carry; a fresh machine reinstalls (~1 min)
#
# Travels: the tracked tree (~7 MB) + .whl (~48 MB) + .device (~4 MB), under the 64 MiB limit.
# part1 (~9.5 min): loss-path memory at 16k tokens x 152k vocab (issue 7), then the benchmark on the
#   Qwen2-0.5B shape (issue 7; its pack/padding_free rows per attention backend are issue 4's throughput
#   table, and MFTTrainer probes each backend for leaks between packed samples before its rows).
# part2 (~8 min): the CUDA-only training combinations (issue 5), the 1.5B rows of the MFU target, and
#   gpu_check_packing.py's per-backend leak probes and loss comparison (issue 4).
#
# To check this script on a CPU first: OUT=/tmp/gpu_out TINY=1 bash scripts/gpu_session.sh part1 (tiny sizes,
# the example data; the installer's failure without .whl is logged and the venv's packages are used).
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:?usage: gpu_session.sh prepare|part1|part2}

if [ "$part" = prepare ]; then
  set -e
  bash ../shared/gpu/fetch_wheels.sh >/dev/null
  mkdir -p .device
  cp -r ../shared/data ../shared/gpu/install_on_device.sh .device/  # the tokenizer travels in examples/
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
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  log "$name: exit $?"
  tail -n 25 "$OUT/$name.log"
}

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
bash .device/install_on_device.sh >"$OUT/install.log" 2>&1 || { log "install failed"; tail "$OUT/install.log"; }
export PYTHONPATH=/tmp/site:$PWD
python -c "import torch, transformers, trl, datasets; print(torch.__version__, transformers.__version__, trl.__version__, datasets.__version__)" | tee "$OUT/versions.txt"
data=(--data .device/data --tokenizer examples/tokenizers/gpt2)
tiny=() memory_size=(--tokens 16384) model05=(--model qwen2-0.5b) model15=(--model qwen2-1.5b)
if [ "${TINY:-0}" = 1 ]; then
  data=(--data examples/data --tokenizer examples/tokenizers/gpt2) tiny=(--tiny)
  memory_size=(--tokens 256 --vocab 2048 --hidden 64) model05=(--tiny) model15=(--tiny)
fi

case "$part" in
  part1)
    # bitsandbytes initialises CUDA when transformers imports it, which stops the benchmark from forking
    # its rows from a preloaded process (it would start a fresh interpreter per row, ~2 min more).
    rm -rf /tmp/site/bitsandbytes*
    # The default chunk (832 positions at this vocabulary) beside larger ones: fewer passes over the
    # output weight's float32 gradient, more memory.
    step loss_memory 120 python scripts/benchmark_loss_memory.py "${memory_size[@]}" --chunk_size 0,2048,4096 \
      --out "$OUT/loss_memory.json"
    step benchmark_0.5b 380 python scripts/benchmark.py "${model05[@]}" "${data[@]}" --budget_s 370 \
      --workdir /tmp/bench --out "$OUT/benchmark_0.5b.json" --table "$OUT/benchmark_0.5b.md"
    ;;
  part2)
    step training 240 python scripts/gpu_check_training.py "${tiny[@]}" "${data[@]}" --out "$OUT/training.json"
    step benchmark_1.5b 180 python scripts/benchmark.py "${model15[@]}" "${data[@]}" --budget_s 170 \
      --only "mft pack torch_varlen,trl rows torch_varlen,mft padding sdpa plain,mft padding_free_samples torch_varlen" \
      --skip coba --workdir /tmp/bench15 --out "$OUT/benchmark_1.5b.json" --table "$OUT/benchmark_1.5b.md"
    step packing_probes 100 python scripts/gpu_check_packing.py "${tiny[@]}" "${data[@]}" --steps 2 --warmup 1 \
      --layouts pack,padding_free --out "$OUT/gpu_check_packing.json"
    ;;
  *) echo "unknown part $part: prepare, part1 or part2" >&2; exit 2 ;;
esac
log "done"
