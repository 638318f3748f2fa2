#!/usr/bin/env bash
# One command for a machine with one NVIDIA GPU and a CUDA jax already installed (no network; the repository
# on PYTHONPATH): compiled kernels against their references, the ragged step on SmolLM2 against the CPU, and
# bench_attention at 1k/4k/16k context. Writes docs/results/gpu_check.log and the attention tables.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
LOG=docs/results/gpu_check.log
mkdir -p docs/results
{
  echo "# gpu_check $(date -u +%FT%TZ)"; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  "$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"
  "$PY" scripts/gpu_check.py; echo "gpu_check.py exit $?"
  "$PY" scripts/bench_attention.py --contexts 1024,4096,16384 --out docs/results/bench_attention.md \
      --plot docs/results/bench_attention.png; echo "bench_attention bfloat16 exit $?"
  "$PY" scripts/bench_attention.py --contexts 1024,4096,16384 --kv-dtype int8 \
      --out docs/results/bench_attention_int8.md; echo "bench_attention int8 exit $?"
} 2>&1 | tee "$LOG"
