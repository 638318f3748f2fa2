"""Pallas kernels for jaxkv, each with a pure-JAX reference."""

from pallas_kernels.paged_attention import paged_attention

__all__ = ["paged_attention"]
