"""An HF `config.json` as a jaxkv ModelConfig, family by family, refusing what the decoder cannot honour.

Every family is configuration of the one decoder (see `jaxkv.config`). A field that would change the
computation and that jaxkv does not implement is an error naming the field, never dropped: a model that
loads computes what transformers computes.

The LCKV authors' `LCKVLlamaForCausalLM` (github.com/whyNLP/LCKV, model_type "lckv-llama") is a Llama whose
`layer_types` string is jaxkv's KV-sharing string ("0_6_6_6_6_6_6_7", "s" for a sliding-window layer) and
whose forward_passes/backward_passes are LCKV's m and b; layers that read another layer's KV have no
k_proj/v_proj, as in jaxkv. A Llama-family model with shared KV or window layers exports in that format.
"""

from __future__ import annotations

import dataclasses

from jaxkv.config import ModelConfig, RopeScaling
from jaxkv.errors import JaxkvError
from jaxkv.sharing import from_string, to_string

# HF architecture -> family; the family decides defaults and which fields are read
ARCHITECTURES = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3", "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3",
    "LCKVLlamaForCausalLM": "llama",
}
_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
                "gemma3_text": "gemma3", "lckv-llama": "llama"}
LCKV_ARCH = "LCKVLlamaForCausalLM"
_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
GEMMA = ("gemma2", "gemma3")


def family(hf_config: dict, where: str) -> str:
    """The family of a config by its `architectures` (else `model_type`); unknown ones are an error."""
    for arch in hf_config.get("architectures") or []:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    if not hf_config.get("architectures") and hf_config.get("model_type") in _MODEL_TYPES:
        return _MODEL_TYPES[hf_config["model_type"]]
    found = (hf_config.get("architectures") or [hf_config.get("model_type", "?")])[0]
    raise JaxkvError(f"{where}: unsupported architecture {found!r} (supported: {', '.join(ARCHITECTURES)})")


def _rope(params: dict | None, theta_default: float, where: str) -> tuple[float, RopeScaling | None]:
    params = params or {}
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", theta_default))
    if kind == "default":
        return theta, None
    if kind == "llama3":
        return theta, RopeScaling(factor=params["factor"], low_freq_factor=params["low_freq_factor"],
                                  high_freq_factor=params["high_freq_factor"],
                                  original_max_position_embeddings=params["original_max_position_embeddings"])
    if kind == "linear":
        return theta, RopeScaling(factor=params["factor"], rope_type="linear")
    raise JaxkvError(f"{where}: rope_scaling type {kind!r} is not supported (supported: default, llama3, linear)")


def _is_lckv(c: dict) -> bool:
    return LCKV_ARCH in (c.get("architectures") or []) or c.get("model_type") == "lckv-llama"


def _lckv_layers(c: dict, n_layers: int, where: str) -> dict:
    """The ModelConfig fields of the LCKV authors' config: KV map, window layers, passes."""
    if c.get("force_nodiag"):
        raise JaxkvError(f"{where}: force_nodiag=true (every layer masks its diagonal) is not supported")
    types = c.get("layer_types")
    if types is None:
        types = "_".join(map(str, range(n_layers)))
    if not isinstance(types, str):
        raise JaxkvError(f"{where}: layer_types must be an underscore string such as \"0_2_2_3\", got {types!r}")
    try:
        sources, windowed = from_string(types)
    except JaxkvError as e:
        raise JaxkvError(f"{where}: layer_types: {e}") from None
    if len(sources) != n_layers:
        raise JaxkvError(f"{where}: layer_types has {len(sources)} layers, num_hidden_layers is {n_layers}")
    return dict(kv_sources=sources, window_layers=windowed, sliding_window=c.get("sliding_window", 4096) if windowed
                else None, upward_passes_no_grad=c.get("forward_passes", 7),
                upward_passes_grad=c.get("backward_passes", 2))


