"""Text sampling with a KV cache: greedy, temperature, top-k, top-p; batched.

How a batch is decoded (the plan of flax's lm1b ``temperature_sampler`` and gemma's
sampler loop):

1. Prompts are left-padded to a prompt bucket ``Pb`` so that they all end at cache slot
   ``Pb - 1``. Each row's learned positions count from its first real token (Hugging
   Face FlaxGPT2's ``attention_mask.cumsum(-1) - 1``) and attention never sees a padding
   slot, so every row equals that prompt decoded alone.
2. One prefill call runs the padded prompts, writes cache slots ``[0, Pb)`` and samples
   the first new token.
3. One jitted ``lax.while_loop`` decodes the rest, one token per step for every row,
   until ``max_new_tokens`` or every row has produced the stop token. Its step count is
   an argument, so the CLI runs the same executable in chunks to stream text.

The cache holds ``S`` slots, the power of two >= ``Pb + max_new_tokens`` (at most
``n_positions``); ``Pb`` is the power of two >= the longest prompt (both from
``buckets.decode_buckets``). Executables are keyed by (batch, ``Pb``, ``S``, sampling
settings), so a new prompt length or ``max_new_tokens`` in the same buckets compiles
nothing; the last ``DECODE_EXECUTABLES_KEPT`` used are kept (``core.cache.LRU``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gpt2_jax.core.cache import LRU
from gpt2_jax.evaluation import buckets as bucket_lib
from gpt2_jax.model import config as gpt2_config
from gpt2_jax.model import decode as decode_lib
from gpt2_jax.model import gpt2 as model_lib

DECODE_EXECUTABLES_KEPT = 32  # compiled prefill/decode programs kept (least recently used go)


# ---------------------------------------------------------------------------- sampling


class Sampling(NamedTuple):
    """Static sampling settings (each combination is its own executable)."""

    temperature: float  # 0 = greedy
    top_k: int  # 0 = off
    top_p: float  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off


def penalize_repeats(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """logits: [B, V]; seen: [B, V] bool, the tokens already in each row (prompt and new
    tokens) -> logits with those made less likely: divided by ``penalty`` where positive,
    multiplied where negative (CTRL, Keskar et al. 2019; what ``transformers``'
    ``repetition_penalty`` does, applied before temperature and top-k/top-p)."""
    penalized = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalized, logits)


def _seen(tokens: jax.Array, key_start: jax.Array, last: jax.Array, vocab: int) -> jax.Array:
    """tokens: [B, S]; the slots key_start[b] .. last hold row b's real tokens -> [B, V]
    bool: which ids occur there (left padding and unwritten slots do not count)."""
    slot = jnp.arange(tokens.shape[1])
    real = (slot[None, :] >= key_start[:, None]) & (slot[None, :] <= last)
    count = jax.vmap(lambda ids, ok: jnp.zeros(vocab, jnp.int32).at[ids].add(ok))(
        tokens, real.astype(jnp.int32)
    )
    return count > 0


def filter_logits(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """logits: [B, V] float32 -> scaled logits with filtered entries at -inf.

    ``top_k <= 0`` and ``top_p >= 1`` disable those filters; temperature must be > 0.
    Top-k keeps the k largest (ties at the cut kept); top-p keeps the smallest set of most
    likely tokens whose probability mass reaches ``top_p`` (after temperature and top-k),
    ties at the cut kept.
    """
    logits = logits / temperature
    V = logits.shape[-1]
    if 0 < top_k < V:
        cut = _largest_cut(logits, lambda keep: jnp.sum(keep, axis=-1) >= top_k)
        logits = jnp.where(logits < cut, -jnp.inf, logits)
    if top_p < 1.0:
        probs = jax.nn.softmax(logits, axis=-1)
        cut = _largest_cut(logits, lambda keep: jnp.sum(jnp.where(keep, probs, 0), -1) >= top_p)
        logits = jnp.where(logits < cut, -jnp.inf, logits)
    return logits


def _largest_cut(logits: jax.Array, enough) -> jax.Array:
    """The largest value c among each row's logits such that ``enough(logits >= c)``
    holds (``enough``: [B, V] bool -> [B] bool, monotone: true for a low enough c).

    logits: [B, V] float32 -> [B, 1]. A bisection over the 2^32 float32 bit patterns (32
    passes over the row) instead of a sort: inside the decode loop XLA's CPU top_k and
    sort of a 50257-wide row cost ~35 ms per step here, the bisection well under 1 ms.
    """
    bits = jax.lax.bitcast_convert_type(logits, jnp.uint32)
    # Monotone map float32 -> uint32: flip all bits of negatives, the sign bit of the rest.
    key = jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))  # [B, V]

    def step(_, lo_hi):
        lo, hi = lo_hi  # [B, 1]: the answer lies in [lo, hi]
        mid = lo + (hi - lo) // 2 + (hi > lo)  # upper middle; no uint32 overflow
        ok = enough(key >= mid)[:, None]
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    B = logits.shape[0]
    lo = jnp.zeros((B, 1), jnp.uint32)
    hi = jnp.full((B, 1), 0xFFFFFFFF, jnp.uint32)
    lo, _ = jax.lax.fori_loop(0, 32, step, (lo, hi))
    bits = jnp.where(lo >> 31 == 1, lo & jnp.uint32(0x7FFFFFFF), ~lo)  # back to float bits
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _sample(
    logits: jax.Array,
    row_keys: jax.Array,
    index: jax.Array,
    s: Sampling,
    tokens: jax.Array | None = None,
    key_start: jax.Array | None = None,
    last: jax.Array | None = None,
) -> jax.Array:
    """logits: [B, V]; row_keys: [B, 2] uint32; index: int scalar (new-token number);
    tokens [B, S], key_start [B], last: the text so far, as ``_seen`` reads it (only with a
    repetition penalty) -> [B] int32. Row b draws with ``fold_in(row_keys[b], index)``: a
    row's samples do not depend on its batch-mates, the prompt bucket or the chunking."""
    if s.repetition_penalty != 1.0:
        seen = _seen(tokens, key_start, last, logits.shape[-1])
        logits = penalize_repeats(logits, seen, s.repetition_penalty)
    if s.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits, s.temperature, s.top_k, s.top_p)
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, index)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


