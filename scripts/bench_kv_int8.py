"""int8 KV against bfloat16 KV on SmolLM2 over a long real text: bytes per token and logit drift.

    python scripts/bench_kv_int8.py [--tokens 2048] [--chunk 128] [--out docs/results/kv_int8.md]

The text (held-out Shakespeare) runs through the paged cache in chunks, so every chunk
attends to the K/V that earlier chunks stored in the cache's dtype. Quantization error
therefore accumulates the way it does in serving. float32 KV is the reference. The
script reports perplexity, top-1 agreement, mean KL and the maximum logit error against it.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxkv
from jaxkv.cache.pages import PageAllocator
from jaxkv.cache.dense import kv_bytes_per_token
from jaxkv.cache.paged import PagedKV, PagePool, StepMetadata
from jaxkv.data.corpus import load_split
from jaxkv.model.decoder import forward

ROOT = Path(__file__).resolve().parents[1]


def chunked_logits(cfg, params, ids: np.ndarray, kv_dtype: str, chunk: int, page_size: int = 16) -> np.ndarray:
    n = len(ids)
    allocator = PageAllocator(num_pages=-(-n // page_size), page_size=page_size)
    pages = allocator.reserve("text", n)
    pool = PagePool.init(cfg, allocator.num_pages, page_size, kv_dtype=kv_dtype)

    @functools.partial(jax.jit, donate_argnums=0)
    def step(pool, meta, tokens):
        logits, kv = forward(cfg, params, tokens, PagedKV.whole(pool, meta))
        return logits, kv.pools[0]

    out = []
    for start in range(0, n, chunk):
        tokens = ids[None, start:start + chunk]
        logits, pool = step(pool, StepMetadata.pack([[pages]], [start], [tokens.shape[1]]), jnp.asarray(tokens))
        out.append(np.asarray(logits[0]))
    return np.concatenate(out)


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "kv_int8.md"))
    args = parser.parse_args()

    llm = jaxkv.load(args.model, dtype="float32")
    text = "\n".join(d.text for d in load_split("shakespeare").validation)
    ids = np.asarray(llm.tokenizer.encode(text, add_special_tokens=False)[:args.tokens], np.int32)
    results = {d: chunked_logits(llm.config, llm.params, ids, d, args.chunk) for d in ("float32", "bfloat16", "int8")}
    ref = log_softmax(results["float32"])
    targets = ids[1:]
    rows = ["| KV dtype | KV bytes/token | vs bf16 | ppl | top-1 agreement with fp32 KV | mean KL(fp32 ‖ x) | max abs logit error / max abs logit |",
            "|---|---|---|---|---|---|---|"]
    bf16_bytes = kv_bytes_per_token(llm.config, "bfloat16")
    for dtype, logits in results.items():
        lp = log_softmax(logits)
        ppl = float(np.exp(-lp[np.arange(len(targets)), targets].mean()))
        kl = float((np.exp(ref) * (ref - lp)).sum(-1).mean())
        agree = float((lp.argmax(-1) == ref.argmax(-1)).mean())
        err = float(np.abs(logits - results["float32"]).max() / np.abs(results["float32"]).max())
        nbytes = kv_bytes_per_token(llm.config, dtype)
        rows.append(f"| {dtype} | {nbytes:,} | {nbytes / bf16_bytes:.3f}x | {ppl:.3f} | {agree:.4f} | {kl:.2e} | {err:.2e} |")
    text_out = (f"# int8 KV against bfloat16 KV ({args.model})\n\nCommand: `python scripts/bench_kv_int8.py "
                f"--tokens {args.tokens} --chunk {args.chunk}`. The text is {len(ids)} tokens of the held-out "
                f"Shakespeare plays, fed in chunks of {args.chunk} through the paged cache (page size 16). The "
                f"model computes in float32, and the reference is float32 KV.\n\n" + "\n".join(rows) + "\n")
    Path(args.out).write_text(text_out)
    print(text_out)


if __name__ == "__main__":
    main()
