"""KV-cache decoding: GPT-2's forward pass for new tokens against a cache of keys and values.

``cached_forward`` runs the prompt (prefill) or one new token per row (a step) through
the layers of ``GPT2``'s parameters, in either layout, and gives ``GPT2``'s numbers for
those positions; ``init_cache`` makes the cache it reads and updates. Generation
(``evaluation.generate``) drives it; it takes no dropout and holds no module state.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from gpt2_jax.model.config import DTYPES, GPT2Config
from gpt2_jax.model.layers import MLP, dense, layer_norm, residual_std


def init_cache(model_cfg: GPT2Config, batch: int, length: int) -> list[dict[str, jax.Array]]:
    """Zeroed KV cache for ``length`` slots: per layer, ``k`` [B * nh, hs, S] and ``v``
    [B * nh, S, hs].

    One pair per layer (not one stacked [L, ...] array) so that each layer's in-place
    update inside the decode loop touches only its own buffer. These are the layouts
    XLA's CPU matmuls read as they lie (q.k contracts hs, p.v contracts S, one batch
    axis): with k as [B, nh, S, hs] XLA transposed the whole k cache at every step, and
    with a separate B axis it copied the caches around the reshape to one batch axis.
    """
    hs = model_cfg.n_embd // model_cfg.n_head
    dtype = DTYPES[model_cfg.dtype]
    return [
        {
            "k": jnp.zeros((batch * model_cfg.n_head, hs, length), dtype),
            "v": jnp.zeros((batch * model_cfg.n_head, length, hs), dtype),
        }
        for _ in range(model_cfg.n_layer)
    ]


def _layer_params(params: dict, i: int) -> dict:
    """Layer ``i``'s parameters from either layout (``h_<i>``, or ``h`` stacked)."""
    if f"h_{i}" in params:
        return params[f"h_{i}"]
    return jax.tree.map(lambda x: x[i], params["h"])


def _cached_attention(
    model_cfg: GPT2Config,
    p: dict,
    x: jax.Array,
    cache: dict[str, jax.Array],
    start: jax.Array,
    key_start: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Causal self-attention of T new tokens against the cache, which it updates.

    x: [B, T, C], the tokens at cache slots ``start .. start + T - 1``; cache: as
    ``init_cache``; key_start: [B] int, the first real (not left-padding) slot of each
    row. Returns ([B, T, C], updated cache). The same numbers as ``Attention`` (scaled
    dot product, fp32 softmax), with padding and not-yet-written slots masked out.
    """
    B, T, C = x.shape
    nh, hs = model_cfg.n_head, C // model_cfg.n_head
    S = cache["v"].shape[1]
    qkv = dense(model_cfg, 3 * C, None, model_cfg.initializer_range).apply(
        {"params": p["c_attn"]}, x
    )
    q, k, v = (t.reshape(B, T, nh, hs) for t in jnp.split(qkv, 3, axis=-1))  # (B, T, nh, hs)
    q = q.transpose(0, 2, 1, 3).reshape(B * nh, T, hs)
    k = k.transpose(0, 2, 3, 1).reshape(B * nh, hs, T).astype(cache["k"].dtype)
    v = v.transpose(0, 2, 1, 3).reshape(B * nh, T, hs).astype(cache["v"].dtype)
    ks = jax.lax.dynamic_update_slice_in_dim(cache["k"], k, start, 2)  # (B*nh, hs, S)
    vs = jax.lax.dynamic_update_slice_in_dim(cache["v"], v, start, 1)  # (B*nh, S, hs)
    att = jnp.einsum("ath,ahs->ats", q, ks, preferred_element_type=jnp.float32)
    att = att.reshape(B, nh, T, S) / math.sqrt(hs)
    slot = jnp.arange(S)[None, None, :]  # (1, 1, S)
    query_slot = (start + jnp.arange(T))[None, :, None]  # (1, T, 1)
    # Causal within the cache, and never a left-padding slot (GPT-2 has no pad token).
    visible = (slot <= query_slot) & (slot >= key_start[:, None, None])  # (B, T, S)
    # finfo.min, not -inf: a padding query sees no key at all and must not give NaN.
    att = jnp.where(visible[:, None], att, jnp.finfo(jnp.float32).min)
    att = jax.nn.softmax(att, axis=-1).astype(vs.dtype).reshape(B * nh, T, S)
    y = jnp.einsum("ats,ash->ath", att, vs)  # (B*nh, T, hs)
    y = y.reshape(B, nh, T, hs).transpose(0, 2, 1, 3).reshape(B, T, C)
    y = dense(model_cfg, C, None, residual_std(model_cfg)).apply({"params": p["c_proj"]}, y)
    return y, {"k": ks, "v": vs}


def cached_forward(
    model_cfg: GPT2Config,
    params: dict,
    input_ids: jax.Array,
    positions: jax.Array,
    cache: list[dict[str, jax.Array]],
    start: jax.Array,
    key_start: jax.Array,
) -> tuple[jax.Array, list[dict[str, jax.Array]]]:
    """Forward pass of new tokens with a KV cache (prefill: T = prompt, step: T = 1).

    input_ids, positions: [B, T] int (positions per row: left-padded rows start later);
    cache: ``init_cache(model_cfg, B, S)``; start: int scalar, the cache slot of
    ``input_ids[:, 0]``; key_start: [B] int, each row's first real slot. Returns
    (logits [B, T, V] float32, updated cache). Takes the parameters ``GPT2`` uses, in
    either layout, and gives its numbers (inference only: no dropout). Per-layer
    parameters are sliced by static index, so the unrolled layout (``h_<i>``) saves a
    slice per layer and step inside a decode loop.
    """
    dtype = DTYPES[model_cfg.dtype]
    wte = params["wte"]["embedding"]
    # Cast then add, as nn.Embed does.
    x = jnp.take(wte, input_ids, axis=0).astype(dtype) + jnp.take(
        params["wpe"]["embedding"], positions, axis=0
    ).astype(dtype)  # (B, T, C)
    new_cache = []
    for i in range(model_cfg.n_layer):
        p = _layer_params(params, i)
        h = layer_norm(model_cfg, None).apply({"params": p["ln_1"]}, x)
        y, layer_cache = _cached_attention(model_cfg, p["attn"], h, cache[i], start, key_start)
        x = x + y
        h = layer_norm(model_cfg, None).apply({"params": p["ln_2"]}, x)
        x = x + MLP(model_cfg).apply({"params": p["mlp"]}, h, True)
        new_cache.append(layer_cache)
    x = layer_norm(model_cfg, None).apply({"params": params["ln_f"]}, x)
    logits = jnp.einsum("btc,vc->btv", x, wte.astype(dtype), preferred_element_type=jnp.float32)
    return logits, new_cache