def _window_layers(c: dict, kind: str, n_layers: int, where: str) -> tuple[tuple[int, ...], int | None]:
    """(window layers, window) as the family's HF code decides them."""
    window = c.get("sliding_window")
    if kind == "qwen2" or kind == "qwen3":
        if not c.get("use_sliding_window"):
            window = None
    types = c.get("layer_types")
    if types is not None:
        unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
        if unknown or len(types) != n_layers:
            raise JaxkvError(f"{where}: layer_types must be {n_layers} of full_attention/sliding_attention, "
                             f"got {types!r}")
        layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    elif window is None:
        layers = ()
    elif kind == "mistral":
        layers = tuple(range(n_layers))
    elif kind in ("qwen2", "qwen3"):
        layers = tuple(range(c.get("max_window_layers", n_layers), n_layers))
    elif kind == "gemma2":
        layers = tuple(range(0, n_layers, 2))
    elif kind == "gemma3":
        pattern = c.get("sliding_window_pattern", 6)
        layers = tuple(i for i in range(n_layers) if (i + 1) % pattern)
    else:
        raise JaxkvError(f"{where}: sliding_window={window} on a {kind} model is not supported")
    if layers and not window:
        raise JaxkvError(f"{where}: sliding-window layers need sliding_window, got {window!r}")
    return layers, (window if layers else None)


def model_config(c: dict, name: str, where: str) -> ModelConfig:
    """The ModelConfig of HF config `c` (`where` names the file in errors)."""
    kind = family(c, where)
    gemma = kind in GEMMA
    for field in ("mlp_bias", "use_bidirectional_attention", "attention_chunk_size"):
        if c.get(field):
            raise JaxkvError(f"{where}: {field}={c[field]!r} is not supported")
    if c.get("partial_rotary_factor", 1.0) != 1.0:
        raise JaxkvError(f"{where}: partial_rotary_factor={c['partial_rotary_factor']} is not supported")
    act_field = "hidden_activation" if gemma and c.get("hidden_activation") else "hidden_act"
    act = c.get(act_field, "gelu_pytorch_tanh" if gemma else "silu")
    if act not in _ACTIVATIONS:
        raise JaxkvError(f"{where}: {act_field}={act!r} is not supported (supported: {', '.join(_ACTIVATIONS)})")
    try:
        n_layers, heads = c["num_hidden_layers"], c["num_attention_heads"]
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        if "full_attention" in rope:  # per layer type (Gemma 3 under transformers 5)
            local = rope.get("sliding_attention") or {}
            if local.get("rope_type", "default") != "default":
                raise JaxkvError(f"{where}: rope_parameters.sliding_attention type {local['rope_type']!r} "
                                 f"is not supported (supported: default)")
            theta, scaling = _rope(rope["full_attention"], c.get("rope_theta", 10000.0), where)
            local_theta = float(local.get("rope_theta", c.get("rope_local_base_freq", 10000.0)))
        else:
            theta, scaling = _rope(rope, c.get("rope_theta", 10000.0), where)
            local_theta = c.get("rope_local_base_freq")
        if _is_lckv(c):
            layers = _lckv_layers(c, n_layers, where)
        else:
            window_layers, window = _window_layers(c, kind, n_layers, where)
            layers = dict(window_layers=window_layers, sliding_window=window)
        bias = bool(c.get("attention_bias", False))
        return ModelConfig(
            name=name, vocab_size=c["vocab_size"], d_model=c["hidden_size"], n_layers=n_layers, n_heads=heads,
            n_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads, mlp_dim=c["intermediate_size"],
            rope_theta=theta, rope_scaling=scaling, norm_eps=c.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(c.get("tie_word_embeddings", gemma)),
            max_seq_len=c.get("max_position_embeddings", 2048), **layers,
            qkv_bias=bias or kind == "qwen2", o_bias=bias and kind != "qwen2", qk_norm=kind in ("qwen3", "gemma3"),
            activation=_ACTIVATIONS[act], norm_offset=1.0 if gemma else 0.0, sandwich_norms=gemma,
            embed_scale=gemma, attn_softcap=c.get("attn_logit_softcapping") if gemma else None,
            final_softcap=c.get("final_logit_softcapping") if gemma else None,
            query_scale=c.get("query_pre_attn_scalar") if gemma else None,
            window_rope_theta=float(local_theta) if kind == "gemma3" and local_theta else None, family=kind,
        )
    except KeyError as e:
        raise JaxkvError(f"{where} lacks {e}") from None


_RUNTIME_FIELDS = ("dtype", "param_dtype", "upward_passes_no_grad", "upward_passes_grad", "upward_schedule",
                   "attention_backend", "streaming_window", "streaming_sinks", "kv_rotate",
                   "name")  # not what a checkpoint computes


def _rope_dict(theta: float, scaling: RopeScaling | None) -> dict:
    if scaling is None:
        return {"rope_type": "default", "rope_theta": theta}
    fields = {"factor": scaling.factor} if scaling.rope_type == "linear" else {
        "factor": scaling.factor, "low_freq_factor": scaling.low_freq_factor,
        "high_freq_factor": scaling.high_freq_factor,
        "original_max_position_embeddings": scaling.original_max_position_embeddings}
    return {"rope_type": scaling.rope_type, "rope_theta": theta, **fields}


