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


def detected_cluster() -> str | None:
    """The name of the cluster JAX's own detection finds (SLURM, Open MPI, TPU pod, GKE,
    Kubernetes), else None.

    Asks the same ``ClusterEnv`` subclasses that ``jax.distributed.initialize()`` asks,
    skipping the opt-in ones (mpi4py: merely installed is not a cluster).
    """
    from jax._src import clusters  # private, but the only list of what JAX can detect

    for env in clusters.ClusterEnv._cluster_types:
        if getattr(env, "opt_in_only_method", False):
            continue
        try:
            present = env.is_env_present()
        except Exception:  # a detector that cannot even look (e.g. no metadata server)
            present = False
        if present:
            return env.__name__
    return None


def maybe_initialize_distributed(dist_cfg) -> str | None:
    """Starts ``jax.distributed`` for a multi-process run; returns how (None: one process).

    1. ``distributed.coordinator_address`` given: exactly those flags (they win).
    2. else a cluster JAX detects (SLURM, Open MPI, TPU pod/GKE, Kubernetes with
       ``jax[k8s]``): ``jax.distributed.initialize()`` reads everything from it.
    3. else one process, nothing to start.
    """
    if dist_cfg.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", dist_cfg.cpu_collectives)
    if dist_cfg.coordinator_address:
        jax.distributed.initialize(
            coordinator_address=dist_cfg.coordinator_address,
            num_processes=int(dist_cfg.num_processes),
            process_id=int(dist_cfg.process_id),
        )
        return "flags"
    cluster = detected_cluster()
    if cluster is not None:
        jax.distributed.initialize()
        return cluster
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        # JAX reads no process count or id from the environment: this alone cannot work.
        from gpt2_jax.errors import ConfigError

        raise ConfigError(
            "JAX_COORDINATOR_ADDRESS is set but no cluster was detected (SLURM, Open MPI, "
            "TPU pod, Kubernetes); pass --config.distributed.coordinator_address, "
            "--config.distributed.num_processes and --config.distributed.process_id"
        )
    return None


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
    return mesh_of(mesh_shape(mesh_cfg, len(devices)), devices)


def mesh_of(shape: tuple[int, int], devices=None) -> Mesh:
    """The ("data", "fsdp") mesh of ``shape`` (a plan's ``mesh_shape``) over ``devices``."""
    devices = jax.devices() if devices is None else devices
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


def put_batch(local_batch: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """This process's rows of the global batch -> one global array on the mesh."""
    return jax.make_array_from_process_local_data(sharding, local_batch)