# ---------------------------------------------------------------------------- the loop


class DecodeState(NamedTuple):
    """Decoding state, carried from call to call (donated: updated in place)."""

    cache: list  # decode_lib.init_cache: per layer k [B*nh, hs, S], v [B*nh, S, hs]
    tokens: jax.Array  # [B, S] int32: padded prompt, then the new tokens
    t: jax.Array  # int32 scalar: slot of the last token written
    done: jax.Array  # [B] bool: the row has produced the stop token
    key_start: jax.Array  # [B] int32: first real (not padding) slot of each row
    row_keys: jax.Array  # [B, 2] uint32
    first_new: jax.Array  # int32 scalar: slot of the first new token (= Pb)
    stop: jax.Array  # int32 scalar: stop token, -1 = none


def _prefill(
    params, prompt, key_start, seed, stop, *, model_cfg, sampling, cache_len
) -> DecodeState:
    """prompt: [B, Pb] int32 left-padded; key_start: [B] int32 -> DecodeState with the first
    new token written at slot Pb."""
    B, Pb = prompt.shape
    positions = jnp.maximum(jnp.arange(Pb)[None, :] - key_start[:, None], 0)  # [B, Pb]
    cache = decode_lib.init_cache(model_cfg, B, cache_len)
    logits, cache = decode_lib.cached_forward(
        model_cfg, params, prompt, positions, cache, 0, key_start
    )
    row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
        jax.random.PRNGKey(seed), jnp.arange(B)
    )
    first = _sample(logits[:, -1], row_keys, 0, sampling, prompt, key_start, jnp.int32(Pb - 1))
    tokens = jnp.zeros((B, cache_len), jnp.int32)
    tokens = tokens.at[:, :Pb].set(prompt).at[:, Pb].set(first)
    Pb32 = jnp.int32(Pb)
    return DecodeState(cache, tokens, Pb32, first == stop, key_start, row_keys, Pb32, stop)


