#!/usr/bin/env bash
# Write the committed lock files from pyproject.toml, every pin with its sha256 hashes:
#   requirements/runtime.lock   [project.dependencies]
#   requirements/test.lock      the dependencies plus the `test` extra
#   requirements/cuda12.lock, cuda13.lock, tpu.lock   the dependencies plus that accelerator's extra
#                               (the JAX build for it; every pin it shares with runtime.lock the same)
# Both also pin the build requirement (setuptools), so that scripts/setup.sh can install the
# project itself with --no-build-isolation and nothing it installs goes unpinned.
#
#   bash scripts/lock.sh          re-resolve everything to the newest releases (refresh)
#   bash scripts/lock.sh --keep   keep the current pins; only add/drop/move what pyproject.toml
#                                 now requires (e.g. after adding a dependency)
# Then run the tests (bash scripts/test.sh) and commit requirements/*.lock.
#
# Target: CPython 3.11 on Linux x86_64 (the CI machine). Environment markers are evaluated and
# wheels chosen for the interpreter that runs the resolver, so this script refuses any other
# interpreter (PYTHON=/path/to/python3.11 picks one).
#
# Tool: pip-tools (pip-compile), in a throwaway venv under /tmp, not uv. pip-compile resolves
# with pip itself and reads the same pip configuration that `pip install` in setup.sh reads
# (find-links /opt/wheels with torch 2.13.0+cpu, the local mirror indexes, the constraint file),
# so the lock pins exactly what pip would install here: torch==2.13.0+cpu from /opt/wheels, not
# PyPI's CUDA torch 2.13.0. uv ignores pip.conf, prefers the first index holding a package and
# is not installed here; matching this set-up with it takes repeating every index option.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET="cpython-3.11-linux-x86_64"
PIP_VERSION="26.3"
PIP_TOOLS_VERSION="7.6.2"

keep=0
case "${1:-}" in
    "") ;;
    --keep) keep=1 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "lock.sh: unknown argument '$1' (usage: bash scripts/lock.sh [--keep])" >&2; exit 2 ;;
esac

py="${PYTHON:-python3}"
have=$("$py" -c 'import platform, sys; v = sys.version_info
print(f"{sys.implementation.name}-{v[0]}.{v[1]}-{sys.platform}-{platform.machine().lower()}")')
if [ "$have" != "$TARGET" ]; then
    echo "lock.sh: the locks are made for $TARGET but $py is $have;" \
         "run it there (PYTHON=/path/to/python3.11)" >&2
    exit 1
fi

tmp=$(mktemp -d /tmp/jaxkv-lock.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
"$py" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -qq --disable-pip-version-check \
    "pip==$PIP_VERSION" "pip-tools==$PIP_TOOLS_VERSION"

compile() {  # compile OUT [pip-compile options]; pins already in OUT are kept unless --upgrade
    local out="$1"; shift
    CUSTOM_COMPILE_COMMAND="bash scripts/lock.sh" "$tmp/venv/bin/pip-compile" --quiet --no-config --resolver=backtracking \
        --generate-hashes --strip-extras --allow-unsafe --build-deps-for=editable \
        --no-emit-index-url --emit-find-links \
        --output-file "$out" "$@" pyproject.toml
}

write() {  # write NAME WHAT: header + pip-compile's output -> requirements/NAME.lock
    local name="$1" what="$2" made
    made=$("$py" -c 'import platform; print(f"CPython {platform.python_version()}, {platform.libc_ver()[0]} {platform.libc_ver()[1]}")')
    {
        echo "# requirements/$name.lock: $what, pinned with hashes."
        echo "# target: $TARGET   (CPython 3.11 on Linux x86_64; made with $made)"
        echo "# regenerate: bash scripts/lock.sh   (or: bash scripts/lock.sh --keep)"
        echo "# install: bash scripts/setup.sh$([ "$name" != runtime ] && echo " $name")" \
             "  (pip install --require-hashes --no-deps -r requirements/$name.lock)"
        cat "$tmp/$name.lock"
    } > "requirements/$name.lock.new"
    mv "requirements/$name.lock.new" "requirements/$name.lock"
}

mkdir -p requirements
# The test lock first; the runtime lock then starts from its pins, so that every package pinned
# in both has the same version in both.
if [ "$keep" = 1 ] && [ -f requirements/test.lock ]; then
    cp requirements/test.lock "$tmp/test.lock"
    compile "$tmp/test.lock" --extra=test
else
    compile "$tmp/test.lock" --extra=test --upgrade
fi
cp "$tmp/test.lock" "$tmp/runtime.lock"
compile "$tmp/runtime.lock"

write test "the dependencies of jaxkv plus its test extra"
write runtime "the dependencies of jaxkv (no extras)"
for accelerator in cuda12 cuda13 tpu; do  # each starts from the runtime pins: the same jax, more packages
    cp "$tmp/runtime.lock" "$tmp/$accelerator.lock"
    compile "$tmp/$accelerator.lock" --extra="$accelerator"
    write "$accelerator" "the dependencies of jaxkv plus its $accelerator extra (JAX for that accelerator)"
done
echo "lock.sh: wrote requirements/{runtime,test,cuda12,cuda13,tpu}.lock;" \
     "now run the tests (bash scripts/test.sh) and commit them"