def _lckv_config_dict(cfg: ModelConfig) -> dict:
    """The fields of the LCKV authors' LCKVLlamaConfig (a transformers 4.45 LlamaConfig) beyond the shared ones."""
    if cfg.family != "llama":
        raise JaxkvError(f"{cfg.name} shares KV between layers or has window layers: only Llama-family models export "
                         f"so, as the LCKV authors' {LCKV_ARCH}; HF's {cfg.family} has no such layers")
    scaling = {k: v for k, v in _rope_dict(cfg.rope_theta, cfg.rope_scaling).items() if k != "rope_theta"}
    return {"architectures": [LCKV_ARCH], "model_type": "lckv-llama", "torch_dtype": cfg.param_dtype,
            "hidden_act": "silu", "attention_bias": cfg.qkv_bias, "mlp_bias": False, "rope_theta": cfg.rope_theta,
            "rope_scaling": None if cfg.rope_scaling is None else scaling,
            "layer_types": to_string(cfg.kv_sources, cfg.window_layers),
            "forward_passes": cfg.upward_passes_no_grad, "backward_passes": cfg.upward_passes_grad,
            "sliding_window": cfg.sliding_window or 4096, "use_sequential": False, "force_nodiag": False}


def hf_config_dict(cfg: ModelConfig, bos_id: int | None, eos_ids: tuple[int, ...]) -> dict:
    """The HF config.json of `cfg` as its family writes it (transformers 5 field names), or for a Llama with shared
    KV or window layers, as the LCKV authors' code writes it. It must read back as `cfg` (`model_config`): a model
    the format cannot express (a window where the family has none, a field of another family) is an error naming
    what differs."""
    out = {"vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_dim,
           "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
           "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
           "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
           "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": bos_id,
           "eos_token_id": list(eos_ids) if len(eos_ids) > 1 else (eos_ids[0] if eos_ids else None)}
    if cfg.kv_sources != tuple(range(cfg.n_layers)) or (cfg.family == "llama" and cfg.window_layers):
        out.update(_lckv_config_dict(cfg))
    else:
        out.update(_family_config_dict(cfg))
    arch = out["architectures"][0]
    read_back = model_config(out, cfg.name, f"the {arch} config of {cfg.name}")
    differ = [f for f in dataclasses.asdict(cfg) if f not in _RUNTIME_FIELDS
              and getattr(read_back, f) != getattr(cfg, f)]
    if differ:
        raise JaxkvError(f"{cfg.name} cannot be written as {arch}: " + ", ".join(
            f"{f}={getattr(cfg, f)!r} (the format has {getattr(read_back, f)!r})" for f in differ))
    return out


def _family_config_dict(cfg: ModelConfig) -> dict:
    """The family's own fields, as transformers 5 names them."""
    arch = next(a for a, f in ARCHITECTURES.items() if f == cfg.family)
    gemma = cfg.family in GEMMA
    out = {"architectures": [arch], "model_type": {"gemma3": "gemma3_text"}.get(cfg.family, cfg.family),
           "dtype": cfg.param_dtype,
           "hidden_activation" if gemma else "hidden_act": {v: k for k, v in _ACTIVATIONS.items()}[cfg.activation],
           "rope_parameters": _rope_dict(cfg.rope_theta, cfg.rope_scaling)}
    if cfg.family in ("llama", "qwen3"):
        out["attention_bias"] = cfg.qkv_bias
    windowed = ["sliding_attention" if i in cfg.window_layers else "full_attention" for i in range(cfg.n_layers)]
    if cfg.family == "mistral":
        out["sliding_window"] = cfg.sliding_window if cfg.window_layers else None
    elif cfg.family != "llama":
        out.update(layer_types=windowed, sliding_window=cfg.sliding_window)
        if cfg.family in ("qwen2", "qwen3"):
            out.update(use_sliding_window=bool(cfg.window_layers), max_window_layers=cfg.n_layers)
    if gemma:
        scalar = cfg.query_scale or cfg.head_dim  # an int in transformers' config class
        out.update(query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,
                   attn_logit_softcapping=cfg.attn_softcap,
                   final_logit_softcapping=cfg.final_softcap)
    if cfg.family == "gemma3":
        out["rope_parameters"] = {"full_attention": out["rope_parameters"],
                                  "sliding_attention": _rope_dict(cfg.window_rope_theta or cfg.rope_theta, None)}
    return out
