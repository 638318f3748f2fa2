"""Window pages at a fixed KV budget: sequences a Gemma 3 geometry holds at once when its window layers keep only
a ring of pages, against full pages on every layer; and the KV bytes of real geometries.

    .venv/bin/python scripts/bench_hybrid_kv.py [--context 8192] [--layers 12] [--full-sequences 2]
        [--out docs/results/hybrid_kv.md]

1. Measured in the serving engine: a model with Gemma 3's layer pattern (five window layers of --window tokens to
   one global layer; small widths, random weights) at a KV budget that holds --full-sequences sequences of
   --context tokens with full pages on every layer. The same budget is given to the engine with window pages
   (`jaxkv.cache.paged.page_groups`) and without (`window_pages=False`); --requests prompts of context - 1
   tokens are submitted at once and run to completion, and the peak number running together is counted. The
   theoretical ratio is that of KV tokens held per sequence: every layer x context against global layers x
   context + window layers x window. Target: the measured ratio >= 0.9x the theoretical one.
2. From the configs alone (`jaxkv.plan`): KV bytes per token and per --context sequence, full pages and window
   pages, for the Llama-3-8B, Qwen3-8B, Mistral-7B and Gemma-3-12B presets, standard, CLA2 and LCKV (2 warm-up
   layers), 16-bit and int8 KV.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the byte-level test tokenizer


def measure(cfg, params, tokenizer, args, window_pages: bool, budget: int) -> dict:
    """Peak sequences running at once, at `budget` bytes of KV, with or without window pages."""
    from jaxkv.api import LLM
    from jaxkv.cache.paged import PageGroup, page_groups
    from jaxkv.serve.engine import Engine, Request

    page_size, per_seq = 16, -(-args.context // 16)
    page_bytes = 2 * cfg.n_kv_heads * cfg.head_dim * 4 * page_size  # one layer's K and V page, float32
    groups = page_groups(cfg, page_size, args.chunk, per_seq) if window_pages else None
    groups = groups or (PageGroup(tuple(range(cfg.n_kv_layers))),)

    def cost(n):  # pool bytes when the full-table layers get n pages (rings: their share, as the engine sizes it)
        return page_bytes * sum(len(g.kv_layers) * g.pool_pages(n, per_seq) for g in groups)

    n = budget // (page_bytes * cfg.n_kv_layers)
    while cost(n + 1) <= budget:
        n += 1
    engine = Engine(LLM(cfg, tokenizer, params), max_batch=args.requests, page_size=page_size, num_pages=n,
                    max_context=args.context, prefill_chunk=args.chunk, prefill_budget=4 * args.chunk,
                    window_pages=window_pages)
    pool_bytes = sum(x.nbytes for pool in engine.pools for x in (pool.k_pages, pool.v_pages))
    assert pool_bytes <= budget + page_bytes * cfg.n_kv_layers, "the pools exceed the budget"  # + scratch pages
    rng = np.random.default_rng(0)
    for i in range(args.requests):
        engine.add(Request([int(t) for t in rng.integers(0, 256, args.context - 1)], max_tokens=1,
                           request_id=str(i), ignore_eos=True))
    peak, start = 0, time.perf_counter()
    while engine.has_work():
        engine.step()
        peak = max(peak, engine.metrics()["running"])
    return {"window_pages": window_pages, "peak": peak, "pool_bytes": pool_bytes,
            "groups": [(len(g.kv_layers), g.ring) for g in engine.groups], "seconds": time.perf_counter() - start,
            "preemptions": engine.metrics()["preemptions_total"]}


def geometry_rows(context: int) -> list[str]:
    from jaxkv.checkpoints.registry import resolve_config
    from jaxkv.plan import format_bytes, plan
    from jaxkv.sharing import with_sharing

    rows = []
    for name in ("llama-3-8b", "qwen3-8b", "mistral-7b", "gemma-3-12b"):
        base = resolve_config(name)
        for spec in (None, "cla2", "lckv:2"):
            cfg = with_sharing(base, spec) if spec else base
            for kv_dtype in (cfg.dtype, "int8"):
                p = plan(cfg, context=context, batch=1, kv_dtype=kv_dtype)
                full = p["kv_bytes_per_token"] * context
                rows.append(f"| {name} | {spec or 'standard'} | {p['kv_dtype']} | {p['kv_layers']} | "
                            f"{len(cfg.window_layers)} | {p['kv_bytes_per_token']:,} | {format_bytes(full)} | "
                            f"{format_bytes(p['kv_bytes_per_sequence'])} | {full / p['kv_bytes_per_sequence']:.2f}x |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12, help="a multiple of 6: Gemma 3's five local to one global")
    parser.add_argument("--chunk", type=int, default=128, help="prompt chunk (a ring covers window + chunk)")
    parser.add_argument("--full-sequences", type=int, default=2, help="the budget: this many with full pages")
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "hybrid_kv.md"))
    args = parser.parse_args()

    import jax

    from conftest import byte_tokenizer_files
    from jaxkv.config import ModelConfig
    from jaxkv.model.decoder import init_params
    from jaxkv.tokenizer import Tokenizer

    cfg = ModelConfig(vocab_size=258, d_model=64, n_layers=args.layers, n_heads=2, n_kv_heads=1, head_dim=32,
                      mlp_dim=128, max_seq_len=args.context, sliding_window=args.window,
                      window_layers=tuple(i for i in range(args.layers) if (i + 1) % 6), name="gemma-3-pattern")
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokenizer_dir = Path(__import__("tempfile").mkdtemp())
    byte_tokenizer_files(tokenizer_dir)
    tokenizer = Tokenizer.load(tokenizer_dir)
    budget = args.full_sequences * cfg.n_kv_layers * args.context * 2 * cfg.n_kv_heads * cfg.head_dim * 4
    full, rings = (measure(cfg, params, tokenizer, args, w, budget) for w in (False, True))
    n_global = cfg.n_layers - len(cfg.window_layers)
    theory = cfg.n_layers * args.context / (n_global * args.context + len(cfg.window_layers) * args.window)
    measured = rings["peak"] / full["peak"]
    lines = [
        "# Window pages: sequences held at a fixed KV budget, and KV bytes of real geometries", "",
        f"Command: `python scripts/bench_hybrid_kv.py {shlex.join(sys.argv[1:])}` (CPU, float32).", "",
        f"A model with Gemma 3's layer pattern ({args.layers} layers: {len(cfg.window_layers)} window layers of "
        f"{args.window} tokens, {n_global} global; random weights), sequences of {args.context} tokens, pages of "
        f"16, prompt chunks of {args.chunk}. KV budget: {budget / 2**20:.1f} MiB, {args.full_sequences} sequences "
        f"with full pages on every layer. {args.requests} requests submitted at once, each run to its end.", "",
        "| pages | groups (layers, ring pages) | pool bytes | peak sequences held | preemptions | seconds |",
        "|---|---|---:|---:|---:|---:|"]
    for r in (full, rings):
        lines.append(f"| {'window rings' if r['window_pages'] else 'full on every layer'} | {r['groups']} | "
                     f"{r['pool_bytes']:,} | {r['peak']} | {r['preemptions']} | {r['seconds']:.0f} |")
    lines += ["", f"Sequences held, window rings against full pages: **{measured:.2f}x**; theoretical (KV tokens per "
              f"sequence, window layers holding exactly their window): {theory:.2f}x; measured / theoretical "
              f"**{measured / theory:.2f}** (target >= 0.9: {'met' if measured >= 0.9 * theory else 'NOT met'}). "
              f"A ring holds the window plus a prompt chunk (the window of a chunk's first query through its last "
              f"token), rounded to pages.", "",
              f"## KV bytes per token and per {args.context}-token sequence (from the configs: `jaxkv plan`)", "",
              "Window pages: window layers hold their ring (window + a 64-token prompt chunk, in pages of 16); "
              "full pages: every layer holds every token. CLA2 and LCKV (2 warm-up layers) as `--kv-sharing`.", "",
              "| model | KV sharing | KV dtype | KV layers | window layers | KV bytes/token | per sequence, full "
              "pages | per sequence, window pages | saved by window pages |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += geometry_rows(args.context)
    report = "\n".join(lines) + "\n"
    Path(args.out).write_text(report)
    print(report)


if __name__ == "__main__":
    main()
