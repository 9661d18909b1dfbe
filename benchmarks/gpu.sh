#!/usr/bin/env bash
# The GPU suite: on a machine with an NVIDIA GPU (H100, H200), from the repository root,
#
#   bash benchmarks/gpu.sh            # install jax's CUDA build, run the GPU tests, benchmark
#   bash benchmarks/gpu.sh --dry-run  # print every command and run none (CI runs this)
#
# 1. installs ftjax with the `cuda` extra (jax[cuda12], pinned by constraints.txt);
# 2. runs the tests marked `gpu` (tests/test_gpu.py: the cuDNN attention path against XLA's,
#    values and gradients; bf16 training against float32);
# 3. times `ftjax bench` on a Llama-3.1-8B shape (full fine-tuning in bf16 with full remat, and
#    LoRA r16) and a Llama-3.2-1B shape (full fine-tuning), with MFU against the table's dense
#    bf16 peak of the chip (H100/H200: 989 TFLOP/s). The goal for 8B full fine-tuning on one
#    H200 is at least 50% MFU.
#
# Every step's output is kept in benchmarks/results/gpu-<UTC time>/<step>.txt, a failing step
# is reported and the others still run; the exit status is 1 if any step failed. Set
# FTJAX_GPU_STEPS (default 10) for the timed steps of each benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
case "${1:-}" in
  --dry-run) DRY_RUN=1 ;;
  '') ;;
  *) echo "usage: bash benchmarks/gpu.sh [--dry-run]" >&2; exit 2 ;;
esac
OUT="benchmarks/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)"
STEPS="${FTJAX_GPU_STEPS:-10}"
FAILED=()

step() {  # step NAME COMMAND...: print the command; unless dry, run it and keep its output
  local name=$1
  shift
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if ((DRY_RUN)); then
    return 0
  fi
  mkdir -p "$OUT"
  set +e
  "$@" 2>&1 | tee "$OUT/$name.txt"
  local status=${PIPESTATUS[0]}
  set -e
  if ((status != 0)); then
    echo "step $name failed (exit $status): see $OUT/$name.txt" >&2
    FAILED+=("$name")
  fi
}

# The 8B shape as configs/llama3p1_8b_lora.py sets it (bf16, full remat), cuDNN attention.
EIGHT_B=(--config configs/llama3p1_8b_lora.py --steps "$STEPS" --config.model.attention=cudnn
         --config.data.seq_len=2048)

step install python -m pip install -c constraints.txt -e '.[test,cuda]'
step devices python -c 'import jax; d = jax.devices(); print(d); assert d[0].platform == "gpu", "no GPU: jax sees " + str(d)'
step nvidia_smi nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step tests python -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
step bench_8b_full ftjax bench "${EIGHT_B[@]}" --config.lora.rank=0 --config.data.global_batch=4
step bench_8b_lora ftjax bench "${EIGHT_B[@]}" --config.lora.rank=16 --config.data.global_batch=8
step bench_1b_full ftjax bench --config configs/llama3p1_8b_lora.py --steps "$STEPS" \
  --config.model.preset=llama3p2_1b --config.model.attention=cudnn --config.lora.rank=0 \
  --config.data.seq_len=2048 --config.data.global_batch=16
step summary python benchmarks/gpu_summary.py "$OUT"

if ((${#FAILED[@]})); then
  echo "failed steps: ${FAILED[*]}" >&2
  exit 1
fi
