"""The device checks of one NVIDIA GPU, in one run (`scripts/gpu_check.sh`): compiled kernels against their references.

1. ragged_paged_attention's GPU paths (the Triton ragged kernel, the decode kernel), compiled, against the
   pure-JAX reference on the test cases of tests/test_ragged_attention.py (decode rows and prompt chunks mixed,
   GQA, sinks + window, int8, LCKV's strict masking).
2. The engine's ragged step on SmolLM2 (random weights with its geometry when the real ones cannot be fetched
   offline): greedy tokens and their logprobs for a mixed batch with attention_backend "gpu" against
   "reference", both on the GPU, and against the CPU's (a subprocess with JAX_PLATFORMS=cpu).
Prints one line per check and exits non-zero if any fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [400, 401], [77] * 40, [5, 6, 7]]


def greedy(backend: str) -> dict:
    """Greedy tokens and their logprobs for PROMPTS on SmolLM2's geometry, served together by one engine (prompt
    chunks of 16 beside decode rows, then multi-token decode calls)."""
    import jax

    import jaxkv
    from jaxkv.api import LLM
    from jaxkv.model.decoder import init_params
    from jaxkv.serve.engine import Engine
    from jaxkv.serve.requests import Request

    try:
        llm = jaxkv.load("smollm2-135m", dtype="float32")
        weights = "SmolLM2-135M"
    except Exception as e:  # noqa: BLE001 - offline: the geometry with random weights still checks the kernels
        from conftest import byte_tokenizer_files
        from jaxkv.checkpoints.registry import preset
        from jaxkv.tokenizer import Tokenizer

        cfg = preset("smollm2-135m")[0].replace(dtype="float32", param_dtype="float32")
        with tempfile.TemporaryDirectory() as tmp:
            byte_tokenizer_files(Path(tmp))
            tokenizer = Tokenizer.load(Path(tmp))
        llm = LLM(cfg, tokenizer, init_params(cfg, jax.random.PRNGKey(0)))
        weights = f"random weights ({type(e).__name__})"
    llm = LLM(llm.config.replace(attention_backend=backend), llm.tokenizer, llm.params)
    engine = Engine(llm, max_batch=4, prefill_chunk=16, decode_iters=4)
    tokens, logprobs = {}, {}
    for i, prompt in enumerate(PROMPTS):
        engine.add(Request(prompt, max_tokens=24, logprobs=True, ignore_eos=True, request_id=str(i)))
    while engine.has_work():
        for out in engine.step():
            assert out.error is None, out.error
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
            logprobs.setdefault(out.request_id, []).extend(out.logprobs)
    order = [str(i) for i in range(len(PROMPTS))]
    return {"weights": weights, "platform": jax.default_backend(), "tokens": [tokens[r] for r in order],
            "logprobs": [logprobs[r] for r in order]}


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


def first_difference(a: dict, b: dict) -> str:
    """Where two runs' greedy tokens part, per prompt (a near-tie flipped by rounding shows as one late split)."""
    parts = []
    for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])):
        split = next((t for t, (u, v) in enumerate(zip(x, y)) if u != v), None)
        if split is not None:
            parts.append(f"prompt {i} from token {split}: {x[split:]} vs {y[split:]}")
    return "; ".join(parts)


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
        drift = max(abs(a - b) for x, y in zip(runs["gpu"]["logprobs"], runs[name]["logprobs"])
                    for a, b in zip(x, y))
        failed |= not same
        print(f"{'ok' if same else 'FAIL'} greedy tokens, gpu kernels vs {name} ({runs[name]['platform']}, "
              f"{runs[name]['weights']}): {'equal' if same else first_difference(runs['gpu'], runs[name])}; "
              f"max |logprob difference| {drift:.2e}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
