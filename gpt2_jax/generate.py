"""Text sampling: greedy, temperature, top-k, top-p.

This version recomputes the whole (fixed-size) context for each new token: one compiled
function whatever the prompt length, O(T^2) per token. A KV-cache decoder replaces it later.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gpt2_jax import model as model_lib


def filter_logits(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """logits: [B, V] float32 -> scaled logits with filtered entries at -inf.

    ``top_k <= 0`` and ``top_p >= 1`` disable those filters; temperature must be > 0.
    """
    logits = logits / temperature
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        cutoff_idx = jnp.sum(cum < top_p, axis=-1, keepdims=True)  # [B, 1]
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


@functools.partial(jax.jit, static_argnames=("cfg", "temperature", "top_k", "top_p"))
def _next_token(params, buf, length, key, *, cfg, temperature, top_k, top_p):
    """buf: [1, T] int32 (valid up to ``length``) -> next token id [1] int32."""
    logits = model_lib.GPT2(cfg).apply({"params": params}, buf)  # [1, T, V]
    last = jax.lax.dynamic_index_in_dim(logits, length - 1, axis=1, keepdims=False)  # [1, V]
    if temperature == 0.0:
        return jnp.argmax(last, axis=-1).astype(jnp.int32)
    last = filter_logits(last, temperature, top_k, top_p)
    return jax.random.categorical(key, last, axis=-1).astype(jnp.int32)


def generate(
    cfg: model_lib.GPT2Config,
    params,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_token: int | None = None,
) -> list[int]:
    """Samples ``max_new_tokens`` ids after ``prompt_ids``; returns only the new ids.

    ``temperature=0`` is greedy. Context beyond ``cfg.n_positions`` is cropped from the left.
    """
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    T = min(cfg.n_positions, len(prompt_ids) + max_new_tokens)
    ids = list(prompt_ids)
    key = jax.random.PRNGKey(seed)
    new: list[int] = []
    for i in range(max_new_tokens):
        context = ids[-T:]
        buf = np.zeros((1, T), np.int32)
        buf[0, : len(context)] = context
        tok = _next_token(
            params,
            jnp.asarray(buf),
            jnp.int32(len(context)),
            jax.random.fold_in(key, i),
            cfg=cfg,
            temperature=float(temperature),
            top_k=int(top_k),
            top_p=float(top_p),
        )
        tok = int(tok[0])
        ids.append(tok)
        new.append(tok)
        if stop_token is not None and tok == stop_token:
            break
    return new
