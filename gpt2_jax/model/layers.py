"""The per-position layers of a GPT-2 block, with Hugging Face's parameter layout.

``dense`` and ``layer_norm`` build the two parameterised layers in the config's compute
and parameter dtypes; ``MLP`` is the block's feed-forward half. Both the linen modules
(``model.attention``, ``model.gpt2``) and the KV-cache decoder (``model.decode``, which
applies them to a layer's parameters directly) build their layers here, so the two
forward passes cannot drift apart. A projection that ``model_cfg.lora`` targets gets the
LoRA branch (``model.lora``), its adapters in the ``"lora"`` collection.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax

from gpt2_jax.model import lora
from gpt2_jax.model.config import DTYPES, GPT2Config


def dense(
    model_cfg: GPT2Config,
    features: int,
    name: str | None,
    std: float,
    path: str | None = None,
    deterministic: bool = True,
) -> nn.Module:
    """[..., in] -> [..., features]; normal(std) kernel, zero bias.

    ``path``: the module's place in a block (``"attn.c_attn"``, ``"attn.c_proj"``,
    ``"mlp.c_fc"``, ``"mlp.c_proj"``); when ``model_cfg.lora`` targets it, a
    ``lora.LoraDense`` (the same params, plus the adapter branch; ``deterministic``
    switches its dropout off). Otherwise, and always with ``path=None``, ``nn.Dense``.
    """
    # HF Conv1D stores weights as (in, out): the same layout as a Dense kernel.
    if lora.adapts(model_cfg.lora, path):
        return lora.LoraDense(
            features,
            model_cfg.lora,
            dtype=DTYPES[model_cfg.dtype],
            param_dtype=DTYPES[model_cfg.param_dtype],
            kernel_init=nn.initializers.normal(std),
            deterministic=deterministic,
            name=name,
        )
    return nn.Dense(
        features,
        dtype=DTYPES[model_cfg.dtype],
        param_dtype=DTYPES[model_cfg.param_dtype],
        kernel_init=nn.initializers.normal(std),
        bias_init=nn.initializers.zeros,
        name=name,
    )


def layer_norm(model_cfg: GPT2Config, name: str | None) -> nn.LayerNorm:
    """[..., C] -> [..., C], normalised over C."""
    return nn.LayerNorm(
        epsilon=model_cfg.layer_norm_epsilon,
        dtype=DTYPES[model_cfg.dtype],
        param_dtype=DTYPES[model_cfg.param_dtype],
        name=name,
    )


def residual_std(model_cfg: GPT2Config) -> float:
    """Init std of the projections into the residual stream (both ``c_proj``)."""
    # Scaled by 1/sqrt(2 * n_layer), as in GPT-2 and HF's init: two residual adds per layer.
    return model_cfg.initializer_range / math.sqrt(2 * model_cfg.n_layer)


class MLP(nn.Module):
    """The feed-forward half of a block: [B, T, C] -> [B, T, C] (width ``inner_dim``)."""

    model_cfg: GPT2Config

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        model_cfg = self.model_cfg
        std = model_cfg.initializer_range
        h = dense(model_cfg, model_cfg.inner_dim, "c_fc", std, "mlp.c_fc", deterministic)(x)
        h = jax.nn.gelu(h, approximate=True)  # HF "gelu_new"
        std = residual_std(model_cfg)
        h = dense(model_cfg, model_cfg.n_embd, "c_proj", std, "mlp.c_proj", deterministic)(h)
        return nn.Dropout(model_cfg.resid_pdrop)(h, deterministic=deterministic)
