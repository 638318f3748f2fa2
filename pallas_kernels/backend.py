"""What backend="auto" runs: the platform's Pallas kernels on a TPU and on a GPU that Pallas's Triton lowering
takes, else the pure-JAX reference. Triton in Pallas refuses GPUs below compute capability 8.0 ("Triton support is
only enabled for Ampere GPUs", jax-ml/jax#26799), so on such a GPU (Colab's free T4 is 7.5) auto runs the
reference rather than fail at the first step."""

from __future__ import annotations

import jax

TRITON_MIN_CAPABILITY = (8, 0)


def triton_supported(device) -> bool:
    """Whether Pallas's Triton lowering runs on `device`; a device that reports no CUDA capability is let through."""
    capability = getattr(device, "compute_capability", None)
    if not capability:
        return True
    major, minor = (int(part) for part in str(capability).split(".")[:2])
    return (major, minor) >= TRITON_MIN_CAPABILITY


def auto_backend(kernels=("gpu", "tpu")) -> str:
    """The backend "auto" means here, among the platforms `kernels` has a kernel for."""
    platform = jax.default_backend()
    if platform not in kernels or (platform == "gpu" and not triton_supported(jax.devices()[0])):
        return "reference"
    return platform
