"""GPT-2 decoder as pure functional Flax linen modules.

Parameter names mirror Hugging Face's ``GPT2LMHeadModel`` (``wte, wpe, h_<i>/{ln_1,
attn/{c_attn, c_proj}, ln_2, mlp/{c_fc, c_proj}}, ln_f``); with ``scan_layers=True`` the
blocks are one module scanned over the layers and their parameters are stacked under
``h`` (leading axis = layer). The output head is tied to ``wte``.

This module never sees the experiment config: ``train.py`` builds a ``GPT2Config``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Named sizes: (n_layer, n_head, n_embd), as in Hugging Face's configs.
SIZES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}


def size_fields(size: str) -> dict[str, int]:
    """(n_layer, n_head, n_embd) of a named size, e.g. ``GPT2Config(**size_fields("gpt2"))``;
    the one lookup (``model.size`` in a config asks it too)."""
    if size not in SIZES:
        raise ValueError(f"model.size={size!r} is not one of {sorted(SIZES)}")
    return dict(SIZES[size])


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Model config. Field names are Hugging Face ``GPT2Config``'s where they exist."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # None -> 4 * n_embd
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    # Not in Hugging Face's config: how we compute, not what the model is.
    dtype: str = "float32"  # compute dtype (activations, matmuls)
    param_dtype: str = "float32"  # parameter (and optimizer state) dtype
    scan_layers: bool = False  # True: one block compiled and scanned over layers, params under "h"
    remat: bool = False  # recompute block activations in the backward pass (saves memory)

    @property
    def inner_dim(self) -> int:
        return self.n_inner or 4 * self.n_embd

    def validate(self) -> None:
        """Raises ValueError naming the field for an impossible config."""
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}"
            )
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(
                    f"model.{name}={getattr(self, name)!r} is not one of {list(DTYPES)}"
                )


# What the weights fix (a checkpoint's shape) vs how to compute with them (a user may change
# these on resume or import). Every other list of model fields derives from these two.
SHAPE_FIELDS = (
    "n_layer",
    "n_head",
    "n_embd",
    "n_positions",
    "vocab_size",
    "n_inner",
    "layer_norm_epsilon",
)
RUNTIME_FIELDS = (
    "dtype",
    "param_dtype",
    "scan_layers",
    "remat",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
)


def runtime_from_section(m) -> dict:
    """The runtime fields from a config's ``model`` section (a mapping): one key,
    ``dropout``, sets all three of Hugging Face's *_pdrop fields."""
    defaults = GPT2Config()
    get = m.get if hasattr(m, "get") else lambda k, d: getattr(m, k, d)
    dropout = get("dropout", defaults.resid_pdrop)
    return {
        f: dropout if f.endswith("_pdrop") else get(f, getattr(defaults, f)) for f in RUNTIME_FIELDS
    }


def config_from_section(m) -> GPT2Config:
    """The frozen model config from a config's ``model`` section (a mapping of plain
    values): ``size`` first, explicit n_layer/n_head/n_embd win. Raises ValueError naming
    the key. Keys missing from an older saved config take GPT2Config's defaults."""
    get = m.get if hasattr(m, "get") else lambda k, d: getattr(m, k, d)
    fields = size_fields(get("size", "")) if get("size", "") else {}
    for name in ("n_layer", "n_head", "n_embd"):
        if get(name, 0):
            fields[name] = get(name, 0)
        elif name not in fields:
            raise ValueError(f"model.{name} is not set (set it, or model.size)")
    defaults = GPT2Config()
    return GPT2Config(
        **fields,
        vocab_size=get("vocab_size", defaults.vocab_size),
        n_positions=get("n_positions", defaults.n_positions),
        n_inner=get("n_inner", 0) or None,
        layer_norm_epsilon=get("layer_norm_epsilon", defaults.layer_norm_epsilon),
        **runtime_from_section(m),
    )


