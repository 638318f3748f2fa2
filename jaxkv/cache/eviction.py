"""Token eviction under a per-sequence KV budget: H2O and SnapKV on the paged pool.

Both keep a recent window plus the earlier tokens that received the most attention (and, if asked, the first
`sinks` tokens, which attention leans on whatever they say), and differ in who votes and when. H2O: every query
adds its attention to the tokens it sees, and whenever a sequence holds more than `budget` tokens it keeps the
recent window and the best-scored others (after the prompt, then one token per decode step). SnapKV: only the
last `window` prompt queries (the observation window) vote, their votes are smoothed by a 1-D average pool
(`kernel`) and the prompt is cut to the budget once, at the end of prefill; generated tokens are
all kept. Selection is per KV layer and per KV head (the votes of a head's GQA group summed); a KV layer that
several layers read (CLA, LCKV) takes the votes of all its readers.

A sequence's held tokens are compacted into its first slots (`compact`): K and V are stored after RoPE, so a kept
token keeps its position's rotation, while new tokens go on from the sequence's position (`StepMetadata.slots`
against `positions`); the pages past the budget go back to the allocator. Votes live beside the pool, per sequence
row and slot (`PagePool.scores`), so sequences that share prefix pages never mix them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.errors import JaxkvError
from pallas_kernels.paged_attention import reference as decode
from pallas_kernels.ragged_paged_attention import PoolLayer, RaggedMetadata

METHODS = ("h2o", "snapkv")
SNAPKV_WINDOW, SNAPKV_KERNEL = 32, 7  # SnapKV's observation window and pooling kernel


@dataclasses.dataclass(frozen=True)
class Eviction:
    """method: "h2o" or "snapkv"; budget: tokens a sequence keeps per KV layer and head; window: the recent tokens
    always kept (SnapKV: its observation window); kernel: SnapKV's pooling width (1 for H2O); sinks: the first
    tokens always kept (attention sinks, as StreamingLLM keeps them)."""

    method: str
    budget: int
    window: int
    kernel: int = 1
    sinks: int = 0

    @property
    def heavy(self) -> int:
        """The tokens kept for their scores."""
        return self.budget - self.window - self.sinks

    def peak(self, n_prompt: int, max_tokens: int) -> int:
        """The most tokens a request holds: its prompt until it is cut (and a token beside it), then the budget
        and one new token (H2O), or the cut prompt and everything generated (SnapKV)."""
        after = self.budget + 1 if self.method == "h2o" else min(n_prompt, self.budget) + max_tokens
        return min(n_prompt + max_tokens, max(n_prompt + 1, after))

    def due(self, *, computed: int, held: int, prefill_end: int, cut_before: bool) -> bool:
        """Whether a sequence is cut now: past its prompt chunks (the first prefill_end tokens since admission)
        and holding more than the budget; SnapKV cuts only a prompt longer than the budget, once."""
        if self.method == "snapkv" and (cut_before or prefill_end <= self.budget):
            return False
        return computed >= prefill_end and held > self.budget

    def votes(self, start: int, n: int, prefill_end: int) -> np.ndarray:
        """Each of the tokens at positions start..start+n-1 votes with weight 1 or 0: H2O's all, SnapKV's the last
        `window` prompt tokens."""
        positions = np.arange(start, start + n)
        if self.method == "h2o":
            return np.ones(n, np.float32)
        return ((positions >= prefill_end - self.window) & (positions < prefill_end)).astype(np.float32)


def eviction_policy(method: str | None, budget: int | None, window: int | None = None,
                    sinks: int = 0) -> Eviction | None:
    """The policy of --eviction/--kv-budget/--eviction-window/--eviction-sinks, or one clear error line. Defaults:
    H2O splits the budget evenly between heavy hitters and the recent window (as the paper); SnapKV observes the
    last 32 prompt tokens (or half the budget if that is less) and pools over 7; no sinks."""
    if method is None:
        if budget is not None or window is not None or sinks:
            raise JaxkvError("--kv-budget, --eviction-window and --eviction-sinks need --eviction h2o or snapkv")
        return None
    if method not in METHODS:
        raise JaxkvError(f"eviction must be one of {', '.join(METHODS)}, got {method!r}")
    if budget is None:
        raise JaxkvError(f"eviction {method} needs a KV budget (--kv-budget N tokens)")
    if budget < 2:
        raise JaxkvError(f"the KV budget must be at least 2 tokens, got {budget}")
    if sinks < 0:
        raise JaxkvError(f"eviction sinks must be at least 0, got {sinks}")
    if window is None:
        window = (budget - sinks) // 2 if method == "h2o" else min(SNAPKV_WINDOW, (budget - sinks) // 2)
    if not 1 <= window < budget:
        raise JaxkvError(f"the eviction window must be at least 1 and below the KV budget ({budget}), got {window}")
    if sinks + window >= budget:
        raise JaxkvError(f"the KV budget ({budget}) must exceed the eviction sinks ({sinks}) plus the eviction "
                         f"window ({window}), so that some tokens are kept for their scores")
    return Eviction(method, budget, window, SNAPKV_KERNEL if method == "snapkv" else 1, sinks)


def add_attention_scores(scores: jax.Array, index: int, q: jax.Array, layer: PoolLayer, meta: RaggedMetadata,
                         rows: jax.Array, weights: jax.Array, *, softcap: float | None, strict: bool) -> jax.Array:
    """scores [layers, kv_heads, seq rows, slots] plus, at pool layer `index`, the attention probabilities of the
    step's queries q [T, H, Dh] (as `ragged_paged_attention` computes them) times each query's weight [T], summed
    over a KV head's query heads, at every slot of each step row's sequence (seq row `rows[r]`). Pure JAX: read
    once more through the block tables, apart from the attention kernel."""
    n_kv, _, page_size, _ = layer.k.shape
    n_rows, width = meta.block_tables.shape[0], meta.max_q_len
    q_lens = meta.cu_q_lens[1:] - meta.cu_q_lens[:-1]
    slot = jnp.arange(width)
    picked = jnp.clip(meta.cu_q_lens[:-1, None] + slot[None], 0, q.shape[0] - 1)  # [R, width] packed indices
    real = slot[None] < q_lens[:, None]
    weight = jnp.where(real, weights[picked], 0.0)
    kv_lens = meta.kv_lens - 1 if strict else meta.kv_lens  # an upward source: strictly earlier slots
    n_slots = meta.block_tables.shape[1] * page_size
    keys = jnp.broadcast_to(jnp.arange(n_slots), (n_rows, n_slots))
    k = decode.gather_tokens(layer.k, layer.k_scales, meta.block_tables, keys, 0, None, keys=True,
                             recent=layer.k_recent, flushed=meta.flushed)  # [K, R, C, Dh]
    qg = q[picked].astype(jnp.float32).reshape(n_rows, width, n_kv, -1, q.shape[-1])  # [R, width, K, G, Dh]
    logits = decode.soft_cap(jnp.einsum("rwkgd,krcd->krgwc", qg, k) * q.shape[-1] ** -0.5, softcap)
    query_slot = kv_lens[:, None] - q_lens[:, None] + slot[None]  # [R, width]: the slot each query sees up to
    seen = (keys[:, None, :] <= query_slot[:, :, None]) & real[:, :, None]  # [R, width, C]
    logits = jnp.where(seen[None, :, None], logits, decode.MASKED)
    probs = jax.nn.softmax(logits, axis=-1) * seen[None, :, None]
    votes = jnp.einsum("krgwc,rw->krc", probs, weight)
    heads = jnp.arange(n_kv)[:, None, None]
    return scores.at[index, heads, rows[None, :, None], keys[None]].add(votes, mode="drop")


def compact(pools, rows, held, src_tables, dst_tables, kivi=None, *, policy: Eviction):
    """Cut every listed sequence to policy.budget tokens in every KV layer and head of every pool: keep its first
    `sinks` and last `window` tokens and the `heavy` best-scored others (after pooling), in slot order, in slots
    0..budget-1 of the pages dst_tables name (read through src_tables: a sequence moves off shared pages here). rows
    [N]: the sequences' engine rows (where their scores live); held [N]: their tokens now (> budget); tables [N, W].
    Padding entries (N is bucketed) have held 0 and a row past the pool's: they change nothing. kivi: for KIVI
    pools, `jaxkv.cache.kivi.Residual.rewrite`'s plan: the kept tokens are read as floats and written back as a
    step, their full pages quantized anew."""
    out = []
    for pool in pools:
        page_size = pool.page_size
        n_slots = src_tables.shape[1] * page_size
        slot = jnp.arange(n_slots)
        scores = pool.scores[:, :, rows, :n_slots]  # [L, K, N, C]
        candidate = (slot >= policy.sinks)[None, :] & (slot[None, :] < (held - policy.window)[:, None])  # [N, C]
        votes = jnp.where(candidate, scores, 0.0)
        if policy.kernel > 1:  # SnapKV's avg_pool1d(kernel, stride 1, padding kernel // 2), zeros past the edges
            votes = jax.lax.reduce_window(votes, 0.0, jax.lax.add, (1, 1, 1, policy.kernel), (1, 1, 1, 1),
                                          [(0, 0)] * 3 + [(policy.kernel // 2, policy.kernel // 2)]) / policy.kernel
        heavy = jax.lax.top_k(jnp.where(candidate, votes, -jnp.inf), policy.heavy)[1]  # [L, K, N, heavy]
        recent = (held - policy.window)[:, None] + jnp.arange(policy.window)[None]  # [N, window]
        sinks = jnp.broadcast_to(jnp.arange(policy.sinks), heavy.shape[:3] + (policy.sinks,))
        kept = jnp.concatenate([sinks, jnp.sort(heavy, axis=-1),
                                jnp.broadcast_to(recent, heavy.shape[:3] + recent.shape[1:])],
                               axis=-1)  # [L, K, N, budget] slots, in order
        active = held > policy.budget
        src_page = jnp.take_along_axis(src_tables[None, None], kept // page_size, axis=-1)
        dst = jnp.arange(policy.budget)
        dst_page = jnp.where(active[:, None], dst_tables[:, dst // page_size], pool.k_pages.shape[2])  # else drop
        layers = jnp.arange(pool.k_pages.shape[0])[:, None, None, None]
        heads = jnp.arange(pool.k_pages.shape[1])[None, :, None, None]
        if pool.k_recent is not None:
            updates = _requantized(pool, kept, *kivi)
        else:
            updates = {}
            for name in ("k_pages", "v_pages", "k_scales", "v_scales"):
                array = getattr(pool, name)
                if array is not None:
                    moved = array[layers, heads, src_page, kept % page_size]
                    updates[name] = array.at[layers, heads, dst_page[None, None],
                                             (dst % page_size)[None, None, None]].set(moved, mode="drop")
        kept_scores = jnp.take_along_axis(scores, kept, axis=-1)
        new_scores = jnp.where(active[None, None, :, None] & (slot < policy.budget), jnp.pad(
            kept_scores, ((0, 0), (0, 0), (0, 0), (0, n_slots - policy.budget))), scores)
        updates["scores"] = pool.scores.at[:, :, rows, :n_slots].set(new_scores, mode="drop")  # (padding: dropped)
        out.append(pool.replace(**updates))
    return tuple(out)


def _requantized(pool, kept: jax.Array, read: RaggedMetadata, write: RaggedMetadata, flushes: jax.Array) -> dict:
    """A KIVI pool's arrays once each layer's kept slots kept [L, K, N, budget] are read as floats through `read`
    (dequantized, or from the rows' rings) and written back through `write` as one step of `budget` new tokens per
    cut row (`PagePool.write_kivi`): its whole pages outside the recent ones quantized anew, the rest in its ring."""
    n_rows, budget = kept.shape[2:]
    n_slots = read.block_tables.shape[1] * pool.page_size
    slots = jnp.broadcast_to(jnp.arange(n_slots), (n_rows, n_slots))
    token_rows, new_slots = jnp.repeat(jnp.arange(n_rows), budget), jnp.tile(jnp.arange(budget), n_rows)
    for index in range(pool.k_pages.shape[0]):
        layer, moved = pool.layer(index), []
        for pages, scales, recent, keys in ((layer.k, layer.k_scales, layer.k_recent, True),
                                            (layer.v, layer.v_scales, layer.v_recent, False)):
            dense = decode.gather_tokens(pages, scales, read.block_tables, slots, 0, None, keys=keys, recent=recent,
                                         flushed=read.flushed)  # [K, N, C, Dh]
            picked = jnp.take_along_axis(dense, kept[index][..., None], axis=2)  # [K, N, budget, Dh]
            moved.append(jnp.transpose(picked, (1, 2, 0, 3)).reshape(n_rows * budget, *picked.shape[::3]))
        pool = pool.write_kivi(index, *moved, write, token_rows, new_slots, flushes)
    return {name: getattr(pool, name) for name in ("k_pages", "v_pages", "k_scales", "v_scales", "k_recent",
                                                   "v_recent")}
