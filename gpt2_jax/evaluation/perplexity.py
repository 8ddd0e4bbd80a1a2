"""Loss and perplexity: over fixed blocks (run_clm.py's eval) and with a sliding window.

Both run one jitted forward per batch with a fixed [batch, length] shape: the last
partial batch is padded and masked, never dropped or compiled again. Per-batch results
stay on device and are fetched once at the end (a float64 sum on the host).
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from gpt2_jax.data.tokenizer import EOT_ID
from gpt2_jax.model.attention import document_segments
from gpt2_jax.model.config import GPT2Config
from gpt2_jax.model.gpt2 import GPT2
from gpt2_jax.model.losses import token_nll

# ------------------------------------------------------------------ jitted pieces


def _logits(model_cfg: GPT2Config, params: dict, input_ids: jax.Array, document_mask: bool):
    """[B, T, V] logits; ``document_mask``: attention and positions restart at every
    ``<|endoftext|>`` (as the run trained with ``data.document_mask``)."""
    positions = segments = None
    if document_mask:
        positions, segments = document_segments(input_ids, EOT_ID)
    return GPT2(model_cfg).apply(
        {"params": params}, input_ids, positions=positions, segment_ids=segments
    )


@functools.partial(jax.jit, static_argnames=("model_cfg", "document_mask"))
def _blocks_nll_sum(
    model_cfg: GPT2Config,
    params: dict,
    input_ids: jax.Array,
    weights: jax.Array,
    document_mask: bool = False,
) -> jax.Array:
    """input_ids: [B, T] int32, weights: [B] float32 (0 = padding) -> float32 scalar.

    The weighted sum of the B * (T - 1) shifted next-token NLLs.
    """
    logits = _logits(model_cfg, params, input_ids, document_mask)  # [B, T, V]
    nll = token_nll(logits, input_ids)  # [B, T - 1]
    return jnp.sum(nll.sum(axis=-1) * weights)


@functools.partial(jax.jit, static_argnames=("model_cfg", "document_mask"))
def _windows_nll(
    model_cfg: GPT2Config,
    params: dict,
    input_ids: jax.Array,
    target_mask: jax.Array,
    hf_weights: jax.Array,
    document_mask: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Sliding-window sums for one batch of padded windows.

    input_ids: [B, L] int32; target_mask: [B, L - 1] float32, 1 where the prediction of
    input_ids[:, t + 1] is scored; hf_weights: [B] float32, the weight of each window's
    mean NLL in Hugging Face's reference (0 for padding windows).
    Returns float32 scalars (sum of scored NLLs, sum of hf_weights * window mean NLL).
    """
    logits = _logits(model_cfg, params, input_ids, document_mask)  # [B, L, V]
    nll = token_nll(logits, input_ids) * target_mask  # [B, L - 1]
    window_sum = nll.sum(axis=-1)  # [B]
    window_mean = window_sum / jnp.maximum(target_mask.sum(axis=-1), 1.0)
    return window_sum.sum(), jnp.sum(window_mean * hf_weights)


@functools.partial(jax.jit, static_argnames="model_cfg")
def _examples_nll(model_cfg: GPT2Config, params: dict, batch: dict) -> tuple[jax.Array, jax.Array]:
    """One batch of SFT rows (``data.examples.Examples``' dict of [B, T] arrays) -> (sum of
    the targets' NLLs, their count), float32 scalars."""
    logits = GPT2(model_cfg).apply(
        {"params": params},
        batch["input_ids"],
        positions=batch.get("positions"),
        segment_ids=batch.get("segment_ids"),
    )
    mask = batch["loss_mask"][:, 1:]
    nll = jnp.where(mask, token_nll(logits, batch["input_ids"]), 0.0)
    return jnp.sum(nll), jnp.sum(mask, dtype=jnp.float32)


# ------------------------------------------------------------------ shared plumbing


def _batch_devices(batch_sharding: NamedSharding) -> int:
    """How many ways ``batch_sharding`` splits the batch (leading) axis."""
    spec = batch_sharding.spec
    axes = spec[0] if len(spec) else None
    axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
    return math.prod(batch_sharding.mesh.shape[a] for a in axes)


def local_rows(batch_size: int, batch_sharding: NamedSharding | None) -> tuple[int, int]:
    """[lo, hi): the rows of a global batch of ``batch_size`` that this process holds.

    Every process reads and scores only these rows (its devices' shards of the batch axis,
    contiguous because the mesh lists each process's devices together); with one process
    it is the whole batch.
    """
    if batch_sharding is None or jax.process_count() == 1:
        return 0, batch_size
    vector = NamedSharding(batch_sharding.mesh, PartitionSpec(*batch_sharding.spec[:1]))
    slices = vector.addressable_devices_indices_map((batch_size,)).values()
    starts = sorted({sl[0].start or 0 for sl in slices})
    stops = sorted({batch_size if sl[0].stop is None else sl[0].stop for sl in slices})
    lo, hi = starts[0], stops[-1]
    if sum(b - a for a, b in zip(starts, stops, strict=True)) != hi - lo:
        raise ValueError("this process's rows of the eval batch are not contiguous")
    return lo, hi


