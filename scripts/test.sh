#!/usr/bin/env bash
# From a fresh clone: set up .venv with the test extra and run the whole suite on CPU.
# The real-model tests fetch the default model's GGUF into $JAXKV_HOME on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec .venv/bin/python -m pytest -q "$@"
