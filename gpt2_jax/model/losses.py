"""The loss heads: GPT-2's tied output head turned into next-token log-probabilities.

One family, five variants, each for one caller; all give the same numbers where they
overlap (tests/test_model.py holds each to full logits, directly or through another):

- ``token_nll``: from full logits [B, T, V] (``GPT2(...)``'s output); the reference,
  as Hugging Face computes GPT-2's loss. For tests and perplexity, where the logits
  exist anyway.
- ``hidden_token_nll``: from the final hidden states [B, T, C] and ``wte``, so the model
  never returns [B, T, V] logits; the head runs against ``wte`` zero-padded to a
  multiple of 128 rows (``padded_vocab_size``). It still forms [B, T - 1, Vp] logits
  inside: for small batches, and as the plain head the chunked one is tested against.
- ``mean_token_nll``: the training head. Its mean over the batch, the logits formed
  ``HEAD_CHUNK`` rows at a time with the gradient computed alongside (a ``custom_vjp``),
  so neither the batch's logits nor their gradient ever exist whole.
- ``weighted_token_nll_sum``: the training head of the SFT formats and packed rows: the
  chunked head with a weight per prediction (0 outside the completion, and on padding).
- ``scored_logprobs``: the lm-eval harness's head. Log-probabilities of chosen targets at
  chosen positions of each row, and whether each target is the argmax (greedy), the
  logits formed ``SCORE_CHUNK`` positions at a time, against the real (unpadded) ``wte``.

Shared: ``_padded_head`` (the padded head matrix), ``_logits_logz`` (one chunk's fp32
logits and their logsumexp, the padding masked out) and ``_picked`` (the targets' logits).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

HEAD_CHUNK = 1024  # rows of the training head's logits held at once (mean_token_nll)
SCORE_CHUNK = 2048  # scored positions whose [rows, V] fp32 logits exist at once (scored_logprobs)


# ---------------------------------------------------------------- shared pieces


def padded_vocab_size(vocab_size: int, multiple: int = 128) -> int:
    """The vocabulary rounded up to ``multiple``: the padded head's rows (nanoGPT's 50304)."""
    return -(-vocab_size // multiple) * multiple


def _padded_head(wte: jax.Array, dtype) -> jax.Array:
    """wte [V, C] zero-padded to [padded_vocab_size(V), C] in ``dtype``."""
    V = wte.shape[0]
    return jnp.pad(wte.astype(dtype), ((0, padded_vocab_size(V) - V), (0, 0)))


def _logits_logz(h: jax.Array, w: jax.Array, V: int | None = None) -> tuple[jax.Array, jax.Array]:
    """h [..., C] against the head w [Vw, C] -> (fp32 logits [..., Vw], their logsumexp
    [...]). ``V``: w is padded and only its first V rows are real; the others' logits are
    set to -inf. None: w is the real head, and no mask is formed."""
    logits = jnp.einsum("...c,vc->...v", h, w, preferred_element_type=jnp.float32)
    if V is not None:
        logits = jnp.where(jnp.arange(w.shape[0]) < V, logits, -jnp.inf)
    return logits, jax.nn.logsumexp(logits, axis=-1)


def _picked(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """logits [..., V], targets [...] int -> the targets' logits [...]."""
    return jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


# ---------------------------------------------------------------- the variants


def token_nll(logits: jax.Array, input_ids: jax.Array) -> jax.Array:
    """Shifted next-token negative log-likelihood, as Hugging Face's GPT-2 loss.

    logits: [B, T, V] float; input_ids: [B, T] int -> [B, T - 1] float32, where entry t
    is -log p(input_ids[:, t + 1] | input_ids[:, : t + 1]).
    """
    logits = logits[:, :-1].astype(jnp.float32)
    targets = input_ids[:, 1:]
    logz = jax.nn.logsumexp(logits, axis=-1)
    return logz - _picked(logits, targets)


def hidden_token_nll(hidden: jax.Array, wte: jax.Array, input_ids: jax.Array) -> jax.Array:
    """``token_nll`` from the final hidden states.

    hidden: [B, T, C] (``GPT2(..., return_hidden=True)``); wte: [V, C]; input_ids: [B, T]
    -> [B, T - 1] float32. The padded head gives the same numbers in matmul shapes that
    accelerators tile well; on this project's 2-core CPU it measured no faster than the
    plain head (experiments/archive/padded_head). The padding never leaves this module:
    parameters and user-facing logits keep the real vocabulary.
    """
    w = _padded_head(wte, hidden.dtype)
    logits, logz = _logits_logz(hidden[:, :-1], w, wte.shape[0])  # (B, T-1, Vp), (B, T-1)
    return logz - _picked(logits, input_ids[:, 1:])


