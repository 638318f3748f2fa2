#!/usr/bin/env bash
# One command for a machine with one NVIDIA GPU and a CUDA jax already installed (no network; the repository
# on PYTHONPATH): the kernel tests with the Triton kernels compiled, the ragged step on SmolLM2's geometry against
# the CPU, and bench_attention at 1k/4k/16k context. Writes docs/results/gpu_check.log and the attention tables.
# Wheels the machine lacks (gguf) may sit in .gpu/ (pip download --no-deps); they are installed into /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if compgen -G ".gpu/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PIP_NO_INDEX=1  # offline: fetching the real weights fails at once and the checks use random weights
LOG=docs/results/gpu_check.log
mkdir -p docs/results
{
  echo "# gpu_check $(date -u +%FT%TZ)"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
  # Correctness at float32 precision: XLA's and Triton's float32 dots would otherwise round through TF32.
  JAX_DEFAULT_MATMUL_PRECISION=highest "$PY" -m pytest -q -p no:cacheprovider -k "not tpu" \
      tests/test_ragged_attention.py tests/test_paged_attention.py tests/test_paged_prefill.py
  echo "kernel tests (Triton compiled) exit $?"
  JAX_DEFAULT_MATMUL_PRECISION=highest "$PY" scripts/gpu_check.py; echo "gpu_check.py exit $?"
  "$PY" scripts/bench_attention.py --contexts 1024,4096,16384 --out docs/results/bench_attention.md \
      --plot docs/results/bench_attention.png; echo "bench_attention bfloat16 exit $?"
  "$PY" scripts/bench_attention.py --contexts 1024,4096,16384 --kv-dtype int8 \
      --out docs/results/bench_attention_int8.md; echo "bench_attention int8 exit $?"
} 2>&1 | tee "$LOG"
