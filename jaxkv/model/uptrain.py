"""Uptraining: turn a pretrained model into a KV-sharing one before training it further.

Each KV layer of the new map gets the mean of the K/V projections (kernels, biases, and the
per-head k norm of Qwen3/Gemma 3) of all layers that now read it (MQA/GQA uptraining and CLA's
conversion start the same way); layers that no longer produce KV lose them. Everything else is
kept as is.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxkv.config import ModelConfig


def share_kv(cfg: ModelConfig, params: dict, kv_sources, window_layers=()) -> tuple[ModelConfig, dict]:
    """(new config, new params) for the map `kv_sources`, from a model with config `cfg`."""
    new_cfg = cfg.replace(kv_sources=tuple(kv_sources), window_layers=tuple(window_layers))
    out = jax.tree.map(lambda x: x, params)  # a new tree; arrays are shared, not copied
    kv_parts = ("k_proj", "v_proj", "k_norm")
    for layer in range(cfg.n_layers):
        out[f"layers_{layer}"]["attn"] = {k: v for k, v in params[f"layers_{layer}"]["attn"].items()
                                          if k not in kv_parts}
    for kv_layer in new_cfg.kv_layers:
        readers = [i for i, s in enumerate(new_cfg.kv_sources) if s == kv_layer]
        owners = [params[f"layers_{cfg.kv_sources[i]}"]["attn"] for i in readers]  # what those layers used before
        for part in (p for p in kv_parts if p in owners[0]):
            out[f"layers_{kv_layer}"]["attn"][part] = jax.tree.map(
                lambda *leaves: np.mean([np.asarray(x, np.float32) for x in leaves], axis=0).astype(leaves[0].dtype),
                *[o[part] for o in owners])
    return new_cfg, out
