"""Executables compiled ahead of time and the shape buckets that keep their number small.

A repeated command or a restarted server should compile nothing: `enable_compilation_cache` keeps XLA's executables
on disk (JAX's persistent compilation cache) and `Executables` keeps each function's exported trace beside them
(`jax.export`: tracing and lowering the model cost more than loading its executable), keyed by everything that
shapes it: jaxkv's source, jax's version, the platform, the function, its static values and argument shapes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import pickle
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

_traces: Path | None = None  # where exported traces live, once the cache is on


def compilation_cache_enabled() -> bool:
    """Whether commands keep what they compile: JAXKV_COMPILATION_CACHE=0 (or --no-compilation-cache) says no."""
    return os.environ.get("JAXKV_COMPILATION_CACHE", "1") != "0"


def compilation_cache_dir() -> Path:
    """Where the cache lives: the directory jax is already given (JAX_COMPILATION_CACHE_DIR), else
    $JAXKV_HOME/xla-cache."""
    from jaxkv.checkpoints.registry import jaxkv_home

    return Path(jax.config.jax_compilation_cache_dir or jaxkv_home() / "xla-cache")


def enable_compilation_cache() -> Path | None:
    """Keep compiled executables and traces on disk ($JAXKV_HOME/xla-cache, or the directory jax is already
    given): a restarted server or a repeated command loads its step shapes instead of compiling them again.
    Returns the directory, or None when `compilation_cache_enabled` says no."""
    global _traces
    if not compilation_cache_enabled():
        return None
    jax.config.update("jax_compilation_cache_dir", str(compilation_cache_dir()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # every step shape, however quick
    _traces = Path(jax.config.jax_compilation_cache_dir) / "jaxkv-traces"
    return _traces.parent


@functools.cache
def _code_version() -> str:
    """A digest of what a trace depends on beyond its arguments: jax's version and jaxkv's own source."""
    digest = hashlib.sha256(f"jax {jax.__version__} jaxlib {jax.lib.__version__}".encode())
    root = Path(__file__).resolve().parents[2]
    for package in ("jaxkv", "pallas_kernels"):
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


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
    arguments' shardings are part of the key. With the compilation cache on (`enable_compilation_cache`), a
    function's trace is exported to the cache and the next process loads it instead of tracing again.
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
                self._compiled[key] = self._compile(fn, donate, args, leaves, static, key)
                self.compile_s += time.perf_counter() - start
            return self._compiled[key](args, leaves)

    def _compile(self, fn, donate, args, leaves, static, key):
        """The executable of fn on args, called as (args, their leaves): through its exported trace when the cache
        is on (one device: a trace under a mesh carries its shardings, so those compile directly), loaded if an
        earlier run exported it."""
        def trace_here():
            compiled = jax.jit(fn, static_argnames=tuple(static), donate_argnums=donate).lower(*args, **static)
            compiled = compiled.compile()
            return lambda args, leaves: compiled(*args)

        if _traces is None or self.mesh is not None:
            return trace_here()
        name = hashlib.sha256(repr((_code_version(), jax.default_backend(), [d.device_kind for d in jax.devices()],
                                    fn.__module__, fn.__qualname__, donate, key[1:])).encode()).hexdigest()
        path = _traces / f"{name}.trace"
        try:
            out_tree, exported = pickle.loads(path.read_bytes())
            exported = jax.export.deserialize(exported)
        except Exception:  # noqa: BLE001 - none yet, or unreadable: trace it again
            try:
                out_tree, exported = self._export(fn, args, static, path)
            except Exception:  # noqa: BLE001 - not exportable (a custom call jax.export refuses): compile it
                return trace_here()
        owners = [i for i, arg in enumerate(args) for _ in jax.tree.leaves(arg)]  # each leaf's argument
        compiled = jax.jit(exported.call, donate_argnums=tuple(j for j, i in enumerate(owners) if i in donate))
        compiled = compiled.lower(*leaves).compile()
        return lambda args, leaves: jax.tree.unflatten(out_tree, compiled(*leaves))

    @staticmethod
    def _export(fn, args, static, path: Path):
        """fn's trace on args as one function of their leaves (its output tree apart), written to path."""
        leaves, treedef = jax.tree.flatten(args)
        out_tree = []

        def flat(*leaves):
            out = fn(*jax.tree.unflatten(treedef, leaves), **static)
            out_tree.append(jax.tree.structure(out))
            return jax.tree.leaves(out)

        exported = jax.export.export(jax.jit(flat))(*leaves)
        with contextlib.suppress(OSError):  # a read-only cache only costs the next run its trace
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.tmp")
            partial.write_bytes(pickle.dumps((out_tree[0], exported.serialize())))
            partial.replace(path)
        return out_tree[0], exported
