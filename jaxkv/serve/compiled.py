"""Executables compiled ahead of time and the shape buckets that keep their number small."""

from __future__ import annotations

import contextlib
import os
import time

import jax
import jax.numpy as jnp
import numpy as np


def enable_compilation_cache() -> None:
    """Keep compiled executables on disk ($JAXKV_HOME/xla-cache): a restarted server or a repeated command
    loads its step shapes instead of compiling them again. JAXKV_COMPILATION_CACHE=0 switches it off."""
    if os.environ.get("JAXKV_COMPILATION_CACHE", "1") == "0":
        return
    from jaxkv.checkpoints.registry import jaxkv_home

    jax.config.update("jax_compilation_cache_dir", str(jaxkv_home() / "xla-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def bucket(n: int, minimum: int = 1, maximum: int | None = None) -> int:
    """Smallest power of two >= max(n, minimum), capped at maximum."""
    size = 1 << (max(int(n), int(minimum), 1) - 1).bit_length()
    return min(size, maximum) if maximum else size


def powers_of_two(low: int, high: int) -> list[int]:
    """low, 2 low, 4 low, ... below high, then high: the bucket sizes `bucket(n, low, high)` can return."""
    sizes = [low]
    while sizes[-1] * 2 < high:
        sizes.append(sizes[-1] * 2)
    return sorted(set(sizes + [high]))


class Executables:
    """Functions compiled ahead of time, once per (function, argument shapes and dtypes, static values).

    Keeping them lets callers report compile time apart from run time and count compilations: a
    server warmed up over its buckets must not compile again. With a mesh, functions are traced,
    compiled and run with it in context (so the model's sharding constraints apply), and the
    arguments' shardings are part of the key.
    """

    def __init__(self, mesh: jax.sharding.Mesh | None = None):
        self._compiled: dict = {}
        self.compile_s = 0.0
        self.mesh = mesh

    @property
    def count(self) -> int:
        return len(self._compiled)

    def run(self, fn, donate: tuple[int, ...], *args, **static):
        """fn(*args, **static) through its executable; `donate` are the positions of donated args."""
        leaves, treedef = jax.tree.flatten(args)
        key = (fn, tuple(sorted(static.items())), treedef,
               tuple((np.shape(x), jnp.result_type(x), getattr(x, "sharding", None)) for x in leaves))
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            if key not in self._compiled:
                start = time.perf_counter()
                jitted = jax.jit(fn, static_argnames=tuple(static), donate_argnums=donate)
                self._compiled[key] = jitted.lower(*args, **static).compile()
                self.compile_s += time.perf_counter() - start
            return self._compiled[key](*args)
