"""The typed ``mesh`` and ``distributed`` sections: how devices and processes are laid out.

The plan builds them from the config's keys (same names; comments in ``config/base.py``)
and validates them here, beside their definitions.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int  # data-parallel axis size (-1: all devices not used by fsdp)
    fsdp: int  # parameter-sharding axis size

    def validate(self, num_devices: int) -> tuple[int, int]:
        """The (data, fsdp) shape over ``num_devices``; ConfigError naming the key."""
        from gpt2_jax.errors import ConfigError
        from gpt2_jax.parallel import sharding

        try:
            return sharding.mesh_shape(self, num_devices)
        except ValueError as e:
            raise ConfigError(str(e)) from None


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    coordinator_address: str
    num_processes: int
    process_id: int
    cpu_collectives: str