def _dense(cfg: GPT2Config, features: int, name: str | None, std: float) -> nn.Dense:
    # HF Conv1D stores weights as (in, out): the same layout as a Dense kernel.
    return nn.Dense(
        features,
        dtype=DTYPES[cfg.dtype],
        param_dtype=DTYPES[cfg.param_dtype],
        kernel_init=nn.initializers.normal(std),
        bias_init=nn.initializers.zeros,
        name=name,
    )


def _layer_norm(cfg: GPT2Config, name: str | None) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_epsilon,
        dtype=DTYPES[cfg.dtype],
        param_dtype=DTYPES[cfg.param_dtype],
        name=name,
    )


def _use_cudnn(cfg: GPT2Config) -> bool:
    """cuDNN's fused attention: on GPU, in a half-precision compute dtype, no attention
    dropout (cuDNN's dropout RNG differs from ``nn.Dropout``'s)."""
    return jax.default_backend() == "gpu" and cfg.dtype in ("bfloat16", "float16")


def _cudnn_attention(qkv: jax.Array, nh: int, implementation: str = "cudnn") -> jax.Array | None:
    """Causal attention of ``qkv`` [B, T, 3C] -> [B, T, C] through
    ``jax.nn.dot_product_attention(implementation="cudnn")``; None when cuDNN declines
    (no cuDNN, a dtype other than fp16/bf16, a head size not a multiple of 8 or above 128
    (256 on Hopper)): the caller then uses ``_xla_attention``. jax raises those refusals while
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


def _xla_attention(qkv: jax.Array, nh: int, dropout=None, mask=None) -> jax.Array:
    """Causal attention of ``qkv`` [B, T, 3C] -> [B, T, C] as plain einsums (fp32 scores
    and softmax whatever the compute dtype); ``dropout``: applied to the probabilities;
    ``mask``: [B, 1, T, T] bool, where a query may also attend (``segment_mask``)."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // nh
    # Head-major once, right after the projection: both attention matmuls then
    # have their batch axes (B, nh) leading and contract in place (on the 2-core
    # CPU: -17% a gpt2 4 x 512 train step against [B, T, nh, hs] operands and
    # jax.nn.dot_product_attention; experiments/speed).
    q, k, v = qkv.reshape(B, T, 3, nh, hs).transpose(2, 0, 3, 1, 4)  # (B, nh, T, hs)
    att = jnp.einsum("bnth,bnsh->bnts", q, k, preferred_element_type=jnp.float32)
    att = att / math.sqrt(hs)
    causal = jnp.tril(jnp.ones((T, T), dtype=bool))
    if mask is not None:
        causal = causal & mask
    att = jnp.where(causal, att, jnp.finfo(jnp.float32).min)
    att = jax.nn.softmax(att, axis=-1).astype(v.dtype)  # (B, nh, T, T)
    if dropout is not None:
        att = dropout(att)
    y = jnp.einsum("bnts,bnsh->bnth", att, v)  # (B, nh, T, hs)
    return y.transpose(0, 2, 1, 3).reshape(B, T, C)


QUERY_BLOCK = 128  # queries per block of the inference attention (_blocked_attention)


