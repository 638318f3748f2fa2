"""Device meshes from a short spec such as "data=2,model=4".

Every mesh has the same four axes in the same order, missing ones of size 1, so the one
rules table (`jaxkv.parallel.rules`) can always name them:

  data   replicas of the model on different rows of the batch
  fsdp   also data parallel, but the weights (and optimizer state) are sharded over it
  seq    the sequence dimension of activations (sequence / context parallelism)
  model  tensor parallelism: attention heads, MLP hidden units, vocabulary

"model" is last so that its devices are neighbours in the device order: it carries the most
traffic (an all-reduce per layer), "data" the least.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh

from jaxkv.errors import JaxkvError

AXES = ("data", "fsdp", "seq", "model")


def parse_mesh_spec(spec: str | None, n_devices: int | None = None) -> dict[str, int]:
    """{"data": .., "fsdp": .., "seq": .., "model": ..} (in mesh order) from "axis=size,...".

    Axes not named get size 1; one size may be -1, "the devices left over". The sizes must
    multiply to `n_devices` (default: every device JAX sees). None or "" puts every device
    on "data" (plain data parallelism: correct for any model, needs no divisibility).
    """
    n = jax.device_count() if n_devices is None else int(n_devices)
    if spec is None or not spec.strip():
        spec = "data=-1"
    sizes: dict[str, int] = {}
    for part in spec.split(","):
        name, eq, value = (s.strip() for s in part.partition("="))
        if not eq or not name or not value:
            raise JaxkvError(f"mesh spec {spec!r}: expected axis=size entries separated by commas, "
                             f"got {part.strip()!r}")
        if name not in AXES:
            raise JaxkvError(f"mesh spec {spec!r}: unknown axis {name!r}; axes are {', '.join(AXES)}")
        if name in sizes:
            raise JaxkvError(f"mesh spec {spec!r}: axis {name!r} is given twice")
        try:
            size = int(value)
        except ValueError:
            raise JaxkvError(f"mesh spec {spec!r}: size of {name!r} must be an integer, got {value!r}") from None
        if size < 1 and size != -1:
            raise JaxkvError(f"mesh spec {spec!r}: size of {name!r} must be positive (or -1 for the rest), got {size}")
        sizes[name] = size
    rest = [name for name, size in sizes.items() if size == -1]
    if len(rest) > 1:
        raise JaxkvError(f"mesh spec {spec!r}: only one axis may be -1, got {', '.join(rest)}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if rest:
        if n % known:
            raise JaxkvError(f"mesh spec {spec!r}: the other axes use {known} devices, which does not divide "
                             f"the {n} devices available")
        sizes[rest[0]] = n // known
    elif known != n:
        raise JaxkvError(f"mesh spec {spec!r} uses {known} devices but {n} are available "
                         f"(the sizes must multiply to {n}; -1 takes the rest)")
    return {axis: sizes.get(axis, 1) for axis in AXES}


def make_mesh(spec: str | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh with axes ("data", "fsdp", "seq", "model") sized by `spec` (see `parse_mesh_spec`)
    over `devices` (default: all).

    jax.make_mesh orders the devices by the physical topology (TPU rings). The axes are Auto:
    the compiler propagates shardings from the ones given to jit (GSPMD), which is what the
    rules table assumes; JAX 0.10 would otherwise make them Explicit, where an op whose
    operands disagree raises instead of resharding.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    return jax.make_mesh(tuple(sizes.values()), AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)
