"""Token sampling: greedy, temperature, top-k and top-p, applied in HF's order.

Sampling values are arrays, one per sequence, so changing them never recompiles.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp

from jaxkv.errors import InvalidRequest

# Past this temperature the distribution is uniform to float32 precision anyway; larger values only
# overflow on the way to the device.
MAX_TEMPERATURE = 100.0
# Below this top_p the float32 comparison that keeps the most likely token could round to nothing.
MIN_TOP_P = 1e-6


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; top_k 0 and top_p 1.0 switch those filters off. Every value is range-checked
    here (InvalidRequest naming the field), so none can fail later on the device."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not _is_real(self.temperature) or not 0 <= self.temperature <= MAX_TEMPERATURE:  # NaN, inf fail
            raise InvalidRequest(f"temperature must be a number in [0, {MAX_TEMPERATURE:g}], got {self.temperature}",
                                 "temperature")
        if not _is_int(self.top_k) or not 0 <= self.top_k < 2**31:
            raise InvalidRequest(f"top_k must be a non-negative integer (0 is off), got {self.top_k}", "top_k")
        if not _is_real(self.top_p) or not MIN_TOP_P <= self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in [{MIN_TOP_P:g}, 1], got {self.top_p}", "top_p")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**32:
            raise InvalidRequest(f"seed must be an integer in [0, 2**32), got {self.seed}", "seed")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Scale logits [B, V] by temperature, then mask (to -inf) tokens outside top-k and top-p.
    The sort that top-k/top-p need (slow over a large vocabulary on CPU) runs only if some row asks."""
    logits = logits / jnp.maximum(temperature, 1e-6)[:, None]
    return jax.lax.cond(jnp.any(top_k > 0) | jnp.any(top_p < 1.0), _top_k_top_p, lambda x, k, p: x, logits, top_k,
                        top_p)


def _top_k_top_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    sorted_logits = -jnp.sort(-logits, axis=-1)  # descending
    vocab = logits.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(sorted_logits, (k - 1)[:, None], axis=-1)
    sorted_logits = jnp.where(sorted_logits >= kth, sorted_logits, -jnp.inf)
    # top-p: keep the smallest prefix whose mass reaches p (the top token always stays).
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < top_p[:, None]) | (jnp.arange(vocab) == 0)
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where((logits >= cutoff) & (logits >= kth), logits, -jnp.inf)


def sample(logits: jax.Array, keys: jax.Array, temperature, top_k, top_p, *, greedy: bool) -> jax.Array:
    """Next token per row of logits [B, V]; `keys` [B] are per-sequence PRNG keys. Rows with temperature 0
    are greedy; when all are, nothing is drawn.

    Speculative decoding verifies with this rule as it is: a proposed token is kept when the token sampled at its
    position equals it, which happens with probability p(proposal), as speculative sampling keeps a deterministic
    proposal (Leviathan et al. 2023, with q one-hot). So every emitted token is the one plain decoding samples with
    the same seed and step, not only one of the same distribution."""
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if greedy:
        return best

    def draw(_):
        filtered = filter_logits(logits, temperature, top_k, top_p)
        token = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
        return jnp.where(temperature == 0, best, token)

    return jax.lax.cond(jnp.all(temperature == 0), lambda _: best, draw, None)
