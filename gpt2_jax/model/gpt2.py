"""GPT-2 decoder as pure functional Flax linen modules, and its parameter layouts.

Parameter names mirror Hugging Face's ``GPT2LMHeadModel`` (``wte, wpe, h_<i>/{ln_1,
attn/{c_attn, c_proj}, ln_2, mlp/{c_fc, c_proj}}, ln_f``); with ``scan_layers=True`` the
blocks are one module scanned over the layers and their parameters are stacked under
``h`` (leading axis = layer). The output head is tied to ``wte``. With ``model_cfg.lora``,
LoRA adapters ride beside the params in the ``"lora"`` collection, in the same two layouts
(``model.lora``); the ``"params"`` tree is the same with or without them.

The model package, one job a module: ``config`` (GPT2Config), ``layers`` (Dense,
LayerNorm, MLP), ``attention`` (the attention paths and which one runs), this module
(Block, GPT2, parameter layouts), ``decode`` (the KV-cache forward), ``losses`` (the loss
heads), ``flops``, ``lora`` (LoRA adapters). This module never sees the experiment config:
the train loop builds a ``GPT2Config``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpt2_jax.model.attention import Attention
from gpt2_jax.model.config import DTYPES, GPT2Config
from gpt2_jax.model.layers import MLP, layer_norm


class Block(nn.Module):
    """One pre-LayerNorm transformer block: [B, T, C] -> [B, T, C] (``segment_ids`` as
    ``Attention``'s)."""

    model_cfg: GPT2Config
    scanned: bool = False  # nn.scan wants a (carry, out) pair back

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool, segment_ids=None):
        h = layer_norm(self.model_cfg, "ln_1")(x)
        x = x + Attention(self.model_cfg, name="attn")(h, deterministic, segment_ids)
        x = x + MLP(self.model_cfg, name="mlp")(
            layer_norm(self.model_cfg, "ln_2")(x), deterministic
        )
        return (x, None) if self.scanned else x


class GPT2(nn.Module):
    """GPT-2 language model with a tied output head.

    ``__call__(input_ids [B, T] int) -> logits [B, T, vocab_size] float32``.
    Dropout runs only with ``deterministic=False`` and a ``"dropout"`` rng.
    Packed rows (several sequences in one row, as the harness scores them):
    ``positions`` [B, T] int, each token's position in its own sequence (default
    ``arange(T)``), and ``segment_ids`` [B, T] int, which sequence each token belongs to: a
    token attends only to earlier tokens of its own segment.
    LoRA (``model_cfg.lora`` set): ``apply({"params": base, "lora": adapters}, ...)``, the
    adapters as ``lora.init_adapters`` lays them out; ``init`` makes both collections.
    """

    model_cfg: GPT2Config

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        deterministic: bool = True,
        return_hidden: bool = False,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        model_cfg = self.model_cfg
        dtype, param_dtype = DTYPES[model_cfg.dtype], DTYPES[model_cfg.param_dtype]
        B, T = input_ids.shape
        if T > model_cfg.n_positions:
            raise ValueError(
                f"sequence length {T} exceeds model.n_positions={model_cfg.n_positions}"
            )

        init = nn.initializers.normal(model_cfg.initializer_range)
        wte = nn.Embed(
            model_cfg.vocab_size,
            model_cfg.n_embd,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=init,
            name="wte",
        )
        wpe = nn.Embed(
            model_cfg.n_positions,
            model_cfg.n_embd,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=init,
            name="wpe",
        )
        x = wte(input_ids) + wpe(jnp.arange(T)[None, :] if positions is None else positions)
        x = nn.Dropout(model_cfg.embd_pdrop)(x, deterministic=deterministic)

        block = nn.remat(Block, static_argnums=(2,)) if model_cfg.remat else Block
        if model_cfg.scan_layers:
            x, _ = nn.scan(
                block,
                variable_axes={"params": 0, "lora": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=model_cfg.n_layer,
            )(model_cfg, scanned=True, name="h")(x, deterministic, segment_ids)
        else:
            for i in range(model_cfg.n_layer):
                x = block(model_cfg, name=f"h_{i}")(x, deterministic, segment_ids)

        x = layer_norm(model_cfg, "ln_f")(x)  # (B, T, C)
        if return_hidden:
            return x
        # Tied head; logits accumulate in float32 whatever the compute dtype.
        return jnp.einsum(
            "btc,vc->btv", x, wte.embedding.astype(dtype), preferred_element_type=jnp.float32
        )  # (B, T, V)


# ------------------------------------------------------------ parameter layouts


def init_params(model_cfg: GPT2Config, rng: jax.Array) -> dict:
    """Random parameters for ``model_cfg`` (the layout follows ``model_cfg.scan_layers``)."""
    return GPT2(model_cfg).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]


def stack_layers(params: dict, n_layer: int) -> dict:
    """Unrolled layout (``h_0 .. h_{L-1}``) -> scanned layout (``h`` with a leading L axis)."""
    out = {k: v for k, v in params.items() if not k.startswith("h_")}
    layers = [params[f"h_{i}"] for i in range(n_layer)]
    out["h"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return out


def unstack_layers(params: dict) -> dict:
    """Scanned layout (``h``) -> unrolled layout (``h_0 .. h_{L-1}``)."""
    out = {k: v for k, v in params.items() if k != "h"}
    n_layer = jax.tree.leaves(params["h"])[0].shape[0]
    for i in range(n_layer):
        out[f"h_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["h"])
    return out


def count_params(params: dict) -> int:
    """Number of scalars in a parameter tree (either layout)."""
    return sum(int(x.size) for x in jax.tree.leaves(params))
