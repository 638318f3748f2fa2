#!/usr/bin/env bash
# Create .venv at the repository root and install jaxkv into it (editable).
#   bash scripts/setup.sh        runtime only
#   bash scripts/setup.sh test   plus the test extra (pytest, transformers, torch CPU, ...)
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install -qq --disable-pip-version-check -e ".${extra}"
