#!/usr/bin/env bash
# GPU check for one CUDA machine with no network and seqweave not installed: print the GPU, run the
# GPU-marked tests, then the attention benchmark and the linear-attention kernels, in under 9 minutes
# on one H100. Every part always runs; the script exits non-zero when any failed (124: killed by its
# timeout).
#
#   bash benchmarks/gpu_check.sh                 # results in benchmarks/results/
#   OUT=/some/dir bash benchmarks/gpu_check.sh   # gpu_tests.txt, attention_gpu.json, attention_gpu.txt there
#   STEP=1 bash benchmarks/gpu_check.sh          # also whole training steps (benchmarks/step.py --gpu, ~5 min)
#
# Limits (seconds, override by environment): TEST_TIMEOUT_S=210 for pytest, BENCH_TIMEOUT_S=240 for the
# benchmark, which starts no new config after BENCH_BUDGET_S=150 and rewrites its JSON after every
# config, so a run cut short keeps what it measured; LINEAR_TIMEOUT_S=90 for the linear-attention kernels.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-benchmarks/results}"
PYTHON="${PYTHON:-python}"
TEST_TIMEOUT_S="${TEST_TIMEOUT_S:-210}"
BENCH_TIMEOUT_S="${BENCH_TIMEOUT_S:-240}"
BENCH_BUDGET_S="${BENCH_BUDGET_S:-150}"
BENCH_LENGTHS="${BENCH_LENGTHS:-1024 4096 16384 32768}"
LINEAR_TIMEOUT_S="${LINEAR_TIMEOUT_S:-90}"
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET SEQWEAVE_TRITON_INTERPRET  # kernels must compile for the GPU

echo "== machine"
nvidia-smi || echo "gpu_check: nvidia-smi failed"
"$PYTHON" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton",
triton.__version__, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)' \
  || echo "gpu_check: torch/triton import failed"

echo "== GPU tests (pytest -m gpu, ${TEST_TIMEOUT_S} s limit)"
timeout -k 10 "$TEST_TIMEOUT_S" "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.txt"
tests_status=${PIPESTATUS[0]}

echo "== attention benchmark (${BENCH_TIMEOUT_S} s limit, no new config after ${BENCH_BUDGET_S} s)"
# shellcheck disable=SC2086 # BENCH_LENGTHS is a list of numbers
timeout -k 10 "$BENCH_TIMEOUT_S" "$PYTHON" benchmarks/attention_gpu.py --out "$OUT/attention_gpu.json" \
  --lengths $BENCH_LENGTHS --budget-s "$BENCH_BUDGET_S" 2>&1 | tee "$OUT/attention_gpu.txt"
bench_status=${PIPESTATUS[0]}

echo "== linear attention kernels (${LINEAR_TIMEOUT_S} s limit)"
timeout -k 10 "$LINEAR_TIMEOUT_S" "$PYTHON" benchmarks/linear_attention_gpu.py \
  --out "$OUT/linear_attention_gpu.json" 2>&1 | tee "$OUT/linear_attention_gpu.txt"
linear_status=${PIPESTATUS[0]}

step_status=0
if [ "${STEP:-0}" = "1" ]; then  # opt-in: whole training steps compile for minutes; give it its own session time
  echo "== whole training step (${STEP_TIMEOUT_S:-300} s limit): eager, torch.compile, seqweave eager / inductor"
  timeout -k 10 "${STEP_TIMEOUT_S:-300}" "$PYTHON" benchmarks/step.py --gpu --ranks 1 --steps 2 \
    --out "$OUT/step_gpu.json" 2>&1 | tee "$OUT/step_gpu.txt"
  step_status=${PIPESTATUS[0]}
fi

echo "== gpu_check: tests exit ${tests_status}, benchmark exit ${bench_status}, linear exit ${linear_status}," \
  "step exit ${step_status} (124 = timed out)"
[ "$tests_status" -eq 0 ] && [ "$bench_status" -eq 0 ] && [ "$linear_status" -eq 0 ] && [ "$step_status" -eq 0 ]
