"""The shardings the logical-axis table (`jaxkv.parallel.logical`) gives parameters, optimizer state and caches.

Parameters carry logical names (`jaxkv.model.decoder.param_logical_axes`: "embed", "heads",
...); a cache class lists its fields' names in `LOGICAL_AXES`. A mesh axis that does not divide a
dimension is dropped for that dimension (the array is replicated there instead of failing):
SmolLM2's 9 query heads and 3 KV heads on model=4 stay whole on every device while its MLP
and vocabulary are split. The model computes the same whatever the shardings; they only
decide memory per device and communication.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxkv.errors import JaxkvError
from jaxkv.parallel.logical import LOGICAL_RULES, constrain, logical_spec, logical_to_mesh  # noqa: F401 (re-exported)


def put(x, mesh: Mesh | None, *logical: str | None):
    """A host array placed on the mesh by the logical names of its dimensions (as is without a mesh).
    Every process holds all of x and gives its own devices their part, so this also works across hosts."""
    if mesh is None:
        return x
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, logical_to_mesh(logical, mesh, x.shape), lambda index: x[index])


def _is_spec(x) -> bool:
    return x is None or isinstance(x, PartitionSpec)


def tree_shardings(logical_tree, shapes_tree, mesh: Mesh,
                   rules: Mapping[str, str | tuple[str, ...] | None] = LOGICAL_RULES):
    """`logical_to_mesh` over matching trees: PartitionSpecs (None: replicated) and arrays or
    ShapeDtypeStructs (anything with .shape). Returns a tree of NamedSharding like shapes_tree."""
    return jax.tree.map(lambda spec, x: logical_to_mesh(spec or PartitionSpec(), mesh, x.shape, rules),
                        logical_tree, shapes_tree, is_leaf=_is_spec)


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def opt_state_shardings(tx: optax.GradientTransformation, params, shardings, mesh: Mesh):
    """NamedShardings for `tx.init(params)`: every copy of the parameter tree in the state (Adam's
    mu and nu, momentum) takes the parameters' shardings, so FSDP shards the optimizer state
    as it shards the weights; everything else (step counts) is replicated.

    params: arrays or ShapeDtypeStructs; shardings: the matching tree (`param_shardings`).
    Copies are found by optax.tree_map_params. A leaf shaped unlike its parameter (a factored
    second moment) is replicated; masked-out entries (optax.MaskedNode) stay empty.
    """
    state = jax.eval_shape(tx.init, params)
    abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    rep = replicated(mesh)

    def per_param(leaf, sharding, param):
        if isinstance(leaf, optax.MaskedNode):
            return leaf
        return sharding if leaf.shape == param.shape else rep

    return optax.tree_map_params(tx, per_param, state, shardings, abstract, transform_non_params=lambda _: rep,
                                 is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def cache_shardings(cache, mesh: Mesh):
    """The cache with a NamedSharding in place of each array (usable as jit in/out_shardings and
    by jax.device_put). Dense: rows on ("data", "fsdp"), KV heads on "model", positions on
    "seq". Paged pool: KV heads on "model"; pages whole on every device, since a block table may
    point anywhere in the pool. Divisibility as in `logical_to_mesh`."""
    table = getattr(type(cache), "LOGICAL_AXES", None)
    if table is None:
        raise JaxkvError(f"no sharding rules for a cache of type {type(cache).__name__}")
    fields = {}
    for field in dataclasses.fields(cache):
        value = getattr(cache, field.name)
        if field.metadata.get("pytree_node", True) and hasattr(value, "shape"):
            fields[field.name] = logical_to_mesh(table.get(field.name, PartitionSpec()), mesh, value.shape)
    return cache.replace(**fields)


def keep_cache_sharding(cache, mesh: Mesh | None):
    """Inside jit: the cache constrained to `cache_shardings`, so a cache built in a function is built in
    place and one returned keeps the layout the next call was compiled for (as is without a mesh)."""
    return cache if mesh is None else jax.lax.with_sharding_constraint(cache, cache_shardings(cache, mesh))
