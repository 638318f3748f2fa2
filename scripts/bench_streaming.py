"""StreamingLLM on SmolLM2 over a long real text: perplexity and KV memory with sinks + window against the full cache.

    python scripts/bench_streaming.py [--tokens 2048] [--window 252] [--out docs/results/streaming.md]

Held-out Shakespeare is read token by token (teacher forcing), as in the StreamingLLM paper's
evaluation. The full cache keeps everything. The streaming runs keep `sinks` first tokens and the
last `window` tokens on a paged ring, with positions assigned in the cache; window-only is the
same with 0 sinks (the paper's "window attention", which collapses once the first token leaves).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxkv
from jaxkv.cache.dense import kv_bytes_per_token
from jaxkv.cache.paged import PagedKV, PagePool, StepMetadata, streaming_pages
from jaxkv.data.corpus import load_split
from jaxkv.model.decoder import forward

ROOT = Path(__file__).resolve().parents[1]
PAGE_SIZE = 16


def target_logprobs(cfg, params, ids: np.ndarray, pages_per_seq: int, prompt: int) -> np.ndarray:
    """log p(ids[t+1] | ids[:t+1]) for every t: `prompt` tokens prefilled, then one token per step."""
    pool = PagePool.init(cfg, pages_per_seq, PAGE_SIZE)
    table = np.arange(pages_per_seq)[None]
    prefill = StepMetadata.pack([table], [0], [prompt])
    one = StepMetadata.pack([table], [prompt], [1])  # the decode step's layout; its position is set per token

    @jax.jit
    def run(params, pool, ids):
        logits, kv = forward(cfg, params, ids[None, :prompt], PagedKV.whole(pool, prefill))
        first = jax.nn.log_softmax(logits[0])[jnp.arange(prompt), ids[1:prompt + 1]]

        def step(pool, at):  # token `at` at position `at`, one step each
            logits, kv = forward(cfg, params, ids[at][None, None], PagedKV.whole(pool, one.advanced(at - prompt)))
            return kv.pools[0], jax.nn.log_softmax(logits[0, 0])[ids[at + 1]]

        _, rest = jax.lax.scan(step, kv.pools[0], jnp.arange(prompt, len(ids) - 1))
        return jnp.concatenate([first, rest])

    return np.asarray(run(params, pool, jnp.asarray(ids)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--window", type=int, default=252, help="recent tokens kept (sinks + window = the cache)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "streaming.md"))
    args = parser.parse_args()

    llm = jaxkv.load(args.model, dtype="float32")
    text = "\n".join(d.text for d in load_split("shakespeare").validation)
    ids = np.asarray(llm.tokenizer.encode(text, add_special_tokens=False)[:args.tokens], np.int32)
    per_token = kv_bytes_per_token(llm.config, "float32")
    runs = {"full cache": (llm.config, -(-len(ids) // PAGE_SIZE))}
    for sinks in (4, 1, 0):
        cfg = llm.config.replace(streaming_window=args.window, streaming_sinks=sinks)
        runs[f"{sinks} sink{'' if sinks == 1 else 's'} + window {args.window}"] = (cfg, streaming_pages(cfg, PAGE_SIZE))
    prompt = args.window  # fits every cache: streaming prefill needs the prompt inside sinks + window

    rows = ["| cache | KV pages (16 tokens) | KV MiB | ppl, all tokens | ppl, tokens past the window | s |",
            "|---|---|---|---|---|---|"]
    for name, (cfg, pages) in runs.items():
        start = time.perf_counter()
        logprobs = target_logprobs(cfg, llm.params, ids, pages, prompt)
        seconds = time.perf_counter() - start
        late = logprobs[args.window + 4:]
        mib = pages * PAGE_SIZE * per_token / 2**20
        rows.append(f"| {name} | {pages} | {mib:.1f} | {np.exp(-logprobs.mean()):.3f} | {np.exp(-late.mean()):.3f} "
                    f"| {seconds:.0f} |")
        print(rows[-1], flush=True)
    report = (f"# StreamingLLM on {args.model}\n\nCommand: `python scripts/bench_streaming.py --tokens {args.tokens} "
              f"--window {args.window}`. {len(ids)} tokens of the held-out Shakespeare plays, the first {prompt} "
              f"prefilled and the rest read one token per step (float32, paged cache of {PAGE_SIZE}-token "
              f"pages, CPU). \"Past the window\" counts the tokens predicted after the first eviction.\n\n"
              + "\n".join(rows) + "\n")
    Path(args.out).write_text(report)
    print(report)


if __name__ == "__main__":
    main()
