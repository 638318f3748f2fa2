"""Cross-layer KV sharing maps: for each layer, the layer whose K/V it attends to.

The constructors follow the papers (../shared/reference/methods.md): CLA groups
consecutive layers onto the first of each group; LCKV (sandwich-top) sends the middle
layers to the top KV layer and keeps w warmup layers standard, split between both ends;
YOCO (pizza-bottom) lets the second half read the KV of the first layer of that half.
The underscore string ("0_20_20_..._21") is the form published LCKV configs use.
"""

from __future__ import annotations

import re

from jaxkv.errors import JaxkvError

KVSources = tuple[int, ...]


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
    return tuple(end - 1 if start <= i < end else i for i in range(n_layers))


def yoco(n_layers: int) -> KVSources:
    """YOCO-style: the first half keeps its own KV; the second half reads layer L//2's."""
    half = n_layers // 2
    return tuple(i if i < half else half for i in range(n_layers))


def to_string(sources: KVSources) -> str:
    return "_".join(str(s) for s in sources)


def from_string(spec: str) -> KVSources:
    """Parse "0_20_20_..._21". A trailing "s" (sliding-window layer) is not supported yet."""
    parts = spec.strip().split("_")
    if any(p.endswith("s") for p in parts):
        raise JaxkvError("sliding-window layers ('s' in a KV-sharing string) are not supported yet")
    if not all(p.isdigit() for p in parts):
        raise JaxkvError(f"bad KV-sharing string {spec!r}: expected layer indices joined by '_'")
    return tuple(int(p) for p in parts)


_NAMED = re.compile(r"^(standard|yoco|cla|lckv)[:=]?(\d*)$")


def parse_spec(spec: str, n_layers: int) -> KVSources:
    """A map from "standard", "cla2", "cla:3", "lckv:2" (warmup layers), "yoco", or "0_0_2_2_..."."""
    m = _NAMED.match(spec.strip().lower())
    if m is None:
        sources = from_string(spec)
        if len(sources) != n_layers:
            raise JaxkvError(f"KV-sharing string has {len(sources)} layers, the model has {n_layers}")
        return sources
    name, arg = m.group(1), m.group(2)
    if name in ("standard", "yoco"):
        if arg:
            raise JaxkvError(f"{name} takes no number, got {spec!r}")
        return standard(n_layers) if name == "standard" else yoco(n_layers)
    if not arg:
        raise JaxkvError(f"{name} needs a number: e.g. {name}:2")
    return cla(n_layers, int(arg)) if name == "cla" else lckv(n_layers, int(arg))
