"""The committed lock files (requirements/*.lock, written by scripts/lock.sh) against
pyproject.toml and against the running environment. Fast, no network."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
ACCELERATORS = ("cuda12", "cuda13", "tpu")  # extras whose locks add JAX for that accelerator (scripts/setup.sh)
LOCKS = {kind: ROOT / "requirements" / f"{kind}.lock" for kind in ("runtime", "test", *ACCELERATORS)}
REFRESH = ("refresh the locks with `bash scripts/lock.sh` (or `bash scripts/lock.sh --keep` to move "
           "only what pyproject.toml changed), run the tests, and commit requirements/*.lock")
HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})(?!\S)")


def parse_lock(path: Path) -> tuple[str | None, dict[str, tuple[Requirement, list[str]]]]:
    """(target from the '# target:' header line, {canonical name: (requirement, sha256 hashes)})."""
    target = None
    logical, current = [], ""
    for raw in path.read_text().splitlines():
        if target is None and (m := re.match(r"#\s*target:\s*(\S+)", raw)):
            target = m.group(1)
        line = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        if current.strip():
            logical.append(current.strip())
        current = ""
    pins = {}
    for line in logical:
        if line.startswith("-"):  # --find-links and other options
            continue
        req = Requirement(line.split(" --", 1)[0].strip())
        hashes = HASH.findall(line)
        name = canonicalize_name(req.name)
        assert name not in pins, f"{path.name}: {req.name} appears twice; {REFRESH}"
        pins[name] = (req, hashes)
    return target, pins


def pinned_version(path: Path, req: Requirement) -> str:
    specs = list(req.specifier)
    assert len(specs) == 1 and specs[0].operator == "==", (
        f"{path.name}: {req.name} is not pinned with a single '==' ({req}); {REFRESH}")
    return specs[0].version


def running_target() -> str:
    v = sys.version_info
    return f"{sys.implementation.name}-{v[0]}.{v[1]}-{sys.platform}-{platform.machine().lower()}"


@pytest.fixture(scope="module")
def pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


@pytest.fixture(scope="module")
def locks() -> dict:
    missing = [str(p.relative_to(ROOT)) for p in LOCKS.values() if not p.is_file()]
    assert not missing, f"missing {', '.join(missing)}; {REFRESH}"
    return {kind: parse_lock(path) for kind, path in LOCKS.items()}


def declared(pyproject: dict, kind: str) -> list[Requirement]:
    reqs = pyproject["project"]["dependencies"] + pyproject["build-system"]["requires"]
    if kind != "runtime":
        reqs = reqs + pyproject["project"]["optional-dependencies"][kind]
    return [Requirement(r) for r in reqs]


@pytest.mark.parametrize("kind", list(LOCKS))
def test_lock_header_names_target_and_command(locks, kind):
    text = LOCKS[kind].read_text()
    target, _ = locks[kind]
    assert target == "cpython-3.11-linux-x86_64", (
        f"{LOCKS[kind].name}: header target is {target!r}, expected cpython-3.11-linux-x86_64; {REFRESH}")
    assert "bash scripts/lock.sh" in text.split("\n\n", 1)[0], (
        f"{LOCKS[kind].name}: header does not name the command that regenerates it; {REFRESH}")


@pytest.mark.parametrize("kind", list(LOCKS))
def test_every_lock_entry_is_pinned_with_hashes(locks, kind):
    path = LOCKS[kind]
    _, pins = locks[kind]
    assert pins, f"{path.name} pins nothing; {REFRESH}"
    for req, hashes in pins.values():
        pinned_version(path, req)
        assert hashes, f"{path.name}: {req.name} has no --hash=sha256: entry; {REFRESH}"


@pytest.mark.parametrize("kind", list(LOCKS))
def test_pyproject_dependencies_are_pinned_and_satisfied(pyproject, locks, kind):
    """Every dependency pyproject.toml names (and the build requirement) is pinned in the lock,
    hashed, and its pin satisfies pyproject's specifier."""
    path = LOCKS[kind]
    _, pins = locks[kind]
    broken = []
    for dep in declared(pyproject, kind):
        if dep.marker is not None and not dep.marker.evaluate():
            continue
        entry = pins.get(canonicalize_name(dep.name))
        if entry is None:
            broken.append(f"{dep.name} (pyproject: {dep}) is not in {path.name}")
            continue
        req, hashes = entry
        version = pinned_version(path, req)
        if not hashes:
            broken.append(f"{dep.name}=={version} has no --hash=sha256: entry")
        if not dep.specifier.contains(version, prereleases=True):
            broken.append(f"{dep.name}=={version} does not satisfy pyproject's {dep}")
    assert not broken, f"{path.name} is stale: " + "; ".join(broken) + f"; {REFRESH}"