def mean_token_nll(
    hidden: jax.Array, wte: jax.Array, input_ids: jax.Array, chunk: int = HEAD_CHUNK
) -> jax.Array:
    """``hidden_token_nll(...).mean()`` for training, never holding the batch's logits.

    hidden: [B, T, C]; wte: [V, C]; input_ids: [B, T] int -> float32 scalar.
    Up to ``chunk`` predictions (B * (T - 1)) it is exactly that. Beyond, the tied head
    runs over chunks of ``chunk`` rows (the B * (T - 1) predictions) in a
    ``lax.scan``; each chunk's logits, loss and gradient (softmax - one-hot) are formed
    and used at once, so the forward pass already yields d(loss)/d(hidden) and
    d(loss)/d(wte), and the backward pass only scales them (a ``custom_vjp``). Memory:
    [chunk, V] fp32 logits instead of [B, T - 1, V]. The wte gradient is accumulated as
    [C, V] (hidden^T @ dlogits), which XLA:CPU reads in place; autodiff's
    dlogits^T @ hidden made it transpose the whole logits gradient first (1 s of a
    2.9 s step for the quickstart model; experiments/archive/speed). Same numbers as
    ``hidden_token_nll`` (a test holds loss and gradients to it).
    """
    B, T, C = hidden.shape
    if B * (T - 1) <= chunk:
        # One chunk: autodiff's plain head measured 4-11% faster here (experiments/archive/speed).
        return hidden_token_nll(hidden, wte, input_ids).mean()
    h = hidden[:, :-1].reshape(-1, C)  # [N, C]
    targets = input_ids[:, 1:].reshape(-1).astype(jnp.int32)  # [N]
    return _chunked_nll(h, wte, targets, chunk)


