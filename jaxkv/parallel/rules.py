"""One table from logical axis names to mesh axes, and the shardings it gives.

Parameters carry logical names (`jaxkv.model.decoder.param_logical_axes`: "embed", "heads",
...); the caches get theirs here (`CACHE_AXES`). `logical_to_mesh` turns a PartitionSpec of
logical names into a NamedSharding for one array shape. A mesh axis that does not divide a
dimension is dropped for that dimension (the array is replicated there instead of failing):
SmolLM2's 9 query heads and 3 KV heads on model=4 stay whole on every device while its MLP
and vocabulary are split. The model computes the same whatever the shardings; they only
decide memory per device and communication.

Nothing here imports the model at module level, so the model may import this module to
constrain its activations.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxkv.cache.dense import KVCache
from jaxkv.cache.paged import PagedKVCache
from jaxkv.config import ModelConfig
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
    # caches (see CACHE_AXES)
    "layers": None,  # the KV-layer dimension: every device runs every layer
    "cache_batch": ("data", "fsdp"),  # dense rows follow the batch of the tokens that fill them
    "cache_seq": "seq",  # dense positions: long-context KV is what sequence parallelism splits
    "slots": None,  # paged rows: any row may address any page of the shared pool
    "pages": None,  # the pool is one address space: page ids in the block tables are global
    "page_offset": None,
    "pages_per_seq": None,
    "sinks": None,
}

# The logical axes of each cache field; a field not listed (or a new one) is replicated.
CACHE_AXES: dict[type, dict[str, PartitionSpec]] = {
    KVCache: {  # k, v [n_kv_layers, batch, max_len, kv_heads, head_dim]
        "k": PartitionSpec("layers", "cache_batch", "cache_seq", "kv_heads", "head_dim"),
        "v": PartitionSpec("layers", "cache_batch", "cache_seq", "kv_heads", "head_dim"),
        "lengths": PartitionSpec("cache_batch"),
    },
    PagedKVCache: {  # pools [n_kv_layers, kv_heads, num_pages, page_size, head_dim]: the kernel's layout
        "k_pages": PartitionSpec("layers", "kv_heads", "pages", "page_offset", "head_dim"),
        "v_pages": PartitionSpec("layers", "kv_heads", "pages", "page_offset", "head_dim"),
        "k_scales": PartitionSpec("layers", "kv_heads", "pages", "page_offset"),
        "v_scales": PartitionSpec("layers", "kv_heads", "pages", "page_offset"),
        "block_tables": PartitionSpec("slots", "pages_per_seq"),
        "lengths": PartitionSpec("slots"),
        "sink_keys": PartitionSpec("layers", "slots", "sinks", "kv_heads", "head_dim"),
    },
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


def param_shardings(cfg: ModelConfig, mesh: Mesh):
    """NamedShardings for the parameter tree of `cfg` (the tree `init_params` returns), from the
    model's own logical axes and abstract shapes: nothing is allocated."""
    from jaxkv.model.decoder import abstract_params, param_logical_axes  # the model may import this module

    return tree_shardings(param_logical_axes(cfg), abstract_params(cfg), mesh)


def shard_params(params, cfg: ModelConfig, mesh: Mesh):
    """`params` placed on the mesh as `param_shardings` says (each device receives only its shards)."""
    return jax.device_put(params, param_shardings(cfg, mesh))


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


def cache_shardings(cache: KVCache | PagedKVCache, mesh: Mesh):
    """The cache with a NamedSharding in place of each array (usable as jit in/out_shardings and
    by jax.device_put). Dense: rows on ("data", "fsdp"), KV heads on "model", positions on
    "seq". Paged: KV heads on "model"; pages, block tables and lengths whole on every device,
    since a block table may point anywhere in the pool. Divisibility as in `logical_to_mesh`."""
    table = next((axes for kind, axes in CACHE_AXES.items() if isinstance(cache, kind)), None)
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