def _blocked_attention(qkv: jax.Array, nh: int, mask=None, block: int = QUERY_BLOCK) -> jax.Array:
    """``_xla_attention`` without dropout, as inference runs it: the queries a block at a
    time, each against only the keys up to its block's end (the causal upper triangle is
    never formed), the softmax normalized after the value matmul ([t, hs], not [t, s]).
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
        if mask is not None:
            keep = keep & mask[:, :, s:e, :e]
        att = jnp.where(keep, att, jnp.finfo(jnp.float32).min)
        p = jnp.exp(att - jnp.max(att, axis=-1, keepdims=True))
        y = jnp.einsum("bnts,bnsh->bnth", p.astype(v.dtype), v[:, :, :e],
                       preferred_element_type=jnp.float32)  # fmt: skip
        out.append((y / jnp.sum(p, axis=-1, keepdims=True)).astype(v.dtype))
    y = jnp.concatenate(out, axis=2) if len(out) > 1 else out[0]
    return y.transpose(0, 2, 1, 3).reshape(B, T, C)


class Attention(nn.Module):
    cfg: GPT2Config

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool, mask=None) -> jax.Array:
        cfg = self.cfg
        C = x.shape[-1]
        # Residual projections scaled by 1/sqrt(2 * n_layer), as in GPT-2 and HF's init.
        proj_std = cfg.initializer_range / math.sqrt(2 * cfg.n_layer)

        qkv = _dense(cfg, 3 * C, "c_attn", cfg.initializer_range)(x)  # (B, T, 3C)
        no_dropout = deterministic or cfg.attn_pdrop == 0.0
        fused = no_dropout and mask is None and _use_cudnn(cfg)
        y = _cudnn_attention(qkv, cfg.n_head) if fused else None
        if y is None and deterministic:
            y = _blocked_attention(qkv, cfg.n_head, mask)
        if y is None:
            drop = nn.Dropout(cfg.attn_pdrop)
            dropout = lambda a: drop(a, deterministic=deterministic)  # noqa: E731
            y = _xla_attention(qkv, cfg.n_head, dropout, mask)
        y = _dense(cfg, C, "c_proj", proj_std)(y)
        return nn.Dropout(cfg.resid_pdrop)(y, deterministic=deterministic)


class MLP(nn.Module):
    cfg: GPT2Config

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.cfg
        proj_std = cfg.initializer_range / math.sqrt(2 * cfg.n_layer)
        h = _dense(cfg, cfg.inner_dim, "c_fc", cfg.initializer_range)(x)
        h = jax.nn.gelu(h, approximate=True)  # HF "gelu_new"
        h = _dense(cfg, cfg.n_embd, "c_proj", proj_std)(h)
        return nn.Dropout(cfg.resid_pdrop)(h, deterministic=deterministic)


class Block(nn.Module):
    cfg: GPT2Config
    scanned: bool = False  # nn.scan wants a (carry, out) pair back

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool, mask=None):
        h = _layer_norm(self.cfg, "ln_1")(x)
        x = x + Attention(self.cfg, name="attn")(h, deterministic, mask)
        x = x + MLP(self.cfg, name="mlp")(_layer_norm(self.cfg, "ln_2")(x), deterministic)
        return (x, None) if self.scanned else x


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, T] segment ids -> [B, 1, T, T] bool: query t may see key s of the same segment."""
    return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


class GPT2(nn.Module):
    """GPT-2 language model with a tied output head.

    ``__call__(input_ids [B, T] int) -> logits [B, T, vocab_size] float32``.
    Dropout runs only with ``deterministic=False`` and a ``"dropout"`` rng.
    Packed rows (several sequences in one row, as the harness scores them):
    ``positions`` [B, T] int, each token's position in its own sequence (default
    ``arange(T)``), and ``segment_ids`` [B, T] int, which sequence each token belongs to: a
    token attends only to earlier tokens of its own segment.
    """

    cfg: GPT2Config

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        deterministic: bool = True,
        return_hidden: bool = False,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        cfg = self.cfg
        dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        B, T = input_ids.shape
        if T > cfg.n_positions:
            raise ValueError(f"sequence length {T} exceeds model.n_positions={cfg.n_positions}")

        init = nn.initializers.normal(cfg.initializer_range)
        wte = nn.Embed(
            cfg.vocab_size,
            cfg.n_embd,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=init,
            name="wte",
        )
        wpe = nn.Embed(
            cfg.n_positions,
            cfg.n_embd,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=init,
            name="wpe",
        )
        x = wte(input_ids) + wpe(jnp.arange(T)[None, :] if positions is None else positions)
        mask = None if segment_ids is None else segment_mask(segment_ids)
        x = nn.Dropout(cfg.embd_pdrop)(x, deterministic=deterministic)

        block = nn.remat(Block, static_argnums=(2,)) if cfg.remat else Block
        if cfg.scan_layers:
            x, _ = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=cfg.n_layer,
            )(cfg, scanned=True, name="h")(x, deterministic, mask)
        else:
            for i in range(cfg.n_layer):
                x = block(cfg, name=f"h_{i}")(x, deterministic, mask)

        x = _layer_norm(cfg, "ln_f")(x)  # (B, T, C)
        if return_hidden:
            return x
        # Tied head; logits accumulate in float32 whatever the compute dtype.
        return jnp.einsum(
            "btc,vc->btv", x, wte.embedding.astype(dtype), preferred_element_type=jnp.float32
        )  # (B, T, V)


