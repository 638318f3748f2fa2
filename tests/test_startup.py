"""Start-up: a repeated command or a restarted server traces and compiles nothing it did before (the exported trace
and XLA's executable come back from $JAXKV_HOME/xla-cache, keyed by what shapes them), a damaged cache entry costs
only a new trace, and `jaxkv --version` / `jaxkv env` say what a bug report needs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax

from jaxkv.env import version
from test_cli import run_in_process

# One process's life: a step function run through `Executables` with the cache on; prints how often it was traced.
PROCESS = """
import json, sys
import jax.numpy as jnp, numpy as np
from jaxkv.serve.compiled import Executables, enable_compilation_cache

print(json.dumps({"cache": str(enable_compilation_cache())}))
traced = []

def step(x, state, *, scale):
    traced.append(1)
    return {"out": x * scale + state.sum(), "none": None}, state + 1

executables = Executables()
result, state = executables.run(step, (1,), np.arange(4.0, dtype=np.float32), jnp.ones(3), scale=float(sys.argv[1]))
assert result["none"] is None
print(json.dumps({"traced": len(traced), "out": np.asarray(result["out"]).tolist(),
                  "state": np.asarray(state).tolist()}))
"""


def run_process(tmp_path: Path, scale: float, **env) -> dict:
    script = tmp_path / "process.py"
    script.write_text(PROCESS)
    done = subprocess.run([sys.executable, str(script), str(scale)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAXKV_HOME": str(tmp_path / "home"), "JAXKV_COMPILATION_CACHE": "1",
                               "JAX_PLATFORMS": "cpu", **env})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    return {**lines[0], **lines[1]}


def test_a_restarted_process_traces_nothing_it_traced_before(tmp_path):
    first = run_process(tmp_path, 2.0)
    assert first["cache"] == str(tmp_path / "home" / "xla-cache")
    assert first["traced"] == 1 and first["out"] == [3.0, 5.0, 7.0, 9.0] and first["state"] == [2.0, 2.0, 2.0]
    traces = list((tmp_path / "home" / "xla-cache" / "jaxkv-traces").glob("*.trace"))
    assert len(traces) == 1, traces
    again = run_process(tmp_path, 2.0)
    assert again == first | {"traced": 0}, "the second run traced again (or computed something else)"
    other = run_process(tmp_path, 3.0)  # a static value is part of the key
    assert other["traced"] == 1 and other["out"] == [3.0, 6.0, 9.0, 12.0]
    traces[0].write_bytes(b"damaged")
    assert run_process(tmp_path, 2.0) == first, "a damaged entry must be traced again, not trusted"
    assert run_process(tmp_path, 2.0) == first | {"traced": 0}, "the re-traced entry is written back"


def test_the_cache_stays_off_when_asked(tmp_path):
    off = run_process(tmp_path, 2.0, JAXKV_COMPILATION_CACHE="0")
    assert off["cache"] == "None" and off["traced"] == 1
    assert not (tmp_path / "home" / "xla-cache").exists()


def test_version_and_env_report_what_is_installed():
    done = run_in_process("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"jaxkv {version()}", done
    done = run_in_process("env", "--json")
    assert done.returncode == 0, done.stderr
    env = json.loads(done.stdout)
    assert env["packages"]["jax"] == jax.__version__ and env["packages"]["jaxkv"] == version()
    assert env["backend"] == jax.default_backend() and len(env["devices"]) == jax.device_count()
    assert env["attention_kernels"].startswith("reference:")  # what backend="auto" runs on this CPU
    assert env["models"] == str(Path(env["jaxkv_home"]) / "models")
    text = run_in_process("env").stdout
    assert f"jax {jax.__version__}" in text and "attention_kernels" in text