def _decode(params, state: DecodeState, n_steps, *, model_cfg, sampling) -> DecodeState:
    """Up to ``n_steps`` more tokens per row (fewer at the cache's end or when every
    row is done), in one ``lax.while_loop``."""
    S = state.tokens.shape[1]

    def cond(carry):
        i, st = carry
        return (i < n_steps) & (st.t + 1 < S) & ~jnp.all(st.done)

    def body(carry):
        i, st = carry
        tok = jax.lax.dynamic_slice_in_dim(st.tokens, st.t, 1, axis=1)  # [B, 1]
        pos = (st.t - st.key_start)[:, None]  # [B, 1] per-row learned position
        logits, cache = decode_lib.cached_forward(
            model_cfg, params, tok, pos, st.cache, st.t, st.key_start
        )
        index = st.t + 1 - st.first_new
        nxt = _sample(logits[:, 0], st.row_keys, index, sampling, st.tokens, st.key_start, st.t)
        nxt = jnp.where(st.done, st.stop, nxt)  # finished rows repeat the stop token
        tokens = jax.lax.dynamic_update_slice(st.tokens, nxt[:, None], (0, st.t + 1))
        done = st.done | (nxt == st.stop)
        return i + 1, st._replace(cache=cache, tokens=tokens, t=st.t + 1, done=done)

    return jax.lax.while_loop(cond, body, (jnp.int32(0), state))[1]


# ---------------------------------------------------------------------------- executables

# (name, model_cfg, sampling, treedef, shapes and placements) -> compiled executable. Our
# own cache rather than jax.jit's so that compile time is measured apart from decode time,
# and bounded so that a long-lived process (a server, a notebook) does not keep every
# executable it ever made. The placement is in the key: an executable compiled for params
# on one device (or one mesh) refuses arrays placed elsewhere.
_EXECUTABLES: LRU = LRU(DECODE_EXECUTABLES_KEPT)


def _shapes(tree) -> tuple:
    return tuple(
        (x.shape, str(x.dtype), x.sharding if isinstance(x, jax.Array) else None)
        for x in jax.tree.leaves(tree)
    )


def _executable(name: str, fn, args: tuple, static: dict, donate: tuple = (), stats=None):
    key = (name, tuple(sorted(static.items())), jax.tree.structure(args), _shapes(args))

    def compile_it():
        t0 = time.perf_counter()
        jitted = jax.jit(lambda *a: fn(*a, **static), donate_argnums=donate)
        exe = jitted.lower(*args).compile()
        if stats is not None:
            stats.compile_seconds += time.perf_counter() - t0
        return exe

    return _EXECUTABLES.get(key, compile_it)[0]


@dataclasses.dataclass
class Stats:
    """What a generation cost: filled by ``stream_batch``."""

    prompt_tokens: int = 0  # real (unpadded) prompt tokens, all rows
    new_tokens: int = 0  # tokens produced, all rows (up to and including a stop token)
    compile_seconds: float = 0.0
    run_seconds: float = 0.0  # prefill + decode, compile excluded

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.run_seconds if self.run_seconds > 0 else 0.0


# ---------------------------------------------------------------------------- API


