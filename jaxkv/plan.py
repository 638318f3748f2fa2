"""KV memory planning: bytes per token, bytes for a batch and context, and the batch that fits.

Everything follows from the config alone (no weights are loaded), so a plan for a 7B model
runs anywhere in a second.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.cache.dense import kv_bytes_per_token
from jaxkv.cache.kivi import ring_pages
from jaxkv.cache.paged import page_groups
from jaxkv.cache.quantize import KIVI, KIVI_PAGE, KIVI_RECENT, KV_DTYPES
from jaxkv.config import ModelConfig
from jaxkv.errors import JaxkvError
from jaxkv.model.decoder import abstract_params

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'24GiB', '80GB', '1.5e9' or '1073741824' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise JaxkvError(f"bad memory size {text!r}: use e.g. 24GiB, 80GB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def parameter_count(cfg: ModelConfig) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract_params(cfg))))


def layer_tokens(cfg: ModelConfig, context: int, page_size: int = 16, chunk: int = 64) -> list[dict]:
    """Per KV layer: the tokens of a `context`-token sequence it holds in the serving engine's pages, rounded to
    pages (page_size; prompt chunks of `chunk`): every token, or its window's ring (`page_groups`)."""
    pages = -(-context // page_size)
    ring_of = {k: g.ring for g in page_groups(cfg, page_size, chunk, pages) for k in g.kv_layers}
    return [{"kv_layer": k, "layer": layer, "ring_pages": ring_of[k],
             "tokens_held": min(context, (ring_of[k] or pages) * page_size)}
            for k, layer in enumerate(cfg.kv_layers)]


def _kv_dtype(cfg: ModelConfig, kv_dtype) -> str:
    kv_dtype = kv_dtype if isinstance(kv_dtype, str) else jnp.dtype(kv_dtype or cfg.dtype).name
    if kv_dtype not in KV_DTYPES:
        raise JaxkvError(f"KV dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")
    return kv_dtype


def _sequence(cfg: ModelConfig, context: int, kv_dtype: str) -> tuple[list[dict], int, int]:
    """(per KV layer: what it holds, KIVI's float recent bytes, KV bytes) of one sequence of `context` tokens."""
    per_layer_token = kv_bytes_per_token(cfg, kv_dtype) // cfg.n_kv_layers
    layers = layer_tokens(cfg, context, KIVI_PAGE if kv_dtype in KIVI else 16)
    for row in layers:
        row["bytes"] = row["tokens_held"] * per_layer_token
    recent = 0 if kv_dtype not in KIVI else (2 * cfg.n_kv_layers * cfg.n_kv_heads * cfg.head_dim * KIVI_PAGE *
                                             ring_pages(KIVI_RECENT, KIVI_PAGE) * jnp.dtype(cfg.dtype).itemsize)
    return layers, recent, sum(row["bytes"] for row in layers) + recent


def sequence_bytes(cfg: ModelConfig, context: int, kv_dtype=None) -> int:
    """KV bytes one sequence of `context` tokens holds in the serving engine (window layers: their ring)."""
    return _sequence(cfg, context, _kv_dtype(cfg, kv_dtype))[2]


def plan(cfg: ModelConfig, context: int, batch: int, kv_dtype=None, memory: int | None = None) -> dict:
    """The KV and weight budget of one model geometry (its kv_sources and window layers included): KV bytes per
    token written, and per sequence held, where window layers keep only their ring of pages (KIVI: plus its float
    pages for the recent tokens, `recent_bytes_per_sequence`)."""
    if context < 1 or batch < 1:
        raise JaxkvError(f"context and batch must be positive, got {context} and {batch}")
    kv_dtype = _kv_dtype(cfg, kv_dtype)
    per_token = kv_bytes_per_token(cfg, kv_dtype)
    layers, recent, per_sequence = _sequence(cfg, context, kv_dtype)
    params = parameter_count(cfg)
    weight_bytes = params * jnp.dtype(cfg.param_dtype).itemsize
    out = {
        "kv_layers": cfg.n_kv_layers, "kv_sources": list(cfg.kv_sources), "window_layers": list(cfg.window_layers),
        "kv_bytes_per_token": per_token, "kv_bytes_per_sequence": per_sequence, "kv_bytes": per_sequence * batch,
        "parameters": params, "weight_bytes": weight_bytes, "kv_dtype": kv_dtype, "per_kv_layer": layers,
        "recent_bytes_per_sequence": recent,
    }
    if memory is not None:
        room = memory - weight_bytes
        out["max_batch"] = max(room // per_sequence, 0)
    return out


def plot_plan(variants: dict[str, tuple[ModelConfig, str | None]], context: int, memory: int | None = None):
    """A matplotlib Figure of two panels for variants {label: (config, KV dtype)}: KV bytes per sequence against
    context (log-log, powers of two up to the larger of `context` and the model's max_seq_len, a line at
    `context`), and the largest batch at `context` against device memory (up to 2x `memory`, default 80 GiB),
    what is left after the weights."""
    from matplotlib.figure import Figure  # not pyplot: no window, no global state (a notebook shows it as is)

    first = next(iter(variants.values()))[0]
    contexts = [2 ** i for i in range(7, max(context, first.max_seq_len, 256).bit_length() + 1)]
    memories = np.linspace(0, 2 * memory if memory else 80 * 2**30, 200)
    figure = Figure(figsize=(11, 4), layout="constrained")
    by_context, by_memory = figure.subplots(1, 2)
    for label, (cfg, kv_dtype) in variants.items():
        by_context.plot(contexts, [sequence_bytes(cfg, c, kv_dtype) / 2**20 for c in contexts], marker=".",
                        label=label)
        per_sequence = sequence_bytes(cfg, context, kv_dtype)
        weights = parameter_count(cfg) * jnp.dtype(cfg.param_dtype).itemsize
        by_memory.plot(memories / 2**30, np.maximum(memories - weights, 0) // per_sequence, label=label)
    by_context.axvline(context, color="gray", linestyle=":", linewidth=1)
    by_context.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="KV per sequence (MiB)",
                   title=f"{first.name}: KV memory against context")
    by_memory.set(xlabel="device memory (GiB)", ylabel="largest batch", title=f"largest batch at context {context:,}")
    if memory:
        by_memory.axvline(memory / 2**30, color="gray", linestyle=":", linewidth=1)
    for axes in (by_context, by_memory):
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize="small")
    return figure