def _placer(batch_size: int, batch_sharding: NamedSharding | None) -> Callable:
    """Returns put(local rows) -> global device array, sharded on the batch axis when asked.

    ``put`` takes this process's rows (``local_rows``) of a global [batch_size, ...] batch.
    """
    if batch_sharding is None:
        return jnp.asarray
    n = _batch_devices(batch_sharding)
    if batch_size % n:
        raise ValueError(
            f"eval batch_size={batch_size} is not divisible by the {n} devices "
            "that shard the batch axis"
        )
    vector = NamedSharding(batch_sharding.mesh, PartitionSpec(*batch_sharding.spec[:1]))

    def put(x: np.ndarray) -> jax.Array:
        sh = batch_sharding if x.ndim > 1 else vector
        return jax.make_array_from_process_local_data(sh, x, (batch_size, *x.shape[1:]))

    return put


def _place_params(params: dict, batch_sharding: NamedSharding | None) -> dict:
    """Host (numpy) leaves go to device once, not once per batch; jax.Arrays stay put."""
    target = None if batch_sharding is None else NamedSharding(batch_sharding.mesh, PartitionSpec())
    return jax.tree.map(
        lambda x: x if isinstance(x, jax.Array) else jax.device_put(x, target), params
    )


def _run(step: Callable, batches: Iterator, n_batches: int, progress: bool, desc: str) -> list:
    """Calls ``step(*batch)`` for every batch; returns the per-batch device results.

    Waits on the result two batches back: the device always has work queued, the bar
    shows finished batches, and at most two batches of inputs are in flight.
    """
    results = []
    with tqdm(
        total=n_batches, desc=desc, disable=not progress, file=sys.stderr, unit="batch"
    ) as bar:
        for batch in batches:
            results.append(step(*batch))
            if len(results) > 2:
                jax.block_until_ready(results[-3])
                bar.update(1)
        bar.update(n_batches - bar.n)
    return jax.device_get(results)


def _result(nll_sum: float, tokens: int) -> dict:
    loss = nll_sum / tokens
    perplexity = math.exp(loss) if loss < 700 else math.inf  # a diverged model, not a crash
    return {"loss": loss, "perplexity": perplexity, "tokens": tokens}


# ------------------------------------------------------------------ fixed blocks


