"""Several hosts, one program: JAX's own distributed runtime.

Every process runs the same script; after `initialize` JAX sees the devices of all of them, a mesh
built from `jax.devices()` spans the hosts, and jit runs each process's part with collectives
between them. On a TPU pod slice or under SLURM/Open MPI JAX finds the coordinator itself; elsewhere
(GPU VMs, CPUs) give it, or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
"""

from __future__ import annotations

import os

import jax

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               local_device_ids: list[int] | None = None) -> None:
    """Join the job (before any other JAX call that touches devices). Arguments left None come from the
    environment (ENV) or the cluster's own detection. CPU devices talk over gloo (their default has no
    cross-process collectives); accelerators use their own."""
    coordinator = coordinator or os.environ.get(ENV[0])
    num_processes = num_processes if num_processes is not None else _int_env(ENV[1])
    process_id = process_id if process_id is not None else _int_env(ENV[2])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id, local_device_ids=local_device_ids)


def initialize_from_env() -> bool:
    """`initialize()` if JAX_COORDINATOR_ADDRESS is set (how the CLI learns it is one of several
    processes); returns whether it did."""
    if not os.environ.get(ENV[0]):
        return False
    initialize()
    return True


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    return None if value is None else int(value)
