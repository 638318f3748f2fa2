"""Pallas kernels for jaxkv, each with a pure-JAX reference (paged attention lands here)."""
