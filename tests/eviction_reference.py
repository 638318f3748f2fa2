"""H2O and SnapKV written literally on a dense cache, token by token, in numpy float64: the truth jaxkv's eviction on
the paged pool is checked against (same kept sets, same logits, same greedy tokens).

The model is a plain Llama (RMSNorm, rotate-half RoPE, GQA, SwiGLU) read from jaxkv's params pytree, with any
KV-sharing map (CLA, and LCKV's upward sources: fed token by token, a layer reads only the earlier tokens of a
source above it, as the paper's decoding does). Each KV layer keeps, per KV head, the K/V of every
token it was fed (keys after RoPE, at the token's position) and which of them are still held; a query attends to
the held ones. H2O (Zhang et al. 2023): every query adds its attention probabilities (summed over its KV head's
query heads) to the score of each held token; once the prompt is in, and after every generated token, while a
head holds more than `budget` tokens the lowest-scored token outside the last `window` held ones (and the first
`sinks`) is dropped.
SnapKV (Li et al. 2024): only the last `window` prompt queries score; at the end of the prompt each head keeps its
last `window` tokens and the `budget - window` others with the highest scores after a 1-D average pool of width
`kernel` (zeros past the ends, as torch's avg_pool1d with padding kernel // 2), nothing is dropped afterwards.
With `sinks`, the first `sinks` tokens are never candidates: they are always kept.

KIVI (`kivi=(bits, recent)`): each head's held tokens, in order, are what a KIVI pool's slots hold: whole pages of
32 outside the last `recent` are quantized before any query reads them, and after a cut the kept tokens' first
pages are quantized anew from what they held. The quantizer is the pool's own (tests/test_kivi.py checks it
against a literal one): a page quantized anew holds values on the grids of older pages, whose codes often fall on
a tie (x.5), where float32 rounding decides, and the truth must decide as the pool does. The prompt is then fed
as one chunk, as the engine's one prefill step does (its flushed pages are quantized before its queries read
them).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxkv.cache.kivi import flushed_after
from jaxkv.cache.quantize import quantize_kivi
from pallas_kernels.paged_attention.reference import dequantize

KIVI_PAGE = 32


def _norm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope(x, position, theta):
    """x [heads, Dh] rotated by `position`, rotate-half."""
    half = x.shape[-1] // 2
    angles = position / theta ** (np.arange(half) * 2 / x.shape[-1])
    cos, sin = np.cos(angles), np.sin(angles)
    x1, x2 = x[:, :half], x[:, half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class EvictingDenseModel:
    def __init__(self, cfg, params, *, method: str, budget: int, window: int, kernel: int = 1, sinks: int = 0,
                 kivi: tuple[int, int] | None = None):
        self.cfg, self.method, self.budget, self.window, self.kernel = cfg, method, budget, window, kernel
        self.sinks = sinks
        self.p = {k: np.asarray(v, np.float64) for k, v in _flat(params).items()}
        kv_layers = cfg.n_kv_layers
        self.k = [[] for _ in range(kv_layers)]  # per KV layer: per token [kv_heads, Dh]
        self.v = [[] for _ in range(kv_layers)]
        self.held = [np.zeros((cfg.n_kv_heads, 0), bool) for _ in range(kv_layers)]
        self.scores = [np.zeros((cfg.n_kv_heads, 0)) for _ in range(kv_layers)]
        self.position = 0
        self.kivi = kivi
        self.flushed = [0] * kv_layers  # KIVI: held tokens (slots) in quantized pages

    def feed(self, tokens: list[int], score_weights) -> np.ndarray:
        """Tokens through every layer at the next positions, as one chunk (each query sees the tokens up to its
        own): the last one's logits [V]."""
        cfg, p = self.cfg, self.p
        positions = self.position + np.arange(len(tokens))
        x = p["embed/embedding"][tokens]  # [T, d]
        group = cfg.n_heads // cfg.n_kv_heads
        for layer in range(cfg.n_layers):
            pre = f"layers_{layer}/"
            h = _norm(x, p[pre + "attn_norm/scale"], cfg.norm_eps)
            q = np.stack([_rope(qt, pos, cfg.rope_theta)
                          for qt, pos in zip(np.einsum("td,dhe->the", h, p[pre + "attn/q_proj/kernel"]), positions)])
            kv = cfg.kv_index(layer)
            if cfg.kv_sources[layer] == layer:
                keys = np.einsum("td,dhe->the", h, p[pre + "attn/k_proj/kernel"])
                values = np.einsum("td,dhe->the", h, p[pre + "attn/v_proj/kernel"])
                for t, pos in enumerate(positions):
                    self.k[kv].append(_rope(keys[t], pos, cfg.rope_theta))
                    self.v[kv].append(values[t])
                n = len(tokens)
                self.held[kv] = np.concatenate([self.held[kv], np.ones((cfg.n_kv_heads, n), bool)], axis=1)
                self.scores[kv] = np.concatenate([self.scores[kv], np.zeros((cfg.n_kv_heads, n))], axis=1)
                if self.kivi:
                    self._flush(kv, self.flushed[kv])
            out = np.zeros_like(q)  # an upward source before its first token: nothing to see, zeros
            if self.k[kv]:
                keys, values = np.stack(self.k[kv], axis=1), np.stack(self.v[kv], axis=1)  # [K, N, Dh]
                for t, pos in enumerate(positions):
                    seen = self.held[kv][:, :keys.shape[1]] & (np.arange(keys.shape[1]) <= pos)
                    for head in range(cfg.n_heads):
                        kvh = head // group
                        logits = np.where(seen[kvh], keys[kvh] @ q[t, head] / np.sqrt(cfg.head_dim), -np.inf)
                        probs = np.exp(logits - logits.max())
                        probs /= probs.sum()
                        out[t, head] = probs @ values[kvh]
                        self.scores[kv][kvh, :len(probs)] += score_weights[t] * probs
            x = x + np.einsum("the,hed->td", out, p[pre + "attn/o_proj/kernel"])
            x = self._mlp(x, pre)
        self.position += len(tokens)
        return _norm(x[-1], p["final_norm/scale"], cfg.norm_eps) @ p["lm_head/kernel"]

    def _flush(self, kv: int, flushed: int) -> None:
        """KIVI: quantize the pages of each head's held tokens from slot `flushed` up to what may be flushed now."""
        bits, recent = self.kivi
        after = flushed_after(flushed, int(self.held[kv][0].sum()), recent, KIVI_PAGE)
        for head in range(self.cfg.n_kv_heads):
            held = np.flatnonzero(self.held[kv][head])
            for start in range(flushed, after, KIVI_PAGE):
                page = held[start:start + KIVI_PAGE]
                for stored, keys in ((self.k[kv], True), (self.v[kv], False)):
                    x = jnp.asarray(np.stack([stored[j][head] for j in page]))
                    codes, pairs = quantize_kivi(x, bits, keys=keys)
                    values = np.asarray(dequantize(codes, pairs, jnp.float32, keys=keys), np.float64)
                    for i, j in enumerate(page):
                        stored[j][head] = values[i]
        self.flushed[kv] = after

    def _mlp(self, x, pre):
        h = _norm(x, self.p[pre + "mlp_norm/scale"], self.cfg.norm_eps)
        gate, up = h @ self.p[pre + "mlp/gate_proj/kernel"], h @ self.p[pre + "mlp/up_proj/kernel"]
        return x + (gate / (1 + np.exp(-gate)) * up) @ self.p[pre + "mlp/down_proj/kernel"]

    def evict(self) -> None:
        """Cut every KV layer and head to the budget: the first `sinks` and last `window` held, and the
        `budget - window - sinks` best-scored others."""
        for kv in range(len(self.held)):
            if self.held[kv][0].sum() <= self.budget:  # every head holds as many
                continue
            for head in range(self.cfg.n_kv_heads):
                held = np.flatnonzero(self.held[kv][head])  # positions, in order
                candidates = held[self.sinks:-self.window]
                votes = self.scores[kv][head][candidates]
                if self.kernel > 1:
                    padded = np.pad(votes, self.kernel // 2)
                    votes = np.array([padded[i:i + self.kernel].sum() / self.kernel for i in range(len(candidates))])
                order = sorted(range(len(candidates)), key=lambda i: -votes[i])
                dropped = candidates[sorted(order[self.budget - self.window - self.sinks:])]
                self.held[kv][head, dropped] = False
            if self.kivi:  # the kept tokens move to other slots: their pages are quantized anew
                self._flush(kv, 0)

    def generate(self, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
        """Greedy tokens after `prompt` and the logits each came from, evicting as the method does."""
        weights = [1.0 if self.method == "h2o" or i >= len(prompt) - self.window else 0.0 for i in range(len(prompt))]
        step = len(prompt) if self.kivi else 1
        for at in range(0, len(prompt), step):
            logits = self.feed(prompt[at:at + step], weights[at:at + step])
        self.evict()
        tokens, all_logits = [], []
        for _ in range(n):
            tokens.append(int(np.argmax(logits)))
            all_logits.append(logits)
            if len(tokens) == n:
                break
            logits = self.feed(tokens[-1:], [1.0 if self.method == "h2o" else 0.0])
            if self.method == "h2o":
                self.evict()
        return tokens, all_logits

    def kept(self) -> list[list[list[int]]]:
        """Per KV layer and head, the positions held."""
        return [[list(np.flatnonzero(h)) for h in held] for held in self.held]


def _flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[prefix + key] = value
    return out
