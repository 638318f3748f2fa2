#!/usr/bin/env bash
# From a fresh clone: set up .venv with the test extra and run the whole suite on CPU.
# The real-model tests fetch the default model's GGUF into $JAXKV_HOME on first use.
# With no arguments each test file runs in its own process: XLA's CPU compiler has crashed (SIGSEGV, inside
# backend_compile) in one process that had compiled the whole suite's hundreds of executables, never in a file
# alone. Files run $JAXKV_TEST_JOBS at a time (default: one per core): a file's process spends most of its time
# in XLA's compiler, on one core. The longest files start first so that the last to finish is a short one.
# Each file's output is printed whole when it ends. Arguments go to one pytest run as they are.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
# Longest first (as measured on a 2-core machine); files not named here run after, in name order.
LONGEST=(test_notebook test_engine test_paged_cache test_sharded test_smollm2 test_architectures test_eviction test_kv_sharing
         test_cli test_train test_server test_gguf_families test_perplexity test_speculative test_draft test_kivi
         test_ragged_attention test_paged_prefill test_compare_kv_sharing test_paged_attention_tpu test_server_hardening
         test_paged_attention test_generate test_kivi_kernels test_gguf test_lckv_format)
files=()
for name in "${LONGEST[@]}"; do [ -f "tests/$name.py" ] && files+=("tests/$name.py"); done
for file in tests/test_*.py; do
  [[ " ${files[*]} " == *" $file "* ]] || files+=("$file")
done
results=$(mktemp -d)
run_file() {  # run_file FILE RESULTS_DIR: its output, then one line for the summary
  local file=$1 results=$2 start=$SECONDS log status
  log="$results/$(basename "$file").log"
  if .venv/bin/python -m pytest -q -p no:cacheprovider --durations=5 "$file" >"$log" 2>&1; then status=passed
  else status=FAILED; echo "$file" >>"$results/failed"; fi
  { echo "== $file"; cat "$log"; echo "== $file $status in $((SECONDS - start)) s"; } | flock "$results/print" cat
}
export -f run_file
start=$SECONDS
printf '%s\n' "${files[@]}" | xargs -P "${JAXKV_TEST_JOBS:-$(nproc)}" -I{} bash -c 'run_file "$1" "$2"' _ {} "$results"
echo "${#files[@]} files in $((SECONDS - start)) s"
if [ -s "$results/failed" ]; then
  echo "FAILED files: $(sort "$results/failed" | tr '\n' ' ')"
  exit 1
fi
echo "all test files passed"