def weighted_token_nll_sum(
    hidden: jax.Array,
    wte: jax.Array,
    input_ids: jax.Array,
    weights: jax.Array,
    chunk: int = HEAD_CHUNK,
) -> jax.Array:
    """``sum(hidden_token_nll(...) * weights)`` for training, never holding the logits.

    weights: [B, T - 1] float32, each prediction's share of the loss: for the SFT formats
    ``loss_mask[:, 1:] / (target tokens in the global batch)``, so the sums of a step's
    microbatches add up to the mean over its targets (Hugging Face's
    ``num_items_in_batch``). A row of zero weights contributes 0, never a NaN. The same
    chunked head as ``mean_token_nll`` beyond ``chunk`` predictions.
    """
    B, T, C = hidden.shape
    if B * (T - 1) <= chunk:
        return jnp.sum(hidden_token_nll(hidden, wte, input_ids) * weights)
    h = hidden[:, :-1].reshape(-1, C)
    targets = input_ids[:, 1:].reshape(-1).astype(jnp.int32)
    return _chunked_wnll(h, wte, targets, weights.reshape(-1).astype(jnp.float32), chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked_nll(h: jax.Array, wte: jax.Array, targets: jax.Array, chunk: int) -> jax.Array:
    """h [N, C], wte [V, C], targets [N] int32 -> the mean NLL (float32 scalar)."""
    return _chunked_nll_fwd(h, wte, targets, chunk)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_wnll(h, wte, targets, weights, chunk: int) -> jax.Array:
    """h [N, C], wte [V, C], targets [N] int32, weights [N] f32 -> sum(nll * weights)."""
    return _chunked_wnll_fwd(h, wte, targets, weights, chunk)[0]


def _chunked_nll_fwd(h, wte, targets, chunk):
    """The loss, and as residuals the finished gradients dh [N, C] and dwte [V, C]."""
    return _chunked_head(h, wte, targets, None, chunk)


def _chunked_wnll_fwd(h, wte, targets, weights, chunk):
    loss, (dh, dw, targets) = _chunked_head(h, wte, targets, weights, chunk)
    return loss, (dh, dw, targets, weights)


def _chunked_head(h, wte, targets, weights, chunk):
    """Both heads' forward pass: ``weights`` None is the mean (each real row 1 / N)."""
    N, C = h.shape
    V = wte.shape[0]
    w = _padded_head(wte, h.dtype)  # (Vp, C)
    Vp = w.shape[0]
    n_chunks = -(-N // chunk)
    pad = n_chunks * chunk - N
    hs = jnp.pad(h, ((0, pad), (0, 0))).reshape(n_chunks, chunk, C)
    ts = jnp.pad(targets, (0, pad)).reshape(n_chunks, chunk)
    if weights is None:
        rs = (jnp.arange(n_chunks * chunk) < N).reshape(n_chunks, chunk)
    else:  # padding rows weigh 0
        rs = jnp.pad(weights, (0, pad)).reshape(n_chunks, chunk)

    def one_chunk(dw_t, xs):
        hc, tc, rc = xs  # (chunk, C), (chunk,), (chunk,)
        logits, logz = _logits_logz(hc, w, V)  # (chunk, Vp), (chunk,)
        if weights is None:
            nll = jnp.where(rc, logz - _picked(logits, tc), 0.0)
            weight = (rc / N)[:, None]  # d(mean)/d(nll); 0 on padding rows
        else:
            nll = (logz - _picked(logits, tc)) * rc
            weight = rc[:, None]
        dlogits = jnp.exp(logits - logz[:, None]) * weight - jax.nn.one_hot(tc, Vp) * weight
        dlogits = dlogits.astype(h.dtype)
        dh = jnp.einsum("nv,vc->nc", dlogits, w, preferred_element_type=jnp.float32)
        dw_t = dw_t + jnp.einsum("nc,nv->cv", hc, dlogits, preferred_element_type=jnp.float32)
        return dw_t, (jnp.sum(nll), dh)

    dw_t, (nll, dh) = jax.lax.scan(one_chunk, jnp.zeros((C, Vp), jnp.float32), (hs, ts, rs))
    loss = jnp.sum(nll) / N if weights is None else jnp.sum(nll)
    dh = dh.reshape(n_chunks * chunk, C)[:N].astype(h.dtype)
    dw = dw_t.T[:V].astype(wte.dtype)
    return loss, (dh, dw, targets)


def _chunked_nll_bwd(chunk, res, g):
    """Scales the forward pass's gradients by the cotangent ``g``; none for the targets."""
    del chunk
    dh, dw, targets = res
    zero_targets = np.zeros(targets.shape, dtype=jax.dtypes.float0)
    return (g * dh).astype(dh.dtype), (g * dw).astype(dw.dtype), zero_targets


def _chunked_wnll_bwd(chunk, res, g):
    """As ``_chunked_nll_bwd``; the weights are data: a zero cotangent."""
    dh, dw, targets, weights = res
    grads = _chunked_nll_bwd(chunk, (dh, dw, targets), g)
    return (*grads, jnp.zeros_like(weights))


_chunked_nll.defvjp(_chunked_nll_fwd, _chunked_nll_bwd)
_chunked_wnll.defvjp(_chunked_wnll_fwd, _chunked_wnll_bwd)


def _score_chunk(B: int, C: int, head_rows: int) -> int:
    """Columns of ``C`` per head chunk: the largest divisor of C with B * c <= head_rows."""
    best = 1
    for c in range(1, C + 1):
        if C % c == 0 and B * c <= max(head_rows, B):
            best = c
    return best


def scored_logprobs(
    wte: jax.Array,
    hidden: jax.Array,
    pos: jax.Array,
    targets: jax.Array,
    head_rows: int = SCORE_CHUNK,
) -> tuple[jax.Array, jax.Array]:
    """Log-probabilities of ``targets`` at the scored positions, and whether each is the
    argmax.

    wte: [V, E]; hidden: [B, T, E]; pos: [B, C] int32, the positions whose predictions are
    scored; targets: [B, C] int32, the tokens they must give -> (logprob [B, C] float32,
    greedy [B, C] bool). At most ``head_rows`` positions' [V] fp32 logits exist at once:
    C is split into chunks of the largest divisor c of C with B * c <= head_rows, so no
    chunk is padded.
    """
    B, C = targets.shape
    h = jnp.take_along_axis(hidden, pos[..., None], axis=1)  # [B, C, E]
    c = _score_chunk(B, C, head_rows)
    w = wte.astype(hidden.dtype)

    def one(xs):
        hc, tc = xs  # [B, c, E], [B, c]
        logits, logz = _logits_logz(hc, w)  # [B, c, V], [B, c]
        return _picked(logits, tc) - logz, jnp.argmax(logits, axis=-1) == tc

    split = lambda x: jnp.moveaxis(x.reshape(B, C // c, c, *x.shape[2:]), 1, 0)  # noqa: E731
    logprob, greedy = jax.lax.map(one, (split(h), split(targets)))  # [C/c, B, c]
    return jnp.moveaxis(logprob, 0, 1).reshape(B, C), jnp.moveaxis(greedy, 0, 1).reshape(B, C)
