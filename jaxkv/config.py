"""ModelConfig: the geometry of a Llama-family decoder, including which layers store KV.

`kv_sources[i]` is the layer whose K/V layer i attends to. Identity is the standard
model; any other map (CLA, LCKV, YOCO) makes some layers readers of another layer's KV,
and only the layers that are their own source own K/V projections and cache storage.
A source above the reader (LCKV) is computed by iterating the forward pass:
`upward_passes_no_grad` passes without gradient, then `upward_passes_grad` with it.
`upward_schedule` says over which layers: "per_group" (the default, the LCKV authors' iteration plan)
iterates each group of layers tied by upward reads on its own, from the hidden state below it, and runs
the other layers once; "joint" iterates every layer up to the last upward source together, so a later
group refines while an earlier one still converges. Both converge to token-by-token decoding and agree
exactly for one group; per_group never computes more, and reproduces the authors' training.
Layers in `window_layers` attend only to the last `sliding_window` positions.
`streaming_window` turns on StreamingLLM for inference: every layer keeps the first
`streaming_sinks` positions and the last `streaming_window` ones, on a paged cache whose
size no longer grows with the sequence.
`kv_rotate` multiplies keys and queries (after RoPE) by one orthonormal Hadamard matrix, so scores are unchanged
while a channel's outliers spread over all channels before the KV is quantized (QuaRot; llama.cpp does it for
quantized KV).
`attention_backend` picks the paged decode kernel (pallas_kernels.paged_attention):
"auto" is Pallas on GPU/TPU and the pure-JAX reference on CPU.
The remaining fields are what the families beyond Llama change (Qwen2/3, Mistral, Gemma 2/3), as
configuration of the one decoder: projection biases, per-head q/k norms, the MLP's activation,
Gemma's (1 + w) norms, norms after each sublayer, scaled embeddings, soft-capped logits, the query
scale and a RoPE base of its own for window layers; `family` is the HF architecture an export writes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from jaxkv.errors import JaxkvError
from jaxkv.sharing import from_string

DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("auto", "reference", "gpu", "tpu")
ACTIVATIONS = ("silu", "gelu_tanh")
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")  # what an HF export writes it as
ROPE_TYPES = ("llama3", "linear")
UPWARD_SCHEDULES = ("per_group", "joint")


def _coerce_numbers(obj) -> None:
    """Make int/float fields their declared type: YAML 1.1 reads `1e-5` as a string."""
    for field in dataclasses.fields(obj):
        kind = {"int": int, "float": float}.get(str(field.type))
        value = getattr(obj, field.name)
        if kind and not isinstance(value, kind):
            try:
                object.__setattr__(obj, field.name, kind(value))
            except (TypeError, ValueError):
                raise JaxkvError(f"{type(obj).__name__}.{field.name} must be a number, got {value!r}") from None


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Frequency scaling of RoPE: Llama 3's (HF `rope_type: llama3`) or position interpolation (`linear`:
    every frequency divided by `factor`, the other fields unused)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    rope_type: str = "llama3"

    def __post_init__(self):
        _coerce_numbers(self)
        if self.rope_type not in ROPE_TYPES:
            raise JaxkvError(f"unsupported RoPE scaling type {self.rope_type!r} (supported: {', '.join(ROPE_TYPES)})")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    max_seq_len: int = 2048
    dtype: str = "float32"
    param_dtype: str = "float32"
    kv_sources: tuple[int, ...] | str | None = None
    upward_passes_no_grad: int = 7
    upward_passes_grad: int = 2
    upward_schedule: str = "per_group"
    window_layers: tuple[int, ...] = ()
    sliding_window: int | None = None
    attention_backend: str = "auto"
    streaming_window: int | None = None
    streaming_sinks: int = 4
    kv_rotate: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    activation: str = "silu"
    norm_offset: float = 0.0
    sandwich_norms: bool = False
    embed_scale: bool = False
    attn_softcap: float | None = None
    final_softcap: float | None = None
    query_scale: float | None = None
    window_rope_theta: float | None = None
    family: str = "llama"
    name: str = "custom"

    def __post_init__(self):
        _coerce_numbers(self)
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        sources = self.kv_sources
        if isinstance(sources, str):  # the underscore form of published LCKV configs
            sources, windowed = from_string(sources)
            object.__setattr__(self, "window_layers", tuple(self.window_layers) + windowed)
        if sources is not None and not isinstance(sources, (list, tuple)):
            raise JaxkvError(f"kv_sources must be a list of layer indices or an underscore string such as "
                             f"\"0_0_2_2\" (quote it in YAML), got {sources!r}")
        sources = tuple(range(self.n_layers)) if sources is None else tuple(int(s) for s in sources)
        object.__setattr__(self, "kv_sources", sources)
        object.__setattr__(self, "window_layers", tuple(sorted({int(i) for i in self.window_layers})))
        for field, kind in (("sliding_window", int), ("streaming_window", int), ("attn_softcap", float),
                            ("final_softcap", float), ("query_scale", float), ("window_rope_theta", float)):
            if getattr(self, field) is not None:
                object.__setattr__(self, field, kind(getattr(self, field)))
        self._validate()

    def _validate(self):
        for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_dim", "max_seq_len"):
            if int(getattr(self, field)) <= 0:
                raise JaxkvError(f"ModelConfig.{field} must be positive, got {getattr(self, field)}")
        if self.n_heads % self.n_kv_heads:
            raise JaxkvError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in DTYPES:
                raise JaxkvError(f"ModelConfig.{field} must be one of {DTYPES}, got {getattr(self, field)!r}")
        if len(self.kv_sources) != self.n_layers:
            raise JaxkvError(f"kv_sources has {len(self.kv_sources)} entries for {self.n_layers} layers")
        for layer, src in enumerate(self.kv_sources):
            if not 0 <= src < self.n_layers:
                raise JaxkvError(f"kv_sources[{layer}] = {src} is not a layer index")
            if self.kv_sources[src] != src:
                raise JaxkvError(
                    f"layer {layer} reads the KV of layer {src}, which does not produce KV itself "
                    f"(kv_sources[{src}] = {self.kv_sources[src]})"
                )
        if self.upward_passes_no_grad < 0 or self.upward_passes_grad < 1:
            raise JaxkvError(f"upward passes must be >= 0 without gradient and >= 1 with it, got "
                             f"{self.upward_passes_no_grad} and {self.upward_passes_grad}")
        if self.upward_schedule not in UPWARD_SCHEDULES:
            raise JaxkvError(f"upward_schedule must be one of {UPWARD_SCHEDULES}, got {self.upward_schedule!r}")
        if any(not 0 <= i < self.n_layers for i in self.window_layers):
            raise JaxkvError(f"window_layers {list(self.window_layers)} are not all layer indices")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise JaxkvError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if self.window_layers and (self.sliding_window or 0) < 1:
            raise JaxkvError("window_layers need a positive sliding_window (in tokens)")
        if self.family not in FAMILIES:
            raise JaxkvError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.activation not in ACTIVATIONS:
            raise JaxkvError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        for field in ("attn_softcap", "final_softcap", "query_scale", "window_rope_theta"):
            if getattr(self, field) is not None and getattr(self, field) <= 0:
                raise JaxkvError(f"ModelConfig.{field} must be positive, got {getattr(self, field)}")
        if self.kv_rotate and (self.head_dim & (self.head_dim - 1) or self.streaming_window is not None):
            raise JaxkvError(f"kv_rotate needs a power-of-two head_dim (got {self.head_dim}) and no StreamingLLM "
                             f"(its sinks are re-rotated with RoPE as written)")
        if self.streaming_window is not None and (self.streaming_window < 1 or self.streaming_sinks < 0):
            raise JaxkvError(f"StreamingLLM needs streaming_window >= 1 and streaming_sinks >= 0, got "
                             f"{self.streaming_window} and {self.streaming_sinks}")

    # --- derived geometry -------------------------------------------------------------
    @property
    def kv_layers(self) -> tuple[int, ...]:
        """Layers that compute and store K/V, in order; their position is their index in the cache's layer axis."""
        return tuple(i for i, s in enumerate(self.kv_sources) if s == i)

    @property
    def n_kv_layers(self) -> int:
        return len(self.kv_layers)

    def kv_index(self, layer: int) -> int:
        """Index into the cache's layer axis of the KV that `layer` attends to."""
        return self.kv_layers.index(self.kv_sources[layer])

    def has_upward_sources(self) -> bool:
        return bool(self.upward_targets)

    @property
    def upward_targets(self) -> tuple[int, ...]:
        """KV layers that some lower layer reads: their KV must be iterated to a fixed point."""
        return tuple(sorted({src for i, src in enumerate(self.kv_sources) if src > i}))

    @property
    def upward_segments(self) -> tuple[tuple[int, int, bool], ...]:
        """The layers in order as (start, stop, iterated) runs, per `upward_schedule`: an iterated run holds
        every layer whose KV depends on a later layer of the run (an upward read and all layers up to its
        source, closed under the sources those layers read); the others run once."""
        if not self.upward_targets:
            return ((0, self.n_layers, False),)
        if self.upward_schedule == "joint":
            top = self.upward_targets[-1] + 1
            return ((0, top, True),) + (((top, self.n_layers, False),) if top < self.n_layers else ())
        segments, i = [], 0
        while i < self.n_layers:
            if self.kv_sources[i] > i:
                top = self.kv_sources[i]
                while top < max(self.kv_sources[i:top + 1]):
                    top = max(self.kv_sources[i:top + 1])
                segments.append((i, top + 1, True))
                i = top + 1
            else:
                start = i
                while i < self.n_layers and self.kv_sources[i] <= i:
                    i += 1
                segments.append((start, i, False))
        return tuple(segments)

    def window(self, layer: int) -> int | None:
        """How many recent positions `layer` attends to (None: all): its sliding window, capped by StreamingLLM's."""
        windows = [w for w in (self.sliding_window if layer in self.window_layers else None, self.streaming_window)
                   if w is not None]
        return min(windows) if windows else None

    def rope(self, layer: int) -> tuple[float, RopeScaling | None]:
        """(base, scaling) of the RoPE that `layer`'s KV is rotated with: a window layer's own base when the
        model has one (Gemma 3's local layers, unscaled), else the model's. A layer reading another's KV rotates
        its queries as that KV was, so the source decides."""
        source = self.kv_sources[layer]
        if self.window_rope_theta is not None and source in self.window_layers:
            return self.window_rope_theta, None
        return self.rope_theta, self.rope_scaling

    @property
    def attention_sinks(self) -> int:
        """The first positions every layer keeps seeing (StreamingLLM's sinks; 0 without streaming)."""
        return self.streaming_sinks if self.streaming_window is not None else 0

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # --- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["kv_sources"] = list(self.kv_sources)
        out["window_layers"] = list(self.window_layers)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise JaxkvError(f"unknown ModelConfig fields: {', '.join(unknown)}")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.default is dataclasses.MISSING and f.name not in data)
        if missing:
            raise JaxkvError(f"ModelConfig is missing fields: {', '.join(missing)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        text = yaml.safe_dump(self.to_dict(), sort_keys=False) if path.suffix in (".yaml", ".yml") \
            else json.dumps(self.to_dict(), indent=2)
        path.write_text(text)

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        """Read a config written by `save`, or a preset file whose model lives under `model:`."""
        path = Path(path)
        try:
            text = path.read_text()
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (OSError, ValueError, yaml.YAMLError) as e:
            raise JaxkvError(f"cannot read model config {path}: {e}") from None
        if not isinstance(data, dict):
            raise JaxkvError(f"model config {path} is not a mapping")
        return cls.from_dict(data.get("model", data))
