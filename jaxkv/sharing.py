"""Cross-layer KV sharing maps: for each layer, the layer whose K/V it attends to.

The constructors follow the papers (../shared/reference/methods.md): CLA groups
consecutive layers onto the first of each group; LCKV (sandwich-top) sends the middle
layers to the top KV layer and keeps w warmup layers standard, split between both ends;
YOCO (pizza-bottom) lets the second half read the KV of the first layer of that half.
`systematic` builds the nine partition x target configurations of Wu & Tu's study.
The underscore string ("0_20_20_..._21", an "s" suffix marking a sliding-window layer)
is the form published LCKV configs use.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, NamedTuple

from jaxkv.errors import JaxkvError

if TYPE_CHECKING:  # config parses the underscore form with from_string: sharing must not import it back
    from jaxkv.config import ModelConfig

KVSources = tuple[int, ...]
PARTITIONS = ("pizza", "sandwich", "lasagna")
TARGETS = ("bottom", "middle", "top")


class LayerMap(NamedTuple):
    """KV source of every layer, and the layers that attend through a sliding window."""

    sources: KVSources
    windowed: tuple[int, ...] = ()


def standard(n_layers: int) -> KVSources:
    return tuple(range(n_layers))


def cla(n_layers: int, factor: int) -> KVSources:
    """CLA-`factor`: each group of `factor` consecutive layers reads its first layer's KV."""
    if factor < 1:
        raise JaxkvError(f"CLA factor must be >= 1, got {factor}")
    return tuple(i - i % factor for i in range(n_layers))


def lckv(n_layers: int, warmup: int) -> KVSources:
    """LCKV sandwich: layers in [w//2, L - w//2) read the KV of layer L - w//2 - 1."""
    if not 0 <= warmup < n_layers:
        raise JaxkvError(f"LCKV warmup layers must be in [0, {n_layers}), got {warmup}")
    start, end = warmup // 2, n_layers - warmup // 2
    return _grouped(n_layers, [(start, end)], "top")


def yoco(n_layers: int) -> KVSources:
    """YOCO-style: the first half keeps its own KV; the second half reads layer L//2's."""
    return _grouped(n_layers, [(n_layers // 2, n_layers)], "bottom")


def _grouped(n_layers: int, groups: list[tuple[int, int]], target: str) -> KVSources:
    """Layers inside each [start, end) group read its bottom, middle or top layer; others are standard."""
    sources = list(range(n_layers))
    for start, end in groups:
        kv = {"bottom": start, "middle": (start + end - 1) // 2, "top": end - 1}[target]
        sources[start:end] = [kv] * (end - start)
    return tuple(sources)


def systematic(n_layers: int, n_kv_layers: int, partition: str, target: str) -> KVSources:
    """One of the nine configurations of Wu & Tu (arXiv 2410.14442) with `n_kv_layers` KV layers.

    Layer 0 is always a KV layer. pizza: layers 0..n-2 are standard and the rest form one
    group; sandwich: the n-1 standard layers are split between the bottom (the larger half)
    and the top, the middle forms one group; lasagna: layer 0 is standard and layers
    1..L-1 form n-1 groups of near-equal size (larger groups first). Every layer of a group
    reads the KV of the group's bottom, middle (lower of two) or top layer.
    """
    if partition not in PARTITIONS or target not in TARGETS:
        raise JaxkvError(f"unknown configuration {partition}-{target}: partitions {PARTITIONS}, targets {TARGETS}")
    if not 2 <= n_kv_layers <= n_layers:
        raise JaxkvError(f"{partition}-{target} needs 2..{n_layers} KV layers, got {n_kv_layers}")
    warm = n_kv_layers - 1
    if partition == "pizza":
        groups = [(warm, n_layers)]
    elif partition == "sandwich":
        groups = [(warm - warm // 2, n_layers - warm // 2)]
    else:
        size, extra = divmod(n_layers - 1, warm)
        bounds = [1]
        for g in range(warm):
            bounds.append(bounds[-1] + size + (g < extra))
        groups = list(zip(bounds[:-1], bounds[1:]))
    return _grouped(n_layers, groups, target)


def to_string(sources: KVSources, windowed=()) -> str:
    return "_".join(f"{s}{'s' if i in windowed else ''}" for i, s in enumerate(sources))


_LAYER = re.compile(r"^(\d+)(s?)$")


def from_string(spec: str) -> LayerMap:
    """Parse "0_20_20_..._21"; "12s" means: read layer 12's KV through a sliding window."""
    parts = [_LAYER.match(p) for p in spec.strip().split("_")]
    if not all(parts):
        raise JaxkvError(f"bad KV-sharing string {spec!r}: expected layer indices joined by '_' "
                         f"(an 's' suffix marks a sliding-window layer)")
    return LayerMap(tuple(int(p.group(1)) for p in parts), tuple(i for i, p in enumerate(parts) if p.group(2)))


_NAMED = re.compile(rf"^(standard|yoco|cla|lckv|(?:{'|'.join(PARTITIONS)})-(?:{'|'.join(TARGETS)}))[:=]?(\d*)$")


def parse_spec(spec: str, n_layers: int) -> LayerMap:
    """A map from "standard", "cla2", "cla:3", "lckv:2" (warmup layers), "yoco", one of the nine
    "<pizza|sandwich|lasagna>-<bottom|middle|top>:N" (N KV layers), or a string "0_0_2_2_..."."""
    m = _NAMED.match(spec.strip().lower())
    if m is None:
        layer_map = from_string(spec)
        if len(layer_map.sources) != n_layers:
            raise JaxkvError(f"KV-sharing string has {len(layer_map.sources)} layers, the model has {n_layers}")
        return layer_map
    name, arg = m.group(1), m.group(2)
    if name in ("standard", "yoco"):
        if arg:
            raise JaxkvError(f"{name} takes no number, got {spec!r}")
        return LayerMap(standard(n_layers) if name == "standard" else yoco(n_layers))
    if not arg:
        raise JaxkvError(f"{name} needs a number: e.g. {name}:2")
    if name == "cla":
        return LayerMap(cla(n_layers, int(arg)))
    if name == "lckv":
        return LayerMap(lckv(n_layers, int(arg)))
    partition, target = name.split("-")
    return LayerMap(systematic(n_layers, int(arg), partition, target))


def with_sharing(cfg: ModelConfig, spec: str) -> ModelConfig:
    """`cfg` with the KV-sharing map that `spec` names; its window layers join the model's own (Mistral's,
    Gemma's), which keep their windows."""
    layer_map = parse_spec(spec, cfg.n_layers)
    return cfg.replace(kv_sources=layer_map.sources,
                       window_layers=tuple(sorted(set(cfg.window_layers) | set(layer_map.windowed))))
