#!/usr/bin/env bash
# From a fresh clone: set up .venv with the test extra and run the whole suite on CPU.
# The real-model tests fetch the default model's GGUF into $JAXKV_HOME on first use.
# With no arguments each test file runs in its own process: XLA's CPU compiler has crashed (SIGSEGV, inside
# backend_compile) in one process that had compiled the whole suite's hundreds of executables, never in a file
# alone. Arguments go to one pytest run as they are.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
failed=()
for file in tests/test_*.py; do
  echo "== $file"
  start=$SECONDS
  .venv/bin/python -m pytest -q -p no:cacheprovider --durations=5 "$file" || failed+=("$file")
  echo "== $file took $((SECONDS - start)) s"
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED files: ${failed[*]}"
  exit 1
fi
echo "all test files passed"
