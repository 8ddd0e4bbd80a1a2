"""Experiment configs (ml_collections): defaults, overrides, validation, and the run plan.
The ConfigDict stops here: below this layer every function takes typed, frozen sections.

``from gpt2_jax.config import base_config`` stays valid for config files written before the
package had layers (``base_config`` lives in ``gpt2_jax.config.base``)."""


def __getattr__(name):
    if name == "base_config":
        from gpt2_jax.config.base import base_config

        return base_config
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
