"""Device mesh and shardings, jax.distributed, the multi-process launcher."""
