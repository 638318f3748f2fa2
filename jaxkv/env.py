"""`jaxkv env`: what a bug report needs first, the versions, the devices and where jaxkv keeps things."""

from __future__ import annotations

import importlib.metadata
import platform
import sys

PACKAGES = ("jaxkv", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tokenizers", "huggingface_hub",
            "jax-cuda12-plugin", "jax-cuda13-plugin", "libtpu")


def version(package: str = "jaxkv") -> str | None:
    """An installed package's version, None if it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """Versions, the JAX backend and its devices, jaxkv's directories and the attention kernels `auto` picks."""
    import jax
    from huggingface_hub import constants

    from jaxkv.checkpoints.hub import hub_options
    from jaxkv.checkpoints.registry import jaxkv_home
    from jaxkv.serve.compiled import compilation_cache_dir, compilation_cache_enabled
    from pallas_kernels.backend import TRITON_MIN_CAPABILITY
    from pallas_kernels.ragged_paged_attention import KERNELS, auto_backend

    home, hub = jaxkv_home(), hub_options()
    devices = jax.devices()
    backend = auto_backend()
    kernels = f"{backend}: {KERNELS[backend]}"
    if backend == "reference" and jax.default_backend() == "gpu":  # the GPU is too old for Pallas's Triton
        kernels += (f" (compute capability {getattr(devices[0], 'compute_capability', '?')}; Pallas's Triton needs "
                    f"{'.'.join(map(str, TRITON_MIN_CAPABILITY))}+)")
    return {
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "packages": {name: v for name in PACKAGES if (v := version(name)) is not None},
        "backend": jax.default_backend(),
        "devices": [f"{d.platform}:{d.id} {d.device_kind}" for d in devices],
        "process": f"{jax.process_index()} of {jax.process_count()}",
        "jaxkv_home": str(home),
        "models": str(home / "models"),
        "hf_hub_cache": str(hub["cache_dir"] or constants.HF_HUB_CACHE) + (" (offline)" if hub["local_files_only"]
                                                                          else ""),
        "compilation_cache": (str(compilation_cache_dir()) if compilation_cache_enabled()
                              else "off (JAXKV_COMPILATION_CACHE=0)"),
        "attention_kernels": kernels,
    }


def format_environment(env: dict) -> str:
    """The environment as aligned lines, ready to paste."""
    lines = []
    width = max(len(k) for k in env)
    for key, value in env.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        elif isinstance(value, list):
            value = "; ".join(value)
        lines.append(f"{key:<{width}}  {value}")
    return "\n".join(lines)