def check_sampling(
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float = 1.0,
) -> None:
    """Raises ValueError for a bad decoding argument; the message starts ``name=value:``
    (the CLI prefixes ``--``, so both name the argument as the user wrote it)."""
    for ok, problem in (
        (max_new_tokens >= 1, f"max_new_tokens={max_new_tokens}: must be >= 1"),
        (temperature >= 0, f"temperature={temperature}: must be >= 0 (0 = greedy)"),
        (top_k >= 0, f"top_k={top_k}: must be >= 0 (0 = off)"),
        (0 < top_p <= 1, f"top_p={top_p}: must be in (0, 1] (1 = off)"),
        (
            repetition_penalty > 0,
            f"repetition_penalty={repetition_penalty}: must be > 0 (1 = off, > 1 discourages "
            "repeats)",
        ),
    ):
        if not ok:
            raise ValueError(problem)


def check_request(
    model_cfg: gpt2_config.GPT2Config,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float = 1.0,
    names: list[str] | None = None,
) -> None:
    """Raises ValueError naming the argument for a request that cannot be decoded;
    ``names``: how to call each prompt (the CLI passes its flags), default ``prompt i``."""
    if not prompts:
        raise ValueError("no prompts given")
    check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    for i, ids in enumerate(prompts):
        name = names[i] if names else f"prompt {i}"
        if len(ids) == 0:
            raise ValueError(f"{name} is empty: give at least one token")
        if len(ids) + max_new_tokens > model_cfg.n_positions:
            raise ValueError(
                f"{name} has {len(ids)} tokens: with max_new_tokens={max_new_tokens} "
                f"that is {len(ids) + max_new_tokens} > n_positions={model_cfg.n_positions}; "
                f"shorten the prompt or lower max_new_tokens"
            )
        bad = [t for t in ids if not 0 <= t < model_cfg.vocab_size]
        if bad:
            raise ValueError(f"{name} has token ids outside [0, {model_cfg.vocab_size}): {bad[:5]}")


def decode_params(model_cfg: gpt2_config.GPT2Config, params) -> dict:
    """Params on device in the unrolled layout (``h_<i>``), which the decode loop reads
    without slicing a stacked array every layer and step. Do it once, reuse the result."""
    if "h" in params:
        # On the host: numpy slices are views, and no eager jax op compiles.
        params = model_lib.unstack_layers(jax.tree.map(np.asarray, params))
    return jax.device_put(params)