def test_runtime_and_test_locks_agree(locks):
    """A package pinned in both locks has the same version in both (lock.sh resolves the runtime
    lock from the test lock's pins)."""
    _, runtime = locks["runtime"]
    _, test = locks["test"]
    broken = []
    for name, (req, _) in runtime.items():
        if name not in test:
            broken.append(f"{req.name} is in runtime.lock but not in test.lock")
        elif pinned_version(LOCKS["runtime"], req) != pinned_version(LOCKS["test"], test[name][0]):
            broken.append(f"{req.name}: runtime.lock has {req.specifier}, test.lock {test[name][0].specifier}")
    assert not broken, "; ".join(broken) + f"; {REFRESH}"


@pytest.mark.parametrize("accelerator", ACCELERATORS)
def test_accelerator_locks_add_to_the_runtime_pins(locks, accelerator):
    """scripts/setup.sh cuda12 installs runtime/test.lock, then the accelerator's lock over it with --no-deps:
    every pin the two share must be the same version (the same jax), and the lock must add JAX's plugin."""
    _, runtime = locks["runtime"]
    _, pins = locks[accelerator]
    broken = [f"{req.name}: runtime.lock has {req.specifier}, {accelerator}.lock {pins[name][0].specifier}"
              for name, (req, _) in runtime.items()
              if name in pins and pinned_version(LOCKS["runtime"], req) != pinned_version(LOCKS[accelerator],
                                                                                        pins[name][0])]
    missing = [name for name in runtime if name not in pins]
    assert not broken and not missing, "; ".join(broken + [f"{m} missing" for m in missing]) + f"; {REFRESH}"
    plugin = {"cuda12": "jax-cuda12-plugin", "cuda13": "jax-cuda13-plugin", "tpu": "libtpu"}[accelerator]
    assert plugin in pins, f"{accelerator}.lock does not pin {plugin}; {REFRESH}"


def test_installed_versions_match_test_lock(locks):
    """CI installs from requirements/test.lock (scripts/setup.sh test), so the running environment
    has exactly its pins; a difference means the lock was not what got installed."""
    target, pins = locks["test"]
    if running_target() != target:
        pytest.skip(f"this Python is {running_target()}, the lock is for {target}: "
                    "scripts/setup.sh resolved fresh")
    if os.environ.get("JAXKV_FRESH", "0") not in ("", "0", "false", "no"):
        pytest.skip("JAXKV_FRESH is set: scripts/setup.sh resolved fresh, not from the lock")
    broken = []
    for name, (req, _) in sorted(pins.items()):
        if req.marker is not None and not req.marker.evaluate():
            continue
        want = pinned_version(LOCKS["test"], req)
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            broken.append(f"{req.name}: not installed, test.lock pins {want}")
            continue
        if Version(have) != Version(want):
            broken.append(f"{req.name}: installed {have}, test.lock pins {want}")
    assert not broken, (
        "the environment does not match requirements/test.lock: " + "; ".join(broken)
        + ". Install from the lock with `bash scripts/setup.sh test`; if pyproject.toml changed, "
        + REFRESH)
