"""KIVI literally, on a dense cache, as its authors' code runs it: the perplexity jaxkv's KIVI is compared with.

    python scripts/kivi_literal.py --bits 2 [--recent 128] [--context 2048] [--score 256] [--windows 2]

The prompt (context - score tokens) is prefilled in full precision, then its K/V are quantized and dequantized in
place (keys per channel over 32-token groups, values per token in 32 channels, asymmetric; the last `recent` tokens
and the partial group stay float); the scored tokens are decoded one at a time, each group quantized once it leaves
the recent window. Same windows, tokens and quantizer (`jaxkv.cache.quantize.quantize_kivi`) as
`scripts/bench_kv_compression.py`; --bits 0 quantizes nothing (must give the float32 reference).
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np

import jaxkv
from jaxkv.cache.dense import KVCache
from jaxkv.cache.kivi import flushed_after
from jaxkv.cache.quantize import KIVI_PAGE, quantize_kivi
from jaxkv.data.corpus import shakespeare_split
from jaxkv.eval.perplexity import windows_of
from jaxkv.model.decoder import forward
from pallas_kernels.paged_attention.reference import dequantize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, choices=(0, 2, 4), required=True)
    parser.add_argument("--recent", type=int, default=128)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--score", type=int, default=256)
    parser.add_argument("--windows", type=int, default=2)
    args = parser.parse_args()
    llm = jaxkv.load("smollm2-135m", dtype="float32")
    cfg, group = llm.config, KIVI_PAGE
    text = "\n\n".join(d.text for d in shakespeare_split().validation)
    windows = np.asarray(windows_of(llm.tokenizer.encode(text, add_special_tokens=False), args.context,
                                    args.windows), np.int32)
    rows, prefill = len(windows), args.context - args.score

    @jax.jit
    def quantized(k, v, lo, hi):
        """K/V [L, B, T, K, Dh] with positions lo..hi-1 quantized and dequantized as KIVI stores them."""
        layers, batch, length, heads, dim = k.shape
        grouped = k.reshape(layers, batch, length // group, group, heads, dim).transpose(0, 1, 2, 4, 3, 5)
        kq = dequantize(*quantize_kivi(grouped, args.bits, keys=True), jnp.float32, keys=True)
        kq = kq.transpose(0, 1, 2, 4, 3, 5).reshape(k.shape)
        vq = dequantize(*quantize_kivi(v, args.bits, keys=False), jnp.float32)
        inside = (jnp.arange(length) >= lo) & (jnp.arange(length) < hi)
        return jnp.where(inside[:, None, None], kq, k), jnp.where(inside[:, None, None], vq, v)

    step = jax.jit(forward, static_argnums=0)
    logits, cache = step(cfg, llm.params, jnp.asarray(windows[:, :prefill]), KVCache.init(cfg, rows, args.context),
                         jnp.full(rows, prefill, jnp.int32))
    nll, flushed = 0.0, 0
    for t in range(prefill, args.context):
        if t > prefill:
            logits, cache = step(cfg, llm.params, jnp.asarray(windows[:, t - 1:t]), cache)
            now = flushed_after(flushed, t, args.recent, group) if args.bits else 0
            if now > flushed:
                cache = cache.replace(**dict(zip("kv", quantized(cache.k, cache.v, flushed, now))))
                flushed = now
        elif args.bits:  # the prompt, prefilled in full precision, is stored quantized
            flushed = flushed_after(0, prefill, args.recent, group)
            cache = cache.replace(**dict(zip("kv", quantized(cache.k, cache.v, 0, flushed))))
        nll -= float(jnp.sum(jax.nn.log_softmax(logits[:, -1])[jnp.arange(rows), windows[:, t]]))
    print(f"KIVI {args.bits} bits, recent {args.recent}, literal (full-precision prefill): "
          f"ppl {math.exp(nll / (rows * args.score)):.3f} over {rows * args.score} tokens")


if __name__ == "__main__":
    main()
