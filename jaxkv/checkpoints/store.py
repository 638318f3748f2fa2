"""jaxkv's own checkpoint: a directory with config.json, tokenizer files and an Orbax `params/`.

Any source checkpoint (HF safetensors, GGUF) exposes `model_config`, `tokenizer`, `__len__`
and `tensors()` (HF-named arrays, one at a time); `assemble_params` places them into the
parameter tree, checking every shape against the model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from jaxkv.checkpoints.hf_layout import hf_to_param
from jaxkv.config import ModelConfig
from jaxkv.errors import JaxkvError
from jaxkv.model.decoder import abstract_params
from jaxkv.tokenizer import Tokenizer

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def _flat(tree) -> dict[tuple[str, ...], object]:
    return {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _some(names: list[str]) -> str:
    return (", ".join(names[:3]) + (", ..." if len(names) > 3 else "")) or "none"


def check_params(cfg: ModelConfig, params, where) -> None:
    """Raise a one-line error naming `where` unless params has exactly the model's tree and shapes."""
    want, got = _flat(abstract_params(cfg)), _flat(params)
    missing = sorted("/".join(k) for k in set(want) - set(got))
    extra = sorted("/".join(k) for k in set(got) - set(want))
    if missing or extra:
        raise JaxkvError(f"checkpoint {where} does not match the model: missing {_some(missing)}; "
                         f"unexpected {_some(extra)}")
    for key, spec in want.items():
        if tuple(np.shape(got[key])) != tuple(spec.shape):
            raise JaxkvError(f"checkpoint {where}: parameter {'/'.join(key)} has shape {np.shape(got[key])}, "
                             f"the model expects {spec.shape}")


def assemble_params(cfg: ModelConfig, source, dtype, allocate: Callable | None = None, desc: str = "loading") -> dict:
    """Place every tensor of `source` into a parameter tree of numpy arrays of `dtype`.

    `allocate(index, shape, dtype)` makes each destination array; the default keeps them in
    RAM, a memmap allocator keeps a large conversion out of RAM.
    """
    allocate = allocate or (lambda _i, shape, dt: np.empty(shape, dt))
    dtype = jnp.dtype(dtype)
    tree: dict = {}
    for index, (name, tensor) in enumerate(tqdm(source.tensors(), total=len(source), desc=desc, unit="tensor")):
        placed = hf_to_param(name, tensor, cfg)
        if placed is None:
            continue
        path, array = placed
        out = allocate(index, array.shape, dtype)
        out[...] = array.astype(dtype)
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = out
    check_params(cfg, tree, source.path)
    return tree


def save_checkpoint(out: str | Path, cfg: ModelConfig, tokenizer: Tokenizer, params) -> Path:
    """Write config, tokenizer and an Orbax params checkpoint into a new directory `out`."""
    out = Path(out).absolute()
    out.mkdir(parents=True)
    # One Orbax item per top-level module: Orbax stages a whole item in RAM while saving, so
    # this bounds a conversion's memory by the largest layer rather than the whole model.
    checkpointer = ocp.StandardCheckpointer()
    for module, subtree in params.items():
        checkpointer.save(out / PARAMS_DIR / module, subtree)
        checkpointer.wait_until_finished()
    tokenizer.save(out)
    cfg.save(out / CONFIG_FILE)
    return out


def convert(source, out: str | Path, name: str | None = None, dtype=None) -> Path:
    """Convert a source checkpoint to jaxkv's format at `out`.

    Tensors stream through disk-backed arrays, so a model larger than RAM converts. The result
    is built beside `out` and moved into place only when complete: a failed conversion leaves
    an existing checkpoint at `out` untouched.
    """
    out = Path(out).absolute()
    if out.exists() and not is_checkpoint(out) and (not out.is_dir() or any(out.iterdir())):
        raise JaxkvError(f"refusing to overwrite {out}: it exists and is not a jaxkv checkpoint")
    cfg = source.model_config(name)
    tokenizer = source.tokenizer()  # before the long part, so a missing tokenizer fails fast
    dtype = jnp.dtype(dtype or cfg.param_dtype)
    cfg = cfg.replace(param_dtype=dtype.name, dtype=dtype.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.converting-") as work:
        scratch = Path(work) / "scratch"
        scratch.mkdir()

        def memmap(index, shape, dt):
            return np.memmap(scratch / f"{index}.bin", dtype=dt, mode="w+", shape=shape)

        params = assemble_params(cfg, source, dtype, allocate=memmap, desc="converting")
        built = save_checkpoint(Path(work) / "checkpoint", cfg, tokenizer, params)
        del params
        if out.exists():
            shutil.rmtree(out)
        os.replace(built, out)
    return out


def is_checkpoint(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def load_checkpoint(path: str | Path, dtype=None) -> tuple[ModelConfig, Tokenizer, dict]:
    """Read a jaxkv checkpoint; parameters come back as device arrays cast to `dtype`."""
    path = Path(path).absolute()
    if not is_checkpoint(path):
        raise JaxkvError(f"{path} is not a jaxkv checkpoint (expected {CONFIG_FILE} and {PARAMS_DIR}/)")
    cfg = ModelConfig.load(path / CONFIG_FILE)
    tokenizer = Tokenizer.load(path)
    checkpointer = ocp.StandardCheckpointer()
    try:
        params = {item.name: checkpointer.restore(item) for item in sorted((path / PARAMS_DIR).iterdir())}
    except Exception as e:  # Orbax/tensorstore raise many types for a damaged directory
        raise JaxkvError(f"cannot restore parameters from {path / PARAMS_DIR}: {str(e).splitlines()[0]}") from None
    check_params(cfg, params, path)
    return cfg, tokenizer, params
