"""Uptraining: turn a pretrained model into a KV-sharing one before training it further.

Each KV layer of the new map gets the mean of the K/V projections of all layers that now
read it (MQA/GQA uptraining and CLA's conversion start the same way); layers that no
longer produce KV lose their projections. Everything else is kept as is.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxkv.config import ModelConfig


def share_kv(cfg: ModelConfig, params: dict, kv_sources, window_layers=()) -> tuple[ModelConfig, dict]:
    """(new config, new params) for the map `kv_sources`, from a model with config `cfg`."""
    new_cfg = cfg.replace(kv_sources=tuple(kv_sources), window_layers=tuple(window_layers))
    out = jax.tree.map(lambda x: x, params)  # a new tree; arrays are shared, not copied
    for layer in range(cfg.n_layers):
        out[f"layers_{layer}"]["attn"] = {k: v for k, v in params[f"layers_{layer}"]["attn"].items()
                                          if k not in ("k_proj", "v_proj")}
    for kv_layer in new_cfg.kv_layers:
        readers = [i for i, s in enumerate(new_cfg.kv_sources) if s == kv_layer]
        owners = [cfg.kv_sources[i] for i in readers]  # whose projections those layers used before
        attn = out[f"layers_{kv_layer}"]["attn"]
        for proj in ("k_proj", "v_proj"):
            kernels = [np.asarray(params[f"layers_{o}"]["attn"][proj]["kernel"], np.float32) for o in owners]
            dtype = params[f"layers_{owners[0]}"]["attn"][proj]["kernel"].dtype
            attn[proj] = {"kernel": np.mean(kernels, axis=0).astype(dtype)}
    return new_cfg, out
