"""The harness's scoring head: log-probabilities of given tokens at chosen positions,
formed a chunk of rows at a time (never the [batch, T, vocab] logits).

``_chunk_rows`` and ``_head`` are kept verbatim and together: model/losses.py's
``scored_logprobs`` (same signature) replaces them when the loss heads are one family.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HEAD_ROWS = 2048  # scored positions whose [rows, vocab] fp32 logits are formed at once


def _chunk_rows(B: int, C: int, head_rows: int) -> int:
    """Columns of ``C`` per head chunk: the largest divisor of C with B * c <= head_rows."""
    best = 1
    for c in range(1, C + 1):
        if C % c == 0 and B * c <= max(head_rows, B):
            best = c
    return best


def _head(
    wte: jax.Array,
    hidden: jax.Array,
    pos: jax.Array,
    targets: jax.Array,
    head_rows: int = HEAD_ROWS,
) -> tuple[jax.Array, jax.Array]:
    """Log-probabilities of ``targets`` at the scored positions, and whether each is the
    argmax.

    wte: [V, E]; hidden: [B, T, E]; pos: [B, C] int32, the positions whose predictions are
    scored; targets: [B, C] int32, the tokens they must give -> (logprob [B, C] float32,
    greedy [B, C] bool). At most ``head_rows`` positions' [vocab] fp32 logits exist at once.
    """
    B, C = targets.shape
    h = jnp.take_along_axis(hidden, pos[..., None], axis=1)  # [B, C, E]
    c = _chunk_rows(B, C, head_rows)
    w = wte.astype(hidden.dtype)

    def one(xs):
        hc, tc = xs  # [B, c, E], [B, c]
        logits = jnp.einsum("bce,ve->bcv", hc, w, preferred_element_type=jnp.float32)
        logz = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        return picked - logz, jnp.argmax(logits, axis=-1) == tc

    split = lambda x: jnp.moveaxis(x.reshape(B, C // c, c, *x.shape[2:]), 1, 0)  # noqa: E731
    logprob, greedy = jax.lax.map(one, (split(h), split(targets)))  # [C/c, B, c]
    return jnp.moveaxis(logprob, 0, 1).reshape(B, C), jnp.moveaxis(greedy, 0, 1).reshape(B, C)