# -------------------------------------------------------------- cached decoding


def init_cache(cfg: GPT2Config, batch: int, length: int) -> list[dict[str, jax.Array]]:
    """Zeroed KV cache for ``length`` slots: per layer, ``k`` [B * nh, hs, S] and ``v``
    [B * nh, S, hs].

    One pair per layer (not one stacked [L, ...] array) so that each layer's in-place
    update inside the decode loop touches only its own buffer. These are the layouts
    XLA's CPU matmuls read as they lie (q.k contracts hs, p.v contracts S, one batch
    axis): with k as [B, nh, S, hs] XLA transposed the whole k cache at every step, and
    with a separate B axis it copied the caches around the reshape to one batch axis.
    """
    hs = cfg.n_embd // cfg.n_head
    dtype = DTYPES[cfg.dtype]
    return [
        {
            "k": jnp.zeros((batch * cfg.n_head, hs, length), dtype),
            "v": jnp.zeros((batch * cfg.n_head, length, hs), dtype),
        }
        for _ in range(cfg.n_layer)
    ]


def _layer_params(params: dict, i: int) -> dict:
    """Layer ``i``'s parameters from either layout (``h_<i>``, or ``h`` stacked)."""
    if f"h_{i}" in params:
        return params[f"h_{i}"]
    return jax.tree.map(lambda x: x[i], params["h"])


