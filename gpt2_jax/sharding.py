"""Device mesh and shardings: data parallel over ``data``, parameters sharded over ``fsdp``.

The batch is split over both axes (every device sees different examples); parameters and
optimizer state are replicated over ``data`` and split over ``fsdp`` along their largest
dimension that divides evenly (ZeRO-3 style: XLA all-gathers them where they are used).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def maybe_initialize_distributed(dist_cfg) -> None:
    """Starts ``jax.distributed`` for a multi-process run (no-op for one process).

    Explicit config wins; otherwise JAX's own auto-detection (Cloud TPU, SLURM, ...) runs
    when ``JAX_COORDINATOR_ADDRESS`` is set.
    """
    if dist_cfg.coordinator_address:
        if dist_cfg.cpu_collectives:
            jax.config.update("jax_cpu_collectives_implementation", dist_cfg.cpu_collectives)
        jax.distributed.initialize(
            coordinator_address=dist_cfg.coordinator_address,
            num_processes=int(dist_cfg.num_processes),
            process_id=int(dist_cfg.process_id),
        )
    elif os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int]:
    """(data, fsdp) sizes; -1 in one axis means "all remaining devices"."""
    data, fsdp = int(mesh_cfg.data), int(mesh_cfg.fsdp)
    if data == -1 and fsdp == -1:
        raise ValueError("mesh.data and mesh.fsdp cannot both be -1")
    if data == -1:
        data = num_devices // max(fsdp, 1)
    if fsdp == -1:
        fsdp = num_devices // max(data, 1)
    if data < 1 or fsdp < 1 or data * fsdp != num_devices:
        raise ValueError(
            f"mesh.data={mesh_cfg.data} x mesh.fsdp={mesh_cfg.fsdp} does not cover the "
            f"{num_devices} devices (the product must equal the device count)"
        )
    return data, fsdp


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_cfg, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), ("data", "fsdp"))


def batch_sharding(mesh: Mesh, leading: int = 0) -> NamedSharding:
    """Sharding of an int batch ``[*leading, B, T]``: B split over data x fsdp."""
    return NamedSharding(mesh, P(*([None] * leading), BATCH_AXES, None))


def _fsdp_spec(shape: tuple[int, ...], fsdp: int, skip_leading: int) -> P:
    if fsdp == 1 or len(shape) <= skip_leading:
        return P()
    dims = sorted(range(skip_leading, len(shape)), key=lambda d: -shape[d])
    for d in dims:
        if shape[d] % fsdp == 0:
            spec = [None] * len(shape)
            spec[d] = "fsdp"
            return P(*spec)
    return P()  # nothing divides: keep it replicated (small tensors such as biases)


def state_sharding(mesh: Mesh, abstract_state, scanned_prefix: str = "h"):
    """NamedShardings for a state pytree of ShapeDtypeStructs.

    Stacked layer parameters (under ``h``) are never split along the layer axis: the scan
    slices one layer at a time and would otherwise gather across devices each step.
    """
    fsdp = mesh.shape["fsdp"]

    def spec_for(path, leaf):
        shape = getattr(leaf, "shape", ())
        keys = [getattr(p, "key", getattr(p, "name", None)) for p in path]
        skip = 1 if scanned_prefix in keys else 0
        return NamedSharding(mesh, _fsdp_spec(tuple(shape), fsdp, skip))

    return jax.tree_util.tree_map_with_path(spec_for, abstract_state)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_batch(local_batch: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """This process's rows of the global batch -> one global array on the mesh."""
    return jax.make_array_from_process_local_data(sharding, local_batch)
