#!/usr/bin/env bash
# The bf16 measurements of docs/results/bf16-cpu, in one go (from the repository root):
#   bash docs/results/bf16-cpu/run.sh
# bench kernel: both head shapes at 16k / 0.1, 32k / 0.05 and 16k / 1.0, three rounds in bf16 and
# one in float32 (same CPU, for comparison); bench prefill at 16k in bf16, and --lengths in both
# dtypes with its plot. Every line of kernel-amx.jsonl / prefill*.jsonl is one command's JSON.
# (kernel.jsonl and kernel-vnni.jsonl are the earlier kernels' rows, kept as the README cites them.)
# KERNEL_ONLY=1 runs the bench kernel rounds only.
set -euo pipefail
here=docs/results/bf16-cpu
lscpu | grep "Model name" > "$here/cpu.txt"
out="$here/kernel-amx.jsonl"
: > "$out"
for round in 1 2 3; do
  for shape in "--heads 4 --kv-heads 1 --head-dim 256" "--heads 9 --kv-heads 3 --head-dim 64"; do
    for ld in "16384 0.1" "32768 0.05" "16384 1.0"; do
      set -- $ld
      python -m attnsieve bench kernel --length "$1" --density "$2" $shape --dtype bfloat16 --json | tail -1 >> "$out"
      if [ "$round" = 1 ]; then
        python -m attnsieve bench kernel --length "$1" --density "$2" $shape --dtype float32 --json | tail -1 >> "$out"
      fi
    done
  done
done
if [ "${KERNEL_ONLY:-0}" = 1 ]; then python "$here/table.py"; exit 0; fi
python -m attnsieve bench prefill --model gemma3-270m --method block-topk --length 16384 --dtype bfloat16 --json | tail -1 > "$here/prefill16k.jsonl"
rm -f "$here/prefill.jsonl"
python -m attnsieve bench prefill --model gemma3-270m --method block-topk --lengths 2048,4096,8192,16384 \
  --dtype float32,bfloat16 --out "$here" --json | tail -1 > /dev/null
python "$here/table.py"