def _cached_attention(
    cfg: GPT2Config,
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
    nh, hs = cfg.n_head, C // cfg.n_head
    S = cache["v"].shape[1]
    qkv = _dense(cfg, 3 * C, None, cfg.initializer_range).apply({"params": p["c_attn"]}, x)
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
    y = _dense(cfg, C, None, cfg.initializer_range / math.sqrt(2 * cfg.n_layer)).apply(
        {"params": p["c_proj"]}, y
    )
    return y, {"k": ks, "v": vs}


def decode(
    cfg: GPT2Config,
    params: dict,
    input_ids: jax.Array,
    positions: jax.Array,
    cache: list[dict[str, jax.Array]],
    start: jax.Array,
    key_start: jax.Array,
) -> tuple[jax.Array, list[dict[str, jax.Array]]]:
    """Forward pass of new tokens with a KV cache (prefill: T = prompt, step: T = 1).

    input_ids, positions: [B, T] int (positions per row: left-padded rows start later);
    cache: ``init_cache(cfg, B, S)``; start: int scalar, the cache slot of
    ``input_ids[:, 0]``; key_start: [B] int, each row's first real slot. Returns
    (logits [B, T, V] float32, updated cache). Takes the parameters ``GPT2`` uses, in
    either layout, and gives its numbers (inference only: no dropout). Per-layer
    parameters are sliced by static index, so the unrolled layout (``h_<i>``) saves a
    slice per layer and step inside a decode loop.
    """
    dtype = DTYPES[cfg.dtype]
    wte = params["wte"]["embedding"]
    # Cast then add, as nn.Embed does.
    x = jnp.take(wte, input_ids, axis=0).astype(dtype) + jnp.take(
        params["wpe"]["embedding"], positions, axis=0
    ).astype(dtype)  # (B, T, C)
    new_cache = []
    for i in range(cfg.n_layer):
        p = _layer_params(params, i)
        h = _layer_norm(cfg, None).apply({"params": p["ln_1"]}, x)
        y, layer_cache = _cached_attention(cfg, p["attn"], h, cache[i], start, key_start)
        x = x + y
        h = _layer_norm(cfg, None).apply({"params": p["ln_2"]}, x)
        x = x + MLP(cfg).apply({"params": p["mlp"]}, h, True)
        new_cache.append(layer_cache)
    x = _layer_norm(cfg, None).apply({"params": params["ln_f"]}, x)
    logits = jnp.einsum("btc,vc->btv", x, wte.astype(dtype), preferred_element_type=jnp.float32)
    return logits, new_cache


# ---------------------------------------------------------------------------- loss


def token_nll(logits: jax.Array, input_ids: jax.Array) -> jax.Array:
    """Shifted next-token negative log-likelihood, as Hugging Face's GPT-2 loss.

    logits: [B, T, V] float; input_ids: [B, T] int -> [B, T - 1] float32, where entry t
    is -log p(input_ids[:, t + 1] | input_ids[:, : t + 1]).
    """
    logits = logits[:, :-1].astype(jnp.float32)
    targets = input_ids[:, 1:]
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return logz - picked


def padded_vocab_size(vocab_size: int, multiple: int = 128) -> int:
    return -(-vocab_size // multiple) * multiple


def hidden_token_nll(hidden: jax.Array, wte: jax.Array, input_ids: jax.Array) -> jax.Array:
    """``token_nll`` from the final hidden states, for training.

    hidden: [B, T, C] (``GPT2(..., return_hidden=True)``); wte: [V, C]; input_ids: [B, T]
    -> [B, T - 1] float32. The tied head runs against ``wte`` zero-padded to a multiple of
    128 rows, with the padded logits masked out: the same numbers, in matmul shapes that
    accelerators tile well (nanoGPT's 50304). On this project's 2-core CPU it measured no
    faster than the plain head (experiments/padded_head). The padding never leaves this
    function: parameters and user-facing logits keep the real vocabulary.
    """
    w = _padded_head(wte, hidden.dtype)
    logits, logz = _head_logits(hidden[:, :-1], w, wte.shape[0])  # (B, T-1, Vp), (B, T-1)
    picked = jnp.take_along_axis(logits, input_ids[:, 1:, None], axis=-1)[..., 0]
    return logz - picked


def _padded_head(wte: jax.Array, dtype) -> jax.Array:
    """wte [V, C] zero-padded to [padded_vocab_size(V), C] in ``dtype``."""
    V = wte.shape[0]
    return jnp.pad(wte.astype(dtype), ((0, padded_vocab_size(V) - V), (0, 0)))


def _head_logits(h: jax.Array, w: jax.Array, V: int) -> tuple[jax.Array, jax.Array]:
    """h [..., C] against the padded head w [Vp, C] -> (fp32 logits [..., Vp] with the
    padding rows at -inf, their logsumexp [...])."""
    logits = jnp.einsum("...c,vc->...v", h, w, preferred_element_type=jnp.float32)
    logits = jnp.where(jnp.arange(w.shape[0]) < V, logits, -jnp.inf)
    return logits, jax.nn.logsumexp(logits, axis=-1)


HEAD_CHUNK = 1024  # rows of the training head's logits held at once (mean_token_nll)


def mean_token_nll(
    hidden: jax.Array, wte: jax.Array, input_ids: jax.Array, chunk: int = HEAD_CHUNK
) -> jax.Array:
    """``hidden_token_nll(...).mean()`` for training, never holding the batch's logits.

    Up to ``chunk`` predictions (B * (T - 1)) it is exactly that. Beyond, the tied head
    runs over chunks of ``chunk`` rows (the B * (T - 1) predictions) in a
    ``lax.scan``; each chunk's logits, loss and gradient (softmax - one-hot) are formed
    and used at once, so the forward pass already yields d(loss)/d(hidden) and
    d(loss)/d(wte), and the backward pass only scales them (a ``custom_vjp``). Memory:
    [chunk, V] fp32 logits instead of [B, T - 1, V]. The wte gradient is accumulated as
    [C, V] (hidden^T @ dlogits), which XLA:CPU reads in place; autodiff's
    dlogits^T @ hidden made it transpose the whole logits gradient first (1 s of a
    2.9 s step for the quickstart model; experiments/speed). Same numbers as
    ``hidden_token_nll`` (a test holds loss and gradients to it).
    """
    B, T, C = hidden.shape
    if B * (T - 1) <= chunk:
        # One chunk: autodiff's plain head measured 4-11% faster here (experiments/speed).
        return hidden_token_nll(hidden, wte, input_ids).mean()
    h = hidden[:, :-1].reshape(-1, C)  # [N, C]
    targets = input_ids[:, 1:].reshape(-1).astype(jnp.int32)  # [N]
    return _chunked_nll(h, wte, targets, chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked_nll(h: jax.Array, wte: jax.Array, targets: jax.Array, chunk: int) -> jax.Array:
    return _chunked_nll_fwd(h, wte, targets, chunk)[0]


def _chunked_nll_fwd(h, wte, targets, chunk):
    N, C = h.shape
    V = wte.shape[0]
    w = _padded_head(wte, h.dtype)  # (Vp, C)
    Vp = w.shape[0]
    n_chunks = -(-N // chunk)
    pad = n_chunks * chunk - N
    hs = jnp.pad(h, ((0, pad), (0, 0))).reshape(n_chunks, chunk, C)
    ts = jnp.pad(targets, (0, pad)).reshape(n_chunks, chunk)
    real = (jnp.arange(n_chunks * chunk) < N).reshape(n_chunks, chunk)

    def one_chunk(dw_t, xs):
        hc, tc, rc = xs  # (chunk, C), (chunk,), (chunk,)
        logits, logz = _head_logits(hc, w, V)  # (chunk, Vp), (chunk,)
        picked = jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
        nll = jnp.where(rc, logz - picked, 0.0)
        weight = (rc / N)[:, None]  # d(mean)/d(nll); 0 on padding rows
        dlogits = jnp.exp(logits - logz[:, None]) * weight - jax.nn.one_hot(tc, Vp) * weight
        dlogits = dlogits.astype(h.dtype)
        dh = jnp.einsum("nv,vc->nc", dlogits, w, preferred_element_type=jnp.float32)
        dw_t = dw_t + jnp.einsum("nc,nv->cv", hc, dlogits, preferred_element_type=jnp.float32)
        return dw_t, (jnp.sum(nll), dh)

    dw_t, (nll, dh) = jax.lax.scan(one_chunk, jnp.zeros((C, Vp), jnp.float32), (hs, ts, real))
    loss = jnp.sum(nll) / N
    dh = dh.reshape(n_chunks * chunk, C)[:N].astype(h.dtype)
    dw = dw_t.T[:V].astype(wte.dtype)
    return loss, (dh, dw, targets)


def _chunked_nll_bwd(chunk, res, g):
    del chunk
    dh, dw, targets = res
    zero_targets = np.zeros(targets.shape, dtype=jax.dtypes.float0)
    return (g * dh).astype(dh.dtype), (g * dw).astype(dw.dtype), zero_targets


_chunked_nll.defvjp(_chunked_nll_fwd, _chunked_nll_bwd)


# ------------------------------------------------------------ parameter layouts


def init_params(cfg: GPT2Config, rng: jax.Array) -> dict:
    """Random parameters for ``cfg`` (the layout follows ``cfg.scan_layers``)."""
    return GPT2(cfg).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]


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
    return sum(int(x.size) for x in jax.tree.leaves(params))
