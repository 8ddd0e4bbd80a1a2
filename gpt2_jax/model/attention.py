"""Causal self-attention: the ``attn`` layer of a block, and the paths that compute it.

Every path takes the fused projection ``qkv`` [B, T, 3C] and returns [B, T, C]; they give
the same numbers (the tests hold each to ``xla_attention``) and differ in speed, memory
and what they support. ``attend`` is the one place that picks a path:

1. ``cudnn_attention``: cuDNN's fused kernel, when ``use_cudnn`` (a GPU, a half-precision
   compute dtype), no dropout is applied (cuDNN's dropout RNG is not ``nn.Dropout``'s)
   and no segment ids are given. It returns None where cuDNN declines a shape or dtype,
   and the next path runs.
2. ``blocked_attention``: inference (``deterministic``), with or without segment ids.
   Queries a block at a time against only the keys they can see, the softmax normalised
   after the value matmul: 1.4-2.2x faster than (3) on the 2-core CPU
   (experiments/harness).
3. ``xla_attention``: training, and everything else: plain einsums, fp32 scores and
   softmax, dropout on the probabilities.

The KV-cache decoder has its own attention against the cache (``model.decode``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpt2_jax.model.config import GPT2Config
from gpt2_jax.model.layers import dense, residual_std

QUERY_BLOCK = 128  # queries per block of the inference attention (blocked_attention)


def same_segment(segment_ids: jax.Array, q: slice = slice(None), k: slice = slice(None)):
    """[B, T] segment ids -> [B, 1, Tq, Tk] bool: query t may see key s (the same segment),
    for the queries ``q`` and keys ``k``. Formed inside each attention's score fusion (a
    compare of two [B, T] vectors), so no [B, T, T] mask is held between layers."""
    return segment_ids[:, None, q, None] == segment_ids[:, None, None, k]


def document_segments(input_ids: jax.Array, eos: int) -> tuple[jax.Array, jax.Array]:
    """Documents told apart by ``eos`` in rows of concatenated text (``data.document_mask``):
    [B, T] int -> (positions, segment_ids), both [B, T] int32. A segment starts at every
    ``eos`` (which so opens the next document, modded-nanogpt's ``(idx == eos).cumsum()``)
    and at the row's start, where a document cut by the row boundary continues as a new
    segment; positions count from 0 in each."""
    T = input_ids.shape[1]
    starts = input_ids == eos
    segment_ids = jnp.cumsum(starts, axis=1, dtype=jnp.int32)
    t = jnp.arange(T, dtype=jnp.int32)
    first = jax.lax.cummax(jnp.where(starts, t, 0), axis=1)  # the segment's first index
    return t - first, segment_ids


def use_cudnn(model_cfg: GPT2Config) -> bool:
    """cuDNN's fused attention: on GPU, in a half-precision compute dtype."""
    return jax.default_backend() == "gpu" and model_cfg.dtype in ("bfloat16", "float16")


def cudnn_attention(qkv: jax.Array, nh: int, implementation: str = "cudnn") -> jax.Array | None:
    """Causal attention of ``qkv`` [B, T, 3C] -> [B, T, C] through
    ``jax.nn.dot_product_attention(implementation="cudnn")``; None when cuDNN declines
    (no cuDNN, a dtype other than fp16/bf16, a head size not a multiple of 8 or above 128
    (256 on Hopper)): the caller then uses ``xla_attention``. jax raises those refusals while
    tracing (NotImplementedError / ValueError / RuntimeError, the same in jax 0.10 to 0.12),
    so they are caught here, forward and gradient alike. ``implementation="xla"`` runs
    the same reshapes through jax's XLA attention: how the tests check this path on a CPU
    (tests/test_model.py, tests/test_gpu.py)."""
    B, T, C3 = qkv.shape
    q, k, v = (t.reshape(B, T, nh, C3 // (3 * nh)) for t in jnp.split(qkv, 3, axis=-1))
    try:
        y = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
    except (NotImplementedError, ValueError, RuntimeError):
        return None
    return y.reshape(B, T, C3 // 3)


def xla_attention(qkv: jax.Array, nh: int, dropout=None, segment_ids=None) -> jax.Array:
    """Causal attention of ``qkv`` [B, T, 3C] -> [B, T, C] as plain einsums (fp32 scores
    and softmax whatever the compute dtype); ``dropout``: applied to the probabilities;
    ``segment_ids``: [B, T] int or None, a query attends only to its own segment."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // nh
    # Head-major once, right after the projection: both attention matmuls then
    # have their batch axes (B, nh) leading and contract in place (on the 2-core
    # CPU: -17% a gpt2 4 x 512 train step against [B, T, nh, hs] operands and
    # jax.nn.dot_product_attention; experiments/archive/speed).
    q, k, v = qkv.reshape(B, T, 3, nh, hs).transpose(2, 0, 3, 1, 4)  # (B, nh, T, hs)
    att = jnp.einsum("bnth,bnsh->bnts", q, k, preferred_element_type=jnp.float32)
    att = att / math.sqrt(hs)
    causal = jnp.tril(jnp.ones((T, T), dtype=bool))
    if segment_ids is not None:
        causal = causal & same_segment(segment_ids)
    att = jnp.where(causal, att, jnp.finfo(jnp.float32).min)
    att = jax.nn.softmax(att, axis=-1).astype(v.dtype)  # (B, nh, T, T)
    if dropout is not None:
        att = dropout(att)
    y = jnp.einsum("bnts,bnsh->bnth", att, v)  # (B, nh, T, hs)
    return y.transpose(0, 2, 1, 3).reshape(B, T, C)


def blocked_attention(
    qkv: jax.Array, nh: int, segment_ids=None, block: int = QUERY_BLOCK
) -> jax.Array:
    """``xla_attention`` without dropout, as inference runs it: the queries a block at a
    time, each against only the keys up to its block's end (the causal upper triangle is
    never formed), the softmax normalized after the value matmul ([t, hs], not [t, s]).
    ``qkv`` [B, T, 3C], ``segment_ids`` [B, T] int or None -> [B, T, C].
    On the 2-core CPU: 2.2x faster at 16 x 1024, 1.4x at 16 x 128, equal to 1e-6
    (experiments/harness)."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // nh
    q, k, v = qkv.reshape(B, T, 3, nh, hs).transpose(2, 0, 3, 1, 4)  # (B, nh, T, hs)
    q = q / jnp.asarray(math.sqrt(hs), q.dtype)
    out = []
    for s in range(0, T, block):
        e = min(s + block, T)
        att = jnp.einsum("bnth,bnsh->bnts", q[:, :, s:e], k[:, :, :e],
                         preferred_element_type=jnp.float32)  # fmt: skip
        keep = jnp.arange(s, e)[:, None] >= jnp.arange(e)[None, :]
        if segment_ids is not None:
            keep = keep & same_segment(segment_ids, slice(s, e), slice(0, e))
        att = jnp.where(keep, att, jnp.finfo(jnp.float32).min)
        p = jnp.exp(att - jnp.max(att, axis=-1, keepdims=True))
        y = jnp.einsum("bnts,bnsh->bnth", p.astype(v.dtype), v[:, :, :e],
                       preferred_element_type=jnp.float32)  # fmt: skip
        out.append((y / jnp.sum(p, axis=-1, keepdims=True)).astype(v.dtype))
    y = jnp.concatenate(out, axis=2) if len(out) > 1 else out[0]
    return y.transpose(0, 2, 1, 3).reshape(B, T, C)


def attend(
    qkv: jax.Array,
    model_cfg: GPT2Config,
    deterministic: bool,
    segment_ids: jax.Array | None,
    dropout: Callable[[jax.Array], jax.Array],
) -> jax.Array:
    """``qkv`` [B, T, 3C] -> [B, T, C] through the path the module docstring's order picks.

    ``segment_ids``: [B, T] int or None; ``dropout``: applied to the attention
    probabilities on the XLA path only, so the ``nn.Dropout`` it makes exists only where
    it runs (its auto-name, hence its RNG stream, stays what the checkpoints trained with).
    """
    no_dropout = deterministic or model_cfg.attn_pdrop == 0.0
    fused = no_dropout and segment_ids is None and use_cudnn(model_cfg)
    y = cudnn_attention(qkv, model_cfg.n_head) if fused else None
    if y is None and deterministic:
        y = blocked_attention(qkv, model_cfg.n_head, segment_ids)
    if y is None:
        y = xla_attention(qkv, model_cfg.n_head, dropout, segment_ids)
    return y


class Attention(nn.Module):
    """A block's attention layer: [B, T, C] -> [B, T, C]; parameters ``c_attn``, ``c_proj``.

    ``segment_ids``: [B, T] int (attend within a segment) or None (causal only).
    """

    model_cfg: GPT2Config

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool, segment_ids=None) -> jax.Array:
        model_cfg = self.model_cfg
        C = x.shape[-1]
        qkv = dense(
            model_cfg, 3 * C, "c_attn", model_cfg.initializer_range, "attn.c_attn", deterministic
        )(x)  # (B, T, 3C)
        dropout = lambda a: nn.Dropout(model_cfg.attn_pdrop)(a, deterministic=deterministic)  # noqa: E731
        y = attend(qkv, model_cfg, deterministic, segment_ids, dropout)
        y = dense(model_cfg, C, "c_proj", residual_std(model_cfg), "attn.c_proj", deterministic)(y)
        return nn.Dropout(model_cfg.resid_pdrop)(y, deterministic=deterministic)
