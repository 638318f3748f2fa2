"""The device checks of one NVIDIA GPU, in one run (`scripts/gpu_check.sh`): compiled kernels against their references.

1. ragged_paged_attention's GPU paths (the Triton ragged kernel, the decode kernel), compiled, against the
   pure-JAX reference on the test cases of tests/test_ragged_attention.py (decode rows and prompt chunks mixed,
   GQA, sinks + window, int8, LCKV's strict masking).
2. The engine's ragged step on SmolLM2 (random weights with its geometry when the real ones cannot be fetched
   offline): greedy tokens of a mixed batch with attention_backend "gpu" against "reference", both on the GPU,
   and against the CPU's (a subprocess with JAX_PLATFORMS=cpu).
Prints one line per check and exits non-zero if any fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [400, 401], [77] * 40, [5, 6, 7]]


def greedy(backend: str) -> dict:
    """Greedy tokens of PROMPTS on SmolLM2's geometry served together (mixed steps, then multi-token decode)."""
    import jax

    import jaxkv
    from jaxkv.api import LLM
    from jaxkv.generate.sampling import SamplingParams
    from jaxkv.model.decoder import init_params

    try:
        llm = jaxkv.load("smollm2-135m", dtype="float32")
        weights = "SmolLM2-135M"
    except Exception as e:  # noqa: BLE001 - offline: the geometry with random weights still checks the kernels
        from conftest import byte_tokenizer_files
        from jaxkv.checkpoints.registry import preset
        from jaxkv.tokenizer import Tokenizer

        cfg = preset("smollm2-135m")[0].replace(dtype="float32", param_dtype="float32")

        byte_tokenizer_files(ROOT / ".gpu_check_tok")
        llm = LLM(cfg, Tokenizer.load(ROOT / ".gpu_check_tok"), init_params(cfg, jax.random.PRNGKey(0)))
        weights = f"random weights ({type(e).__name__})"
    llm = LLM(llm.config.replace(attention_backend=backend), llm.tokenizer, llm.params)
    out = llm.generate_ids(PROMPTS, 24, SamplingParams(), ignore_eos=True)
    return {"weights": weights, "tokens": [c.token_ids for c in out], "platform": jax.default_backend()}


def kernels() -> list[tuple[str, float]]:
    import numpy as np

    from pallas_kernels.ragged_paged_attention import ragged_paged_attention
    from test_ragged_attention import CASES, make_step
    from test_paged_attention import split_options

    errors = []
    for case in CASES:
        for strict in (False, True):
            options, inputs = split_options(case)
            q, pages, meta = make_step(**inputs)
            want = np.asarray(ragged_paged_attention(q, pages, meta, **options, strict=strict, backend="reference"))
            got = np.asarray(ragged_paged_attention(q, pages, meta, **options, strict=strict, backend="gpu"))
            errors.append((f"{case} strict={strict}", float(np.abs(got - want).max() / (np.abs(want).max() + 1e-12))))
    return errors


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--greedy":
        print(json.dumps(greedy(sys.argv[2])))
        return
    failed = False
    for name, error in kernels():
        ok = error < 1e-3
        failed |= not ok
        print(f"{'ok' if ok else 'FAIL'} ragged_paged_attention gpu vs reference {name}: {error:.2e}", flush=True)
    runs = {backend: greedy(backend) for backend in ("gpu", "reference")}
    cpu = subprocess.run([sys.executable, __file__, "--greedy", "reference"], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=True)
    runs["cpu"] = json.loads(cpu.stdout.strip().splitlines()[-1])
    for name in ("reference", "cpu"):
        same = runs["gpu"]["tokens"] == runs[name]["tokens"]
        failed |= not same
        print(f"{'ok' if same else 'FAIL'} greedy tokens, gpu kernels vs {name} ({runs[name]['platform']}, "
              f"{runs[name]['weights']}): {'equal' if same else runs['gpu']['tokens']} "
              f"{'' if same else runs[name]['tokens']}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