def stream_batch(
    model_cfg: gpt2_config.GPT2Config,
    params,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_token: int | None = None,
    chunk_size: int | None = None,
    stats: Stats | None = None,
    repetition_penalty: float = 1.0,
) -> Iterator[np.ndarray]:
    """Decodes every prompt at once; yields [B, n] int32 arrays: the next n new tokens
    of every row, n <= ``chunk_size`` (None: all at once). A row that has produced
    ``stop_token`` repeats it; the stream ends early when every row has.

    ``params``: either layout; ``decode_params(model_cfg, params)`` output is used as is.
    ``repetition_penalty`` > 1 makes every token already in a row (prompt included) less
    likely, as ``transformers``' argument of that name does; 1 is off.
    """
    check_request(model_cfg, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    stats = stats if stats is not None else Stats()
    if "h" in params or not isinstance(jax.tree.leaves(params)[0], jax.Array):
        params = decode_params(model_cfg, params)
    sampling = Sampling(float(temperature), int(top_k), float(top_p), float(repetition_penalty))
    B = len(prompts)
    Pb, S = bucket_lib.decode_buckets(
        model_cfg.n_positions, max(len(p) for p in prompts), max_new_tokens
    )
    prompt = np.zeros((B, Pb), np.int32)
    for b, ids in enumerate(prompts):
        prompt[b, Pb - len(ids) :] = ids
    key_start = np.asarray([Pb - len(ids) for ids in prompts], np.int32)
    stop = np.int32(-1 if stop_token is None else stop_token)
    stats.prompt_tokens += sum(len(p) for p in prompts)

    args = (params, prompt, key_start, np.int32(seed), stop)
    static = dict(model_cfg=model_cfg, sampling=sampling, cache_len=S)
    state = _timed(_executable("prefill", _prefill, args, static, stats=stats), args, stats)
    last = Pb - 1  # slot of the last token yielded
    finished = np.zeros(B, bool)
    while True:
        tokens, t, done = _fetch(state)
        chunk = tokens[:, last + 1 : t + 1]  # [B, n]
        stats.new_tokens += _count_new(chunk, finished, stop_token)
        yield chunk
        last = t
        remaining = max_new_tokens - (t - Pb + 1)
        if remaining <= 0 or done.all():
            return
        n = remaining if chunk_size is None else min(chunk_size, remaining)
        args = (params, state, np.int32(n))
        static = dict(model_cfg=model_cfg, sampling=sampling)
        exe = _executable("decode", _decode, args, static, donate=(1,), stats=stats)
        state = _timed(exe, args, stats)


def _timed(exe, args: tuple, stats: Stats) -> DecodeState:
    t0 = time.perf_counter()
    out = jax.block_until_ready(exe(*args))
    stats.run_seconds += time.perf_counter() - t0
    return out


def _count_new(chunk: np.ndarray, finished: np.ndarray, stop_token: int | None) -> int:
    """Tokens in ``chunk`` [B, n] up to and including each row's stop token; updates
    ``finished`` [B] in place."""
    total = 0
    for b, row in enumerate(chunk):
        if finished[b]:
            continue
        hits = np.flatnonzero(row == stop_token) if stop_token is not None else []
        if len(hits):
            total += int(hits[0]) + 1
            finished[b] = True
        else:
            total += len(row)
    return total


def generate_batch(
    model_cfg: gpt2_config.GPT2Config,
    params,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_token: int | None = None,
    repetition_penalty: float = 1.0,
) -> list[list[int]]:
    """New ids for each prompt (prompts may differ in length), each row as if decoded
    alone; a row ends after ``stop_token`` (included). ``temperature=0`` is greedy.
    Raises ValueError for an empty prompt or one with no room for ``max_new_tokens``
    below ``model_cfg.n_positions``."""
    stream = stream_batch(
        model_cfg,
        params,
        prompts,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop_token=stop_token,
        repetition_penalty=repetition_penalty,
    )
    chunks = list(stream)
    return [_until_stop(row, stop_token) for row in np.concatenate(chunks, axis=1)]


def _until_stop(row: np.ndarray, stop_token: int | None) -> list[int]:
    ids = [int(x) for x in row]
    if stop_token is not None and stop_token in ids:
        return ids[: ids.index(stop_token) + 1]
    return ids


def generate(
    model_cfg: gpt2_config.GPT2Config,
    params,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_token: int | None = None,
    repetition_penalty: float = 1.0,
) -> list[int]:
    """Samples up to ``max_new_tokens`` ids after ``prompt_ids``; returns only the new ids
    (ending with ``stop_token`` if it came). ``temperature=0`` is greedy. Equals row 0 of
    ``generate_batch`` with the same arguments."""
    return generate_batch(
        model_cfg,
        params,
        [list(prompt_ids)],
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        seed,
        stop_token,
        repetition_penalty,
    )[0]


def _fetch(state: DecodeState) -> tuple[np.ndarray, int, np.ndarray]:
    """(tokens [B, S], t, done [B]) on the host: one transfer, no eager jax op."""
    return np.asarray(state.tokens), int(state.t), np.asarray(state.done)


def command_config(config_path: str | None, workdir: str | None, init_from: str, overrides):
    """``gpt2-jax generate``'s config: ``--config`` or ``--workdir``'s saved one, or with
    only ``--init_from=hf:...`` the defaults; ``init_from`` set (``weights.resolve`` then
    reads the shape from those weights). Built by the config layer's one override path."""
    from gpt2_jax.config import base as config_lib

    if config_path or not (workdir or init_from):  # for_command names what is missing
        cfg = config_lib.for_command(config_path, workdir, overrides)
        if init_from:
            config_lib.apply_overrides(cfg, {"init_from": init_from})
        return cfg
    return config_lib.for_weights(workdir, init_from, overrides)
