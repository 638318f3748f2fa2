"""Logical axis names and the one table that maps them to mesh axes.

Parameters, activations and caches name their dimensions ("embed", "heads", "cache_seq", ...);
`logical_spec` turns those names into mesh axes for one array shape. A mesh axis that does not divide a
dimension is dropped for that dimension (replicated instead of failing). This module imports nothing of
the model or the caches, so both may use `constrain`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxkv.errors import JaxkvError

# logical name -> a mesh axis, a tuple of them (tried in order, all that fit are used) or None (replicated)
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    # activations
    "batch": ("data", "fsdp"),  # FSDP is data parallel too: each fsdp shard sees other rows
    "seq": "seq",  # sequence parallelism
    # parameters
    "vocab": "model",  # embedding rows / lm_head columns: the largest matrices of small models
    "embed": "fsdp",  # FSDP shards every weight along d_model; all-gathered per layer when used
    "heads": "model",  # Megatron attention: each device owns whole query heads ...
    "kv_heads": "model",  # ... and the KV heads they read (replicated when kv_heads does not divide)
    "head_dim": None,  # the contraction inside a head: splitting it costs an all-reduce per score
    "mlp": "model",  # Megatron MLP: gate/up split by column, down by row, one all-reduce
    "norm": None,  # a d_model vector: too small to be worth a collective
    # caches (each cache class lists its fields' names in LOGICAL_AXES)
    "layers": None,  # the KV-layer dimension: every device runs every layer
    "cache_batch": ("data", "fsdp"),  # dense rows follow the batch of the tokens that fill them
    "cache_seq": "seq",  # dense positions: long-context KV is what sequence parallelism splits
    "seqs": None,  # a pool's per-sequence state (sink keys): any row may be any sequence
    "pages": None,  # the pool is one address space: page ids in the block tables are global
    "page_offset": None,
    "sinks": None,
}

def _names(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def logical_spec(logical, axis_sizes: Mapping[str, int], shape: tuple[int, ...],
                 rules: Mapping[str, str | tuple[str, ...] | None] = LOGICAL_RULES) -> PartitionSpec:
    """The PartitionSpec (of mesh axes) for an array of `shape` whose dimensions have the logical names in
    `logical`, on a mesh of `axis_sizes`.

    Each name maps through `rules`; a mesh axis is used for a dimension only if it is larger
    than 1, not already used by an earlier dimension (an axis may appear once per spec), and
    the product of the axes kept for that dimension divides its size. Missing trailing names
    are None (replicated). An unknown name raises: the table must cover every name.
    """
    logical = tuple(logical)
    if len(logical) > len(shape):
        raise JaxkvError(f"logical axes {logical} name more dimensions than the shape {tuple(shape)} has")
    used: set[str] = set()
    spec = []
    for dim, entry in zip(shape, logical + (None,) * (len(shape) - len(logical))):
        axes: list[str] = []
        for name in _names(entry):
            if name not in rules:
                raise JaxkvError(f"logical axis {name!r} has no sharding rule; known: {', '.join(sorted(rules))}")
            for axis in _names(rules[name]):
                size = axis_sizes.get(axis, 1)
                if size > 1 and axis not in used and dim % (math.prod(axis_sizes[a] for a in axes) * size) == 0:
                    axes.append(axis)
                    used.add(axis)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*spec)


def logical_to_mesh(logical: PartitionSpec, mesh: Mesh, shape: tuple[int, ...],
                    rules: Mapping[str, str | tuple[str, ...] | None] = LOGICAL_RULES) -> NamedSharding:
    """The NamedSharding of `logical_spec` on `mesh`."""
    return NamedSharding(mesh, logical_spec(logical, dict(mesh.shape), shape, rules))


def constrain(x: jax.Array, *logical: str | None) -> jax.Array:
    """x constrained to the sharding its logical axes give on the mesh in context (`jax.set_mesh`), so
    the compiler's layout of activations follows the table, not its own guesses; without one, x."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(logical, dict(mesh.shape), x.shape))
