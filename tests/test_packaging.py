"""The wheel users install (`pip install jaxkv`, the notebook's Colab cell), not the checkout: built from this tree
and installed without dependencies into a folder of its own, then imported from there in a new process. Every
package folder must be in it, and it must find its presets (the default model) without the source tree around."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import json, jaxkv, pallas_kernels
from jaxkv.checkpoints.registry import preset_files, resolve_config
from jaxkv.eval import perplexity
print(json.dumps({"jaxkv": jaxkv.__file__, "pallas_kernels": pallas_kernels.__file__, "presets": sorted(preset_files()),
                  "smollm2_layers": resolve_config("smollm2-135m").n_layers}))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel of this checkout, installed --no-deps into a folder (the deps come from the running venv)."""
    tmp = tmp_path_factory.mktemp("wheel")
    # a copy without build outputs: setuptools builds in the tree and would pack what an earlier build left in build/
    source = shutil.copytree(ROOT, tmp / "source", ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".cache", "runs"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(source)],
                   check=True, capture_output=True)
    wheel = next((tmp / "dist").glob("jaxkv-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp / "site"), str(wheel)], check=True,
                   capture_output=True)
    return tmp / "site"


def test_the_wheel_holds_every_package_folder(installed):
    source = {p.parent.relative_to(ROOT) for top in ("jaxkv", "pallas_kernels") for p in (ROOT / top).rglob("*.py")}
    missing = sorted(str(d) for d in source if not (installed / d).is_dir())
    assert not missing, f"the wheel lacks {missing}: add them to [tool.setuptools] packages in pyproject.toml"


def test_the_installed_wheel_finds_its_presets(installed, tmp_path):
    """Imported from the install folder (PYTHONPATH comes before the checkout's editable finder), in a folder
    away from the checkout: the presets are the wheel's copy of configs/models."""
    proc = subprocess.run([sys.executable, "-c", CHECK], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(installed), "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert Path(out["jaxkv"]).is_relative_to(installed) and Path(out["pallas_kernels"]).is_relative_to(installed)
    assert out["presets"] == sorted(p.stem for p in (ROOT / "configs" / "models").glob("*.yaml"))
    assert out["smollm2_layers"] == 30