def eval_blocks(
    model_cfg: GPT2Config,
    params: dict,
    blocks,
    batch_size: int,
    *,
    batch_sharding: NamedSharding | None = None,
    progress: bool = True,
    document_mask: bool = False,
) -> dict:
    """Mean next-token NLL over fixed blocks, as run_clm.py's ``eval_loss``.

    blocks: indexable as ``blocks[np.array(idx)] -> int [n, T]`` with ``len()`` (e.g. a
    numpy array [N, T]). Each block scores its T - 1 shifted predictions; the loss is
    their token-weighted mean over all N blocks (padding of the last batch excluded).
    Returns ``{"loss", "perplexity": exp(loss), "tokens": N * (T - 1)}`` (tokens = scored
    predictions). ``batch_sharding``: a NamedSharding for [batch_size, T] int arrays; with
    several processes every process passes the same ``blocks`` but reads and scores only
    its rows of each batch (the last batch padded, so all run the same number of steps).
    """
    n = len(blocks)
    if n == 0:
        raise ValueError("eval_blocks got no blocks (too little evaluation data?)")
    T = int(np.asarray(blocks[np.arange(1)]).shape[1])
    if not 2 <= T <= model_cfg.n_positions:
        raise ValueError(
            f"block length {T} must be in [2, model.n_positions={model_cfg.n_positions}]"
        )
    put = _placer(batch_size, batch_sharding)
    params = _place_params(params, batch_sharding)
    n_batches = -(-n // batch_size)

    lo, hi = local_rows(batch_size, batch_sharding)

    def batches():
        for start in range(0, n, batch_size):
            idx = np.arange(start + lo, start + hi)  # this process's rows only
            weights = (idx < n).astype(np.float32)
            idx = np.where(idx < n, idx, 0)  # padding rows repeat block 0, weight 0
            ids = np.asarray(blocks[idx], dtype=np.int32)
            yield put(ids), put(weights)

    step = functools.partial(_blocks_nll_sum, model_cfg, params, document_mask=document_mask)
    sums = _run(step, batches(), n_batches, progress, "eval")
    return _result(math.fsum(float(s) for s in sums), n * (T - 1))


def eval_examples(
    model_cfg: GPT2Config,
    params: dict,
    examples,
    batch_size: int,
    *,
    batch_sharding: NamedSharding | None = None,
    progress: bool = True,
) -> dict:
    """Mean NLL over the target tokens of SFT rows (``data.examples.Examples``, or its
    first rows): the training loss's definition, over the split. Rows are padded to whole
    batches with rows of no target. Returns ``{"loss", "perplexity", "tokens"}`` (tokens:
    the targets scored)."""
    n = len(examples)
    put = _placer(batch_size, batch_sharding)
    params = _place_params(params, batch_sharding)
    lo, hi = local_rows(batch_size, batch_sharding)

    def batches():
        for start in range(0, n, batch_size):
            idx = np.arange(start + lo, start + hi)
            rows = examples[np.where(idx < n, idx, 0)]
            rows["loss_mask"] &= (idx < n)[:, None]  # padding rows score nothing
            yield ({k: put(v) for k, v in rows.items()},)

    step = functools.partial(_examples_nll, model_cfg, params)
    out = _run(step, batches(), -(-n // batch_size), progress, "eval")
    total, count = math.fsum(float(s) for s, _ in out), int(sum(float(c) for _, c in out))
    return _result(total, max(count, 1)) | {"tokens": count}


# ------------------------------------------------------------------ sliding window


def window_plan(seq_len: int, max_length: int, stride: int) -> np.ndarray:
    """Hugging Face's sliding windows over a sequence of ``seq_len`` tokens.

    Returns int64 [W, 3] rows ``(begin, end, trg_len)``: window tokens[begin:end], of
    which the last ``trg_len`` are labels (the ones the previous window did not reach).
    """
    if seq_len < 2:
        raise ValueError(f"sliding-window eval needs at least 2 tokens, got {seq_len}")
    if not 1 <= stride <= max_length:
        raise ValueError(
            f"stride={stride} must be in [1, max_length={max_length}] "
            "(a larger stride would skip tokens)"
        )
    rows, prev_end = [], 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        rows.append((begin, end, end - prev_end))
        prev_end = end
        if end == seq_len:
            break
    return np.asarray(rows, dtype=np.int64)


def _window_batch(
    tokens: np.ndarray, plan: np.ndarray, max_length: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Padded windows for ``plan`` rows [B, 3] -> (ids [B, L] int32, target_mask
    [B, L - 1] float32, hf_weights [B] float32); rows with end == begin are padding."""
    B = len(plan)
    ids = np.zeros((B, max_length), np.int32)
    mask = np.zeros((B, max_length - 1), np.float32)
    weights = np.zeros((B,), np.float32)
    pos = np.arange(1, max_length)  # window position of each prediction's target
    for b, (begin, end, trg_len) in enumerate(plan):
        length = end - begin
        if length == 0:
            continue
        ids[b, :length] = tokens[begin:end]
        # HF masks labels[:, :-trg_len]; the shift drops position 0, padding is beyond end.
        first = max(length - trg_len, 1)
        mask[b] = (pos >= first) & (pos < length)
        # HF's reference weighs each window's mean by (non-masked labels - 1).
        weights[b] = min(trg_len, length) - 1
    return ids, mask, weights


def eval_sliding_window(
    model_cfg: GPT2Config,
    params: dict,
    tokens_1d,
    max_length: int,
    stride: int,
    batch_size: int,
    *,
    batch_sharding: NamedSharding | None = None,
    progress: bool = True,
    document_mask: bool = False,
) -> dict:
    """Hugging Face's "perplexity of fixed-length models" over one token stream.

    tokens_1d: int [N]. Windows of up to ``max_length`` (<= n_positions) tokens start
    every ``stride`` (<= max_length) tokens; a window's labels are the tokens the previous
    window did not reach. With stride < max_length every token but the first is scored
    exactly once, with at least ``max_length - stride`` tokens of context (less at the
    start); with stride == max_length (disjoint chunks) each window's first token is not
    scored.

    What is counted: ``loss`` reproduces the reference loop of
    huggingface.co/docs/transformers/perplexity (to float rounding). That loop's model
    scores the first window's ``trg_len - 1`` labels (the shift drops position 0) and each
    later window's ``trg_len`` labels, yet weighs every window's mean NLL by ``trg_len - 1``
    (its ``num_valid_tokens - batch_size``). So ``loss = sum_w mean_w * (trg_len_w - 1) /
    sum_w (trg_len_w - 1)`` and ``tokens = sum_w (trg_len_w - 1)``. ``exact_loss`` is the
    plain mean over the ``scored_tokens`` actually scored; the two differ by O(1/stride)
    and agree when stride == max_length. Returns ``{"loss", "perplexity", "tokens",
    "exact_loss", "scored_tokens", "windows"}``.
    """
    tokens = np.asarray(tokens_1d).reshape(-1)
    if not 2 <= max_length <= model_cfg.n_positions:
        raise ValueError(
            f"max_length={max_length} must be in [2, model.n_positions={model_cfg.n_positions}]"
        )
    plan = window_plan(len(tokens), max_length, stride)
    put = _placer(batch_size, batch_sharding)
    params = _place_params(params, batch_sharding)
    n_batches = -(-len(plan) // batch_size)
    lo, hi = local_rows(batch_size, batch_sharding)

    def batches():
        for start in range(0, len(plan), batch_size):
            rows = plan[start + lo : start + hi]  # this process's windows only
            pad = np.zeros((hi - lo - len(rows), 3), np.int64)  # empty windows
            yield tuple(
                put(x) for x in _window_batch(tokens, np.concatenate([rows, pad]), max_length)
            )

    step = functools.partial(_windows_nll, model_cfg, params, document_mask=document_mask)
    out = _run(step, batches(), n_batches, progress, "eval (sliding window)")
    exact_sum = math.fsum(float(s) for s, _ in out)
    hf_sum = math.fsum(float(w) for _, w in out)
    length, trg_len = plan[:, 1] - plan[:, 0], plan[:, 2]
    hf_tokens = int(np.sum(np.minimum(trg_len, length) - 1))
    scored = int(np.sum(np.minimum(trg_len, length - 1)))  # = target_mask.sum()
    result = _result(hf_sum, hf_tokens)
    result.update(exact_loss=exact_sum / scored, scored_tokens=scored, windows=len(plan))
    return result


# ------------------------------------------------------------------ splits of a run


class _Head:
    """The first ``n`` examples of an indexable dataset."""

    def __init__(self, blocks, n: int):
        self.blocks, self.n = blocks, min(n, len(blocks))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx):
        return self.blocks[idx]


def evaluate_splits(plan, params, splits: dict, mesh, progress: bool) -> list[dict]:
    """Loss / perplexity of ``plan.model`` on each split: run_clm blocks, or sliding windows
    if ``eval.stride``. ``plan``: the run's plan (its eval, data sections and eval batch)."""
    from gpt2_jax import data as data_lib
    from gpt2_jax.parallel import sharding

    model_cfg, e, d, batch_size = plan.model, plan.eval, plan.data, plan.eval_batch
    out = []
    for name, blocks in splits.items():
        if e.stride:
            tokens, _ = data_lib.load_token_stream(d, name)
            if e.max_batches:
                # W windows start every stride tokens and the last one ends at the cut, so
                # the first max_batches batches of windows need (W - 1) * stride + block_size.
                windows = e.max_batches * batch_size
                tokens = tokens[: (windows - 1) * e.stride + d.block_size]
            res = eval_sliding_window(
                model_cfg,
                params,
                np.asarray(tokens),
                max_length=d.block_size,
                stride=e.stride,
                batch_size=batch_size,
                batch_sharding=sharding.batch_sharding(mesh),
                progress=progress,
                document_mask=d.document_mask,
            )
        else:
            if e.max_batches:
                blocks = _Head(blocks, e.max_batches * batch_size)
            kwargs = dict(batch_sharding=sharding.batch_sharding(mesh), progress=progress)
            if d.examples:
                res = eval_examples(model_cfg, params, blocks, batch_size, **kwargs)
            else:
                kwargs["document_mask"] = d.document_mask
                res = eval_blocks(model_cfg, params, blocks, batch_size, **kwargs)
        out.append(
            {
                "split": name,
                **{
                    k: int(v) if isinstance(v, (int, np.integer)) else float(v)
                    for k, v in res.items()
                },
            }
        )
    return out


def run_command(cfg, workdir, step=None, progress: bool = True) -> list[dict]:
    """``gpt2-jax eval``: the plan (weights of ``workdir``'s checkpoint, or the config's
    ``init_from``), the eval splits, and their loss / perplexity records."""
    from gpt2_jax import data as data_lib
    from gpt2_jax.config import base as config_lib
    from gpt2_jax.config import plan as plan_lib
    from gpt2_jax.parallel import sharding
    from gpt2_jax.weights import resolve as weights

    # flags, or a detected cluster
    sharding.maybe_initialize_distributed(config_lib.sections(cfg).distributed)
    plan = plan_lib.weights_only(cfg, workdir, step, jax.device_count(), validate=True)
    params = weights.params_of(plan.source)
    print(f"loaded {plan.source.describe()}", file=sys.stderr)
    splits = data_lib.load_splits(plan.data, tuple(plan.eval.splits))
    mesh = sharding.mesh_of(plan.mesh_shape)
    return evaluate_splits(plan, params, splits, mesh, progress=progress)
