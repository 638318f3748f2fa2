"""H2O and SnapKV written literally on a dense cache, token by token, in numpy float64: the truth jaxkv's eviction on
the paged pool is checked against (same kept sets, same logits, same greedy tokens).

The model is a plain Llama (RMSNorm, rotate-half RoPE, GQA, SwiGLU) read from jaxkv's params pytree, with any
KV-sharing map (CLA, and LCKV's upward sources: fed token by token, a layer reads only the earlier tokens of a
source above it, as the paper's decoding does). Each KV layer keeps, per KV head, the K/V of every
token it was fed (keys after RoPE, at the token's position) and which of them are still held; a query attends to
the held ones. H2O (Zhang et al. 2023): every query adds its attention probabilities (summed over its KV head's
query heads) to the score of each held token; once the prompt is in, and after every generated token, while a
head holds more than `budget` tokens the lowest-scored token outside the last `window` held ones is dropped.
SnapKV (Li et al. 2024): only the last `window` prompt queries score; at the end of the prompt each head keeps its
last `window` tokens and the `budget - window` others with the highest scores after a 1-D average pool of width
`kernel` (zeros past the ends, as torch's avg_pool1d with padding kernel // 2), nothing is dropped afterwards.
"""

from __future__ import annotations

import numpy as np


def _norm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x) + eps) * scale


def _rope(x, position, theta):
    """x [heads, Dh] rotated by `position`, rotate-half."""
    half = x.shape[-1] // 2
    angles = position / theta ** (np.arange(half) * 2 / x.shape[-1])
    cos, sin = np.cos(angles), np.sin(angles)
    x1, x2 = x[:, :half], x[:, half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class EvictingDenseModel:
    def __init__(self, cfg, params, *, method: str, budget: int, window: int, kernel: int = 1):
        self.cfg, self.method, self.budget, self.window, self.kernel = cfg, method, budget, window, kernel
        self.p = {k: np.asarray(v, np.float64) for k, v in _flat(params).items()}
        kv_layers = cfg.n_kv_layers
        self.k = [[] for _ in range(kv_layers)]  # per KV layer: per token [kv_heads, Dh]
        self.v = [[] for _ in range(kv_layers)]
        self.held = [np.zeros((cfg.n_kv_heads, 0), bool) for _ in range(kv_layers)]
        self.scores = [np.zeros((cfg.n_kv_heads, 0)) for _ in range(kv_layers)]
        self.position = 0

    def feed(self, token: int, score_weight: float) -> np.ndarray:
        """One token through every layer at the next position: its logits [V]."""
        cfg, p = self.cfg, self.p
        x = p["embed/embedding"][token]
        group = cfg.n_heads // cfg.n_kv_heads
        for layer in range(cfg.n_layers):
            pre = f"layers_{layer}/"
            h = _norm(x, p[pre + "attn_norm/scale"], cfg.norm_eps)
            q = _rope(np.einsum("d,dhe->he", h, p[pre + "attn/q_proj/kernel"]), self.position, cfg.rope_theta)
            kv = cfg.kv_index(layer)
            if cfg.kv_sources[layer] == layer:
                self.k[kv].append(_rope(np.einsum("d,dhe->he", h, p[pre + "attn/k_proj/kernel"]), self.position,
                                        cfg.rope_theta))
                self.v[kv].append(np.einsum("d,dhe->he", h, p[pre + "attn/v_proj/kernel"]))
                self.held[kv] = np.concatenate([self.held[kv], np.ones((cfg.n_kv_heads, 1), bool)], axis=1)
                self.scores[kv] = np.concatenate([self.scores[kv], np.zeros((cfg.n_kv_heads, 1))], axis=1)
            out = np.zeros_like(q)
            if not self.k[kv]:  # an upward source before its first token: nothing to see, zeros
                x = x + np.einsum("he,hed->d", out, p[pre + "attn/o_proj/kernel"])
                x = self._mlp(x, pre)
                continue
            keys, values = np.stack(self.k[kv], axis=1), np.stack(self.v[kv], axis=1)  # [K, T, Dh]
            held = self.held[kv][:, :keys.shape[1]]
            for head in range(cfg.n_heads):
                kvh = head // group
                logits = keys[kvh] @ q[head] / np.sqrt(cfg.head_dim)
                logits = np.where(held[kvh], logits, -np.inf)
                probs = np.exp(logits - logits.max())
                probs /= probs.sum()
                out[head] = probs @ values[kvh]
                self.scores[kv][kvh, :len(probs)] += score_weight * probs
            x = x + np.einsum("he,hed->d", out, p[pre + "attn/o_proj/kernel"])
            x = self._mlp(x, pre)
        self.position += 1
        return _norm(x, p["final_norm/scale"], cfg.norm_eps) @ p["lm_head/kernel"]

    def _mlp(self, x, pre):
        h = _norm(x, self.p[pre + "mlp_norm/scale"], self.cfg.norm_eps)
        gate, up = h @ self.p[pre + "mlp/gate_proj/kernel"], h @ self.p[pre + "mlp/up_proj/kernel"]
        return x + (gate / (1 + np.exp(-gate)) * up) @ self.p[pre + "mlp/down_proj/kernel"]

    def evict(self) -> None:
        """Cut every KV layer and head to the budget (`budget - window` best-scored + the last `window` held)."""
        for kv in range(len(self.held)):
            for head in range(self.cfg.n_kv_heads):
                held = np.flatnonzero(self.held[kv][head])  # positions, in order
                if len(held) <= self.budget:
                    continue
                candidates = held[:-self.window]
                votes = self.scores[kv][head][candidates]
                if self.kernel > 1:
                    padded = np.pad(votes, self.kernel // 2)
                    votes = np.array([padded[i:i + self.kernel].sum() / self.kernel for i in range(len(candidates))])
                order = sorted(range(len(candidates)), key=lambda i: -votes[i])
                dropped = candidates[sorted(order[self.budget - self.window:])]
                self.held[kv][head, dropped] = False

    def generate(self, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
        """Greedy tokens after `prompt` and the logits each came from, evicting as the method does."""
        for i, token in enumerate(prompt):
            weight = 1.0 if self.method == "h2o" or i >= len(prompt) - self.window else 0.0
            logits = self.feed(token, weight)
        self.evict()
        tokens, all_logits = [], []
        for _ in range(n):
            tokens.append(int(np.argmax(logits)))
            all_logits.append(logits)
            if len(tokens) == n:
                break
            logits = self.feed(tokens[-1], 1.0 if self.method == "h2o" else 0.0)
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
