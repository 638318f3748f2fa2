#!/usr/bin/env bash
# Create .venv at the repository root and install jaxkv into it (editable).
#   bash scripts/setup.sh                runtime only, pinned by requirements/runtime.lock
#   bash scripts/setup.sh test           plus the test extra (pytest, transformers, torch CPU, ...),
#                                        pinned by requirements/test.lock
#   bash scripts/setup.sh cuda12|cuda13|tpu   plus JAX for that accelerator, pinned by
#                                        requirements/<accelerator>.lock (with test: both)
#   bash scripts/setup.sh [...] --fresh  resolve fresh from pyproject.toml instead (newest
#                                        releases, untested by CI); JAXKV_FRESH=1 does the same
# The locks are made for CPython 3.11 on Linux x86_64 (their "# target:" line); any other
# Python (3.12, macOS, aarch64, ...) says so in one line and resolves fresh. Refresh the locks
# with: bash scripts/lock.sh. Re-running is cheap: pip skips pins already installed.
set -euo pipefail
cd "$(dirname "$0")/.."

kind=runtime
accelerator=""
fresh=0
case "${JAXKV_FRESH:-0}" in "" | 0 | false | no) ;; *) fresh=1 ;; esac
for arg in "$@"; do
    case "$arg" in
        test) kind=test ;;
        cpu) accelerator="" ;;
        cuda12|cuda13|tpu) accelerator="$arg" ;;
        --fresh) fresh=1 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "setup.sh: unknown argument '$arg' (usage: bash scripts/setup.sh [test] [cpu|cuda12|cuda13|tpu]" \
                "[--fresh])" >&2
           exit 2 ;;
    esac
done

if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
pip_install=(.venv/bin/python -m pip install -qq --disable-pip-version-check)
lock="requirements/$kind.lock"

if [ "$fresh" = 0 ]; then
    have=$(.venv/bin/python -c 'import platform, sys; v = sys.version_info
print(f"{sys.implementation.name}-{v[0]}.{v[1]}-{sys.platform}-{platform.machine().lower()}")')
    want=""
    [ -f "$lock" ] && want=$(sed -n 's/^# target: *\([^ ]*\).*/\1/p' "$lock" | head -n 1)
    if [ -z "$want" ]; then
        echo "setup.sh: no target line in $lock (missing?); resolving fresh from pyproject.toml" >&2
        fresh=1
    elif [ "$have" != "$want" ]; then
        echo "setup.sh: $lock is for $want but .venv is $have; resolving fresh from pyproject.toml" >&2
        fresh=1
    fi
fi

if [ "$fresh" = 1 ]; then
    extras=$(echo "$([ "$kind" = test ] && echo test) $accelerator" | xargs | tr ' ' ',')
    "${pip_install[@]}" -e ".${extras:+[$extras]}"
else
    # Every package at its locked version and hash (the lock also pins the build requirement,
    # setuptools, so the project builds with it, without fetching anything unpinned). An
    # accelerator's lock shares every pin it has with the others, so it adds only its JAX build.
    "${pip_install[@]}" --require-hashes --no-deps -r "$lock"
    if [ -n "$accelerator" ]; then
        "${pip_install[@]}" --require-hashes --no-deps -r "requirements/$accelerator.lock"
    fi
    "${pip_install[@]}" --no-deps --no-build-isolation -e .
fi
