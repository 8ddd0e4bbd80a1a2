"""EleutherAI's lm-evaluation-harness backend: gpt2_jax's GPT-2 as an ``lm_eval`` model.

``GPT2JaxLM`` is an ``lm_eval.api.model.LM`` (through ``TemplateLM``, which splits
context and continuation as every lm-eval backend does), registered as ``"gpt2_jax"``
when this module is imported::

    from gpt2_jax.evaluation import harness
    import lm_eval
    lm = harness.GPT2JaxLM.from_workdir("runs/x")          # or from_hf(dir), or (cfg, params)
    lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai"])
    lm_eval.simple_evaluate(model="gpt2_jax", model_args="init_from=hf:DIR", tasks=[...])

Its results are lm-eval's ``hf`` backend's on the same weights (tests/test_harness.py):

- ``loglikelihood``: the request's context + continuation tokens, left-truncated to the
  last ``n_positions + 1`` and minus the last, scored on the continuation's positions;
  (summed log-probability, whether every continuation token is the argmax).
- ``loglikelihood_rolling``: the harness's own disjoint windows
  (``lm_eval.utils.get_rolling_token_windows`` + ``make_disjoint_window``, ``<|endoftext|>``
  prefix), each scored as a loglikelihood request, summed per document.
- ``generate_until``: the KV-cache decoder (``generate.stream_batch``), greedy or sampled,
  ``max_gen_toks`` new tokens, ended by ``<|endoftext|>`` and cut at the first ``until``.

How scoring is made fast:

- Requests are packed: those of at most ``PACK`` tokens share rows of up to ``PACK``
  tokens (best-fit decreasing, ``pack``), each with its own positions and a segment mask
  (a token sees only earlier tokens of its own request), so short requests cost their
  tokens, not a padded row each. A longer request has a row of its own.
- Rows are sorted by length, longest first, and each goes to a length bucket ``T`` (a
  power of two or the midpoint between two, >= its tokens, at least ``MIN_BUCKET``, at
  most ``n_positions``: ``length_bucket``). A batch holds rows of one bucket: at most
  ``batch_size`` rows and, on a CPU, ``ROW_TOKENS`` tokens a device; a bucket's last batch
  is padded to the power of two >= its rows.
- Two executables per batch: the model's trunk for ``[batch, T]`` (hidden states stay on
  the device; inference attention, ``model._blocked_attention``), and the head for
  ``(T, C)``, where ``C`` bounds the scored positions of each row (a power of two, at
  least ``MIN_SCORED``). The head gathers only the scored positions and forms their
  logits a chunk of rows at a time (``HEAD_ROWS``): never the ``[batch, T, vocab]``
  logits. Compiles: one per trunk bucket and one per head bucket used (``stats``); a
  bucket's executable is reused for every later batch.
- The batch axis is split over every device; under ``gpt2-jax launch`` each process puts
  its rows of each batch on its devices, and the per-row results come back replicated,
  so every process returns the same list (lm-eval sees one rank on each process).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm import tqdm

from gpt2_jax.core import workdir as wd
from gpt2_jax.data import tokenizer as tok_lib
from gpt2_jax.errors import UserError
from gpt2_jax.evaluation import generate as gen_lib
from gpt2_jax.evaluation import perplexity as evaluate
from gpt2_jax.model import gpt2 as model_lib
from gpt2_jax.parallel import sharding

MIN_BUCKET = 16  # shortest trunk bucket: short requests share one executable
MIN_SCORED = 8  # fewest scored positions per row in a head bucket
PACK = 256  # requests up to this many tokens share rows of this length (pack)
ROW_TOKENS = 2048  # CPU: tokens per device per trunk call (see GPT2JaxLM._rows_for)
HEAD_ROWS = 2048  # scored positions whose [rows, vocab] fp32 logits are formed at once
MAX_GEN_TOKS = 256  # lm-eval's default for generate_until (the hf backend's max_gen_toks)
# The model arguments `model_args="k=v,..."` may set (anything else is an error naming it).
MODEL_ARGS = ("init_from", "workdir", "step", "batch_size", "dtype", "max_gen_toks", "seed")


class HarnessError(UserError, ValueError):
    """A harness request or argument the user can fix (reported as one line by the CLI)."""


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def length_bucket(n: int) -> int:
    """The trunk length for ``n`` tokens: the smallest power of two, or midpoint between two
    (3 * 2^k: 16, 24, 32, 48, 64, 96, ...), >= n and >= MIN_BUCKET. A row holds under 1.5x
    its tokens, not up to 2x: on GPT-2 124M here a trunk compiles in ~0.8 s and a padded
    token costs ~1 ms (experiments/harness), so the midpoints pay for their compiles."""
    p = max(_pow2(n), MIN_BUCKET)
    return 3 * p // 4 if p > MIN_BUCKET and n <= 3 * p // 4 else p


# ------------------------------------------------------------------ jitted pieces


def _trunk(params: dict, ids, positions, segments, *, cfg: model_lib.GPT2Config) -> jax.Array:
    """Packed rows: ids, positions, segment ids [B, T] int32 -> the final hidden states
    [B, T, n_embd] (after ln_f)."""
    return model_lib.GPT2(cfg).apply(
        {"params": params}, ids, return_hidden=True, positions=positions, segment_ids=segments
    )


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


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: the indices of ``lengths`` in bins of at most ``capacity``
    tokens, longest first (a length over ``capacity`` gets a bin of its own). Deterministic:
    every process of a launch packs alike."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, bin), sorted
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(room, (n, -1))
        if n > capacity or k == len(room):
            bins.append([i])
            if n < capacity:
                bisect.insort(room, (capacity - n, len(bins) - 1))
            continue
        free, b = room.pop(k)
        bins[b].append(i)
        if free > n:
            bisect.insort(room, (free - n, b))
    return bins


# ------------------------------------------------------------------ the backend


@dataclasses.dataclass
class Stats:
    """What scoring compiled and ran (read by tests and the benchmark)."""

    trunk_buckets: set = dataclasses.field(default_factory=set)  # (rows B, length T) used
    head_buckets: set = dataclasses.field(default_factory=set)  # (B, T, scored C) used
    compiles: int = 0  # executables compiled (trunk + head)
    compile_seconds: float = 0.0
    batches: int = 0


@dataclasses.dataclass(frozen=True)
class _Row:
    """One scoring request: ``tokens`` go in, the last ``n`` predictions are scored."""

    tokens: tuple[int, ...]  # the input, at most n_positions long
    targets: tuple[int, ...]  # the n tokens those predictions must give


@register_model("gpt2_jax")
class GPT2JaxLM(TemplateLM):
    """gpt2_jax's GPT-2 behind lm-eval's model interface.

    ``cfg``/``params``: a model config and its params (either layer layout, host or device
    arrays). ``batch_size``: rows per scoring or decoding batch (rounded up to a multiple
    of the device count). ``max_gen_toks``: generate_until's default new-token budget.
    ``seed``: sampled generation's seed. ``progress``: a tqdm bar on stderr.
    """

    def __init__(
        self,
        cfg: model_lib.GPT2Config,
        params: dict,
        *,
        batch_size: int = 16,
        max_gen_toks: int = MAX_GEN_TOKS,
        seed: int = 0,
        progress: bool = True,
        devices: Sequence[jax.Device] | None = None,
        description: str = "gpt2_jax",
    ):
        super().__init__()
        if batch_size < 1:
            raise HarnessError(f"batch_size={batch_size}: must be >= 1")
        if max_gen_toks < 1:  # (and < n_positions: checked per request, as lm-eval's hf)
            raise HarnessError(f"max_gen_toks={max_gen_toks}: must be >= 1")
        # The params are kept unrolled (h_<i>, see set_params): the trunk runs that layout.
        self.cfg = dataclasses.replace(cfg, scan_layers=False)
        self.description = description
        self.source = None  # the weights.Source, when built from a workdir or hf weights
        self.enc = tok_lib.get_tokenizer()
        self.progress = progress
        self.seed = int(seed)
        self._max_gen_toks = int(max_gen_toks)
        devices = list(jax.devices() if devices is None else devices)
        self.mesh = Mesh(np.asarray(devices).reshape(-1, 1), ("data", "fsdp"))
        self.batch_size = -(-batch_size // len(devices)) * len(devices)
        self.stats = Stats()
        # Unrolled layers on the host: the decoder reads them as is, and the trunk gets
        # them replicated over the mesh once.
        self._exes: dict[tuple, Any] = {}
        self.set_params(params)

    def set_params(self, params: dict) -> None:
        """New weights of the same model config (training's periodic harness eval): the
        compiled executables are kept."""
        # Unrolled layers on the host: the decoder reads them as is, and the trunk gets
        # them replicated over the mesh once.
        self._host_params = _host_tree(params, self.cfg)
        self._params = jax.device_put(self._host_params, NamedSharding(self.mesh, PartitionSpec()))
        self._decode_params = None  # built on the next generate_until

    # ---------------------------------------------------------------- constructors

    @classmethod
    def from_workdir(cls, workdir, step=None, dtype: str | None = None, **kwargs) -> GPT2JaxLM:
        """The model of a gpt2-jax run: its latest checkpoint, step N, or "best"."""
        model_cfg, params, source = load_weights(workdir=workdir, step=step, dtype=dtype)
        lm = cls(model_cfg, params, description=source.describe(), **kwargs)
        lm.source = source
        return lm

    @classmethod
    def from_hf(cls, path_or_hub_id, dtype: str | None = None, **kwargs) -> GPT2JaxLM:
        """Hugging Face GPT-2 weights: a local directory or a hub id."""
        init_from = str(path_or_hub_id)
        init_from = init_from if init_from.startswith("hf:") else f"hf:{init_from}"
        model_cfg, params, source = load_weights(init_from=init_from, dtype=dtype)
        lm = cls(model_cfg, params, description=source.describe(), **kwargs)
        lm.source = source
        return lm

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """``model_args="init_from=hf:DIR"`` or ``"workdir=DIR,step=best"``, plus lm-eval's
        ``batch_size`` (``device`` and ``max_batch_size`` are ignored: JAX picks devices)."""
        args = lm_utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        if "batch_size" in extra and "batch_size" not in args:
            args["batch_size"] = extra["batch_size"]
        return cls.from_args(args)

    @classmethod
    def from_args(cls, args: dict) -> GPT2JaxLM:
        """From ``MODEL_ARGS`` keys; one of ``init_from`` / ``workdir`` names the weights."""
        unknown = [k for k in args if k not in MODEL_ARGS]
        if unknown:
            raise HarnessError(
                f"model_args: unknown key {unknown[0]!r} (gpt2_jax takes {', '.join(MODEL_ARGS)})"
            )
        args = dict(args)
        init_from, workdir = args.pop("init_from", ""), args.pop("workdir", "")
        step = args.pop("step", None)
        dtype = args.pop("dtype", None)
        if args.get("batch_size") in ("auto", None):
            args.pop("batch_size", None)  # lm-eval's auto-detection: our default instead
        kwargs = {k: int(v) for k, v in args.items()}
        if bool(init_from) == bool(workdir):
            raise HarnessError("model_args: give init_from=hf:<dir or hub id> or workdir=DIR")
        if workdir:
            return cls.from_workdir(workdir, step=_parse_step(step), dtype=dtype, **kwargs)
        return cls.from_hf(str(init_from), dtype=dtype, **kwargs)

    # ---------------------------------------------------------------- lm-eval's hooks

    @property
    def eot_token_id(self) -> int:
        return tok_lib.EOT_ID

    @property
    def max_length(self) -> int:
        return self.cfg.n_positions

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return "gpt2"

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        # As Hugging Face's GPT-2 tokenizer: a literal <|endoftext|> is the special token.
        return self.enc.encode(string, allowed_special={tok_lib.EOT_TOKEN})

    def tok_decode(self, tokens) -> str:
        return tok_lib.decode(self.enc, tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """``((context, continuation), context_enc, continuation_enc)`` ->
        [(summed log-probability, is-greedy)] in the same order."""
        L = self.max_length
        rows = []
        for _, context_enc, continuation_enc in requests:
            whole = (list(context_enc) + list(continuation_enc))[-(L + 1) :]
            rows.append(_Row(tuple(whole[:-1]), tuple(continuation_enc[-len(whole) + 1 :])))
        return self.score(rows, desc="loglikelihood", disable=disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document's log-likelihood over the harness's disjoint rolling windows."""
        rows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            windows = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(lm_utils.make_disjoint_window, windows):
                whole = (context + continuation)[-(self.max_length + 1) :]
                rows.append(_Row(tuple(whole[:-1]), tuple(continuation)))
                owner.append(i)
        scores = self.score(rows, desc="loglikelihood_rolling", disable=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, scores, strict=True):
            totals[i] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Decodes each request's context until one of its ``until`` strings."""
        eos = self.enc.decode([self.eot_token_id])
        groups: dict[str, list[int]] = {}
        settings = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            s = self._gen_settings(gen_kwargs, eos)
            settings.append(s)
            groups.setdefault(repr(sorted(s.items())), []).append(i)
        out: list[str | None] = [None] * len(requests)
        bar = self._bar(len(requests), "generate_until", disable_tqdm)
        for idx in groups.values():
            s = settings[idx[0]]
            prompts = {}
            for i in idx:
                ids = self.tok_encode(requests[i].args[0])[-(self.max_length - s["max_gen_toks"]) :]
                prompts[i] = ids or [self.eot_token_id]  # an empty context starts at EOT
            order = sorted(idx, key=lambda i: (-len(prompts[i]), i))
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                texts = self._generate([prompts[i] for i in chunk], s)
                for i, text in zip(chunk, texts, strict=True):
                    out[i] = text
                    context, gen_kwargs = requests[i].args
                    self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                bar.update(len(chunk))
        bar.close()
        return out

    # ---------------------------------------------------------------- scoring

    def score(self, rows: list[_Row], desc: str = "score", disable: bool = False):
        """[(summed log-probability, is-greedy)] for each row, in order."""
        if not rows:
            return []
        for r in rows:
            if not r.targets or len(r.targets) > len(r.tokens) or len(r.tokens) > self.max_length:
                raise HarnessError(f"cannot score {len(r.targets)} tokens of {len(r.tokens)}")
        capacity = min(PACK, self.max_length)
        packed = pack([len(r.tokens) for r in rows], capacity)
        fill = [sum(len(rows[i].tokens) for i in b) for b in packed]
        order = sorted(range(len(packed)), key=lambda b: (-fill[b], b))
        # Packed rows are all as long as the longest unless there is only one: the last
        # rows' fill is all that varies, and a shorter bucket for it would cost compiles.
        shared = max(fill) if len(packed) > 1 else 0
        batches = []  # (T, [packed rows]) in that order, one length bucket per batch
        for b in order:
            T = min(length_bucket(max(fill[b], min(shared, capacity))), self.max_length)
            if batches and batches[-1][0] == T and len(batches[-1][1]) < self._rows_for(T):
                batches[-1][1].append(packed[b])
            else:
                batches.append((T, [packed[b]]))
        # Scored positions per row: one bound C for all rows of a length (one head each).
        scored = {}
        for T, bins in batches:
            for b in bins:
                scored[T] = max(scored.get(T, 0), sum(len(rows[i].targets) for i in b))
        pending, results = [], [None] * len(rows)
        bar = self._bar(len(rows), desc, disable)
        for T, bins in batches:
            B, C = self._rows_for(T, len(bins)), min(max(_pow2(scored[T]), MIN_SCORED), T)
            pending.append((bins, self._score_batch(rows, bins, T, B, C)))
            if len(pending) > 2:  # keep the device busy; fetch two batches back
                self._collect(rows, pending.pop(0), results, bar)
        for item in pending:
            self._collect(rows, item, results, bar)
        bar.close()
        return results

    def _collect(self, rows, item, results, bar) -> None:
        bins, (logprob, greedy) = item
        logprob, greedy = np.asarray(logprob, np.float64), np.asarray(greedy)
        for b, requests in enumerate(bins):
            c = 0
            for i in requests:
                n = len(rows[i].targets)
                results[i] = (float(logprob[b, c : c + n].sum()), bool(greedy[b, c : c + n].all()))
                c += n
        bar.update(sum(len(r) for r in bins))

    def _rows_for(self, T: int, n: int | None = None) -> int:
        """Rows of a batch of length ``T`` (holding ``n`` packed rows; None: a full batch).

        At most ``batch_size``; on a CPU also at most ``ROW_TOKENS`` tokens a device (the
        trunk's activations then stay in cache: GPT-2 124M here runs ~25% more tokens/s
        at 1-2k tokens a call than at 4k, experiments/harness). A batch's last, smaller
        part gets the power of two >= its rows (a padded row costs as much as a real one,
        a second executable for the tail less than many padded rows). A multiple of the
        device count."""
        devices = self.mesh.devices.size
        full = self.batch_size
        if self.mesh.devices.flat[0].platform == "cpu":
            full = min(full, max(ROW_TOKENS // T, 1) * devices)
        full = -(-full // devices) * devices
        if n is None or n >= full:
            return full
        return min(full, max(-(-_pow2(n) // devices) * devices, devices))

    def _score_batch(self, rows: list[_Row], bins: list[list[int]], T: int, B: int, C: int):
        """Dispatches one batch of packed rows (no wait): device arrays (logprob [B, C],
        greedy [B, C]), each row's requests' scored positions one after the other."""
        ids, positions = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
        segments = np.full((B, T), -1, np.int32)  # padding: a segment of its own
        pos, targets = np.zeros((B, C), np.int32), np.zeros((B, C), np.int32)
        for b, requests in enumerate(bins):  # padding rows: zeros, nothing scored
            t = c = 0
            for k, i in enumerate(requests):
                r = rows[i]
                n, m = len(r.tokens), len(r.targets)
                ids[b, t : t + n] = r.tokens
                positions[b, t : t + n] = np.arange(n)
                segments[b, t : t + n] = k
                pos[b, c : c + m] = np.arange(t + n - m, t + n)
                targets[b, c : c + m] = r.targets
                t, c = t + n, c + m
        batch = sharding.batch_sharding(self.mesh)
        lo, hi = evaluate.local_rows(B, batch)
        put = _putter(B, batch)
        ids, positions, segments, pos, targets = (
            put(x[lo:hi]) for x in (ids, positions, segments, pos, targets)
        )
        args = (self._params, ids, positions, segments)
        hidden = self._executable(("trunk", B, T), _trunk_fn(self.cfg), args)(*args)
        args = (self._params["wte"]["embedding"], hidden, pos, targets)
        head = self._executable(("head", B, T, C), _head_fn(self.mesh), args)
        self.stats.trunk_buckets.add((B, T))
        self.stats.head_buckets.add((B, T, C))
        self.stats.batches += 1
        return head(*args)

    def _executable(self, key: tuple, fn, args: tuple):
        exe = self._exes.get(key)
        if exe is None:
            t0 = time.perf_counter()
            exe = fn.lower(*args).compile()
            self._exes[key] = exe
            self.stats.compiles += 1
            self.stats.compile_seconds += time.perf_counter() - t0
        return exe

    # ---------------------------------------------------------------- generation

    def _gen_settings(self, gen_kwargs: dict, eos: str) -> dict:
        """lm-eval's generation kwargs, normalized as its hf backend does, checked."""
        if not isinstance(gen_kwargs, dict):
            raise HarnessError(f"generation kwargs must be a dict, got {gen_kwargs!r}")
        kw = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kw.pop("until", None), eos=eos)
        max_gen_toks = int(kw.pop("max_gen_toks"))
        do_sample = bool(kw.pop("do_sample", False))
        temperature = float(kw.pop("temperature", 0.0))
        # transformers' generate samples with top_k=50 unless told otherwise: the same here.
        top_k, top_p = int(kw.pop("top_k", 50)), float(kw.pop("top_p", 1.0))
        kw.pop("max_length", None)  # the hf backend's alias, superseded by max_gen_toks
        if kw:
            raise HarnessError(
                f"generation kwarg {next(iter(kw))!r} is not supported by gpt2_jax "
                "(it takes until, max_gen_toks, do_sample, temperature, top_k, top_p)"
            )
        if not 1 <= max_gen_toks < self.max_length:
            raise HarnessError(
                f"max_gen_toks={max_gen_toks}: must be in [1, n_positions={self.max_length})"
            )
        greedy = not do_sample or temperature == 0.0
        return dict(
            until=tuple(until),
            max_gen_toks=max_gen_toks,
            temperature=0.0 if greedy else (temperature or 1.0),
            top_k=0 if greedy else top_k,
            top_p=1.0 if greedy else top_p,
        )

    def _generate(self, prompts: list[list[int]], s: dict) -> list[str]:
        """Decodes ``prompts`` (padded to ``batch_size`` rows: one executable per
        bucket); each row's text up to <|endoftext|>, cut at the first ``until``."""
        if self._decode_params is None:
            self._decode_params = gen_lib.decode_params(self.cfg, self._host_params)
        rows = prompts + [prompts[0]] * (self.batch_size - len(prompts))
        new = gen_lib.generate_batch(
            self.cfg,
            self._decode_params,
            rows,
            s["max_gen_toks"],
            temperature=s["temperature"],
            top_k=s["top_k"],
            top_p=s["top_p"],
            seed=self.seed,
            stop_token=self.eot_token_id,
        )
        out = []
        for ids in new[: len(prompts)]:
            ids = [t for t in ids if t != self.eot_token_id]
            text = self.tok_decode(ids)
            out.append(postprocess_generated_text(text, list(s["until"]), None))
        return out

    def _bar(self, total: int, desc: str, disable: bool):
        off = disable or not self.progress or jax.process_index() != 0
        return tqdm(total=total, desc=desc, disable=off, file=sys.stderr, unit="req")

    def get_model_info(self) -> dict:
        return {"model": self.description, "n_params": _count(self._host_params)}


# ------------------------------------------------------------------ helpers


@functools.cache
def _trunk_fn(cfg: model_lib.GPT2Config):
    return jax.jit(functools.partial(_trunk, cfg=cfg))


@functools.cache
def _head_fn(mesh: Mesh):
    # Per-row results are tiny: replicated, so every process gets every row.
    return jax.jit(_head, out_shardings=NamedSharding(mesh, PartitionSpec()))


def _putter(B: int, batch: NamedSharding):
    def put(x: np.ndarray) -> jax.Array:
        return jax.make_array_from_process_local_data(batch, x, (B, *x.shape[1:]))

    return put


def _host_tree(params: dict, cfg: model_lib.GPT2Config) -> dict:
    """params as host numpy arrays, layers unrolled (``h_<i>``). An array spread over
    several processes (FSDP) is gathered: every process must call this together."""
    from jax.experimental import multihost_utils

    def host(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.sharding.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    params = jax.tree.map(host, params)
    return model_lib.unstack_layers(params) if "h" in params else params


def _count(params: dict) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))


def _parse_step(step):
    from gpt2_jax.weights import resolve as weights

    if step is None or isinstance(step, int):
        return step
    try:
        return weights.parse_step(str(step))
    except ValueError:
        raise HarnessError(f"step={step!r} is not a step number, 'best' or 'latest'") from None


def load_weights(
    workdir=None, step=None, init_from: str = "", dtype: str | None = None
) -> tuple[model_lib.GPT2Config, dict, Any]:
    """(model config, params, weights.Source) of a workdir's checkpoint or of ``hf:``
    weights, through the one resolver every command uses (weights.py)."""
    from gpt2_jax.config import plan as plan_lib
    from gpt2_jax.weights import resolve as weights

    cfg = _weights_config(workdir, init_from, dtype)
    plan = plan_lib.weights_only(cfg, workdir or None, step, jax.device_count())
    return plan.model, weights.params_of(plan.source), plan.source


def check_weights(workdir=None, step=None, init_from: str = "", dtype: str | None = None):
    """Raises the one-line error of a missing run, checkpoint step or HF directory,
    without reading any weights (the command checks this before the tasks)."""
    from gpt2_jax.config import plan as plan_lib

    cfg = _weights_config(workdir, init_from, dtype)
    plan_lib.resolve_weights(cfg, workdir or None, _parse_step(step))


def _weights_config(workdir, init_from: str, dtype: str | None):
    """The config the resolver reads: the run's saved one, or the defaults + init_from."""
    from gpt2_jax.config import base as config_lib

    if workdir:
        saved = Path(workdir) / wd.CONFIG
        if not saved.is_file():
            raise config_lib.ConfigError(
                f"--workdir={workdir} has no config.json (is it a gpt2-jax run directory?)"
            )
        cfg = config_lib.from_json(saved.read_text())
    else:
        cfg = config_lib.base_config()
        cfg.init_from = init_from
    if dtype:
        if dtype not in model_lib.DTYPES:
            raise HarnessError(f"dtype={dtype!r} is not one of {list(model_lib.DTYPES)}")
        cfg.model.dtype = dtype
    with cfg.model.unlocked():
        cfg.model.dropout = 0.0  # evaluation: deterministic anyway; keeps the config honest
    return cfg


# ------------------------------------------------------------------ running tasks


def task_manager(include_path: str = "", include_defaults: bool = True, flag="--include_path"):
    """lm-eval's TaskManager: its own tasks (unless ``include_defaults=False``) and the task
    YAMLs under ``include_path`` (comma-separated directories). The index of lm-eval's own
    ~14,000 task YAMLs is read from a cache (``index_cache``) when those files are unchanged:
    ~1 s instead of ~9 s a command on this CPU. ``include_path`` is read afresh each time."""
    from lm_eval.tasks import TaskManager

    paths = [p.strip() for p in str(include_path or "").split(",") if p.strip()]
    for p in paths:
        if not Path(p).is_dir():
            raise HarnessError(f"{flag}={p}: no such directory")
    with _cached_default_index():
        return TaskManager(include_path=paths or None, include_defaults=include_defaults)


def index_cache() -> Path:
    """Where the index of lm-eval's own tasks is kept: ``$GPT2_JAX_CACHE``, else
    ``~/.cache/gpt2_jax`` (the token caches' default root too)."""
    import os

    return Path(os.environ.get("GPT2_JAX_CACHE") or "~/.cache/gpt2_jax").expanduser()


@contextlib.contextmanager
def _cached_default_index():
    """While a TaskManager is built: lm-eval's ``TaskIndex.build`` takes the index of
    lm-eval's own task directory from a pickle keyed by lm-eval's version and every YAML's
    path, mtime and size, and builds the other directories as it always does. The result
    is build()'s: build(a + b) merges build(a) with build(b), later paths winning."""
    from lm_eval.tasks import _index

    original = _index.TaskIndex.__dict__["build"]  # the staticmethod, restored as it was
    build = _index.TaskIndex.build
    own = Path(_index.__file__).parent

    def cached_build(paths, *, resolve_includes=True):
        merged = {}
        for path in paths:
            if Path(path).resolve() == own.resolve() and resolve_includes:
                part = _load_or_build(own, build)
            else:
                part = build([path], resolve_includes=resolve_includes)
            for name, entry in part.items():
                if name in merged:
                    _index.log.warning(
                        "Task '%s' from %s overrides existing task from %s",
                        name, entry.yaml_path, merged[name].yaml_path,
                    )  # fmt: skip
                merged[name] = entry
        return merged

    _index.TaskIndex.build = staticmethod(cached_build)
    try:
        yield
    finally:
        _index.TaskIndex.build = original


def _load_or_build(own: Path, build) -> dict:
    import hashlib
    import os
    import pickle
    from importlib.metadata import version

    files = sorted(own.rglob("*.yaml"))
    key = hashlib.sha256(f"{version('lm_eval')}\n{own}\n".encode())
    for f in files:
        st = f.stat()
        key.update(f"{f}\0{st.st_mtime_ns}\0{st.st_size}\n".encode())
    cache = index_cache() / f"lm_eval_tasks_{key.hexdigest()[:20]}.pkl"
    try:
        return pickle.loads(cache.read_bytes())
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError):
        pass
    index = build([own])
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(pickle.dumps(index, protocol=pickle.HIGHEST_PROTOCOL))
        os.replace(tmp, cache)
    except OSError:  # a read-only home: no cache, the same index
        pass
    return index


def check_tasks(tasks, manager, flag: str = "--tasks") -> list[str]:
    """The task names of ``tasks`` (comma-separated or a list), each known to ``manager``
    and with its data loadable: a HarnessError names an unknown task (with the closest
    names) or a task whose dataset cannot be had (offline, say), before any model loads."""
    import difflib

    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks)]
    names = [t for t in names if t]
    if not names:
        raise HarnessError(f"{flag}: give at least one task name (lm-eval ls tasks lists them)")
    known = manager.all_tasks
    for name in names:
        if name not in known and not manager.match_tasks([name]):
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise HarnessError(f"{flag}: unknown task {name!r}{hint}")
    for name in names:
        try:
            manager.load([name])
        except Exception as e:  # the task's data: the hub offline, a missing file, ...
            raise HarnessError(_data_error(name, manager, e)) from None
    return names


def _data_error(name: str, manager, exc: Exception) -> str:
    entry = manager._entry(name)  # private, but the only way to a task's YAML config
    cfg = getattr(entry, "cfg", None) or {}
    where = cfg.get("dataset_path", "?")
    if cfg.get("dataset_name"):
        where += f" ({cfg['dataset_name']})"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    hub = isinstance(exc, ConnectionError) or "Hub" in text or "offline" in text.lower()
    fix = (
        "it needs the Hugging Face hub, which cannot be reached (offline?); run it where the "
        "hub is reachable, or point --include_path at a task YAML that reads local files "
        "(dataset_path: json, dataset_kwargs: {data_files: ...})"
        if hub
        else "check the task's dataset_path / data_files"
    )
    return f"task {name!r}: its dataset {where} cannot be loaded ({text[:200]}); {fix}"


def run(
    lm: GPT2JaxLM,
    tasks: list[str],
    manager,
    *,
    num_fewshot: int | None = None,
    limit: float | None = None,
    log_samples: bool = False,
    seed: Sequence[int | None] = (0, 1234, 1234, 1234),
    gen_kwargs: str | dict | None = None,
) -> dict:
    """``lm_eval.simple_evaluate`` on ``lm``: its results dict (with ``samples`` if asked).

    ``seed``: lm-eval's four seeds (python, numpy, torch, few-shot); the third also seeds
    gpt2_jax's sampled generation, as it seeds torch's in the hf backend.
    """
    import multiprocessing
    import os

    import lm_eval

    # lm-eval's bootstrap (perplexity stderr) runs a multiprocessing pool: forked from a
    # process running XLA's threads it can deadlock. `gpt2-jax lm-eval` starts its pools
    # from a fork server (cli.py); otherwise lm-eval's documented switch keeps the
    # bootstrap in this process (the same numbers: it seeds every chunk).
    if multiprocessing.get_start_method(allow_none=True) in (None, "fork"):
        os.environ.setdefault("DISABLE_MULTIPROC", "1")
    if seed[2] is not None:
        lm.seed = int(seed[2])
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        log_samples=log_samples,
        gen_kwargs=gen_kwargs or None,
        task_manager=manager,
        random_seed=seed[0],
        numpy_random_seed=seed[1],
        torch_random_seed=seed[2],
        fewshot_random_seed=seed[3],
    )


def scalars(results: dict) -> dict[str, float]:
    """``{"lm_eval/<task>/<metric>": value}`` from a results dict: every numeric metric
    but the standard errors; a filter other than lm-eval's "none" is appended
    (``exact_match_strict-match``)."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if "_stderr" in metric or metric in ("alias", "sample_len") or isinstance(value, bool):
                continue
            if not isinstance(value, (int, float)):
                continue
            name = metric if filt in ("", "none") else f"{metric}_{filt}"
            out[f"lm_eval/{task}/{name}"] = float(value)
    return out


# Top-level keys of lm-eval's results that map task names to values (merged on rewrite).
_PER_TASK = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot",
             "higher_is_better", "n-samples")  # fmt: skip


def write_results(results: dict, path, log_samples: bool = False, merge: bool = False) -> list:
    """The results JSON at ``path`` (atomically; samples left out), and with
    ``log_samples`` one ``samples_<task>_<time>.jsonl`` beside it, written by lm-eval's
    own tracker (the files its CLI writes). ``merge``: an existing file keeps the tasks
    this run did not score (a step's file collects every task scored at that step).
    Returns the paths written."""
    import json
    import os

    from lm_eval.loggers import EvaluationTracker
    from lm_eval.utils import handle_non_serializable

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = results.get("samples")
    body = json.loads(
        json.dumps(
            {k: v for k, v in results.items() if k != "samples"}, default=handle_non_serializable
        )
    )
    if merge and path.is_file():
        old = json.loads(path.read_text())
        for key in _PER_TASK:
            if isinstance(old.get(key), dict) or isinstance(body.get(key), dict):
                body[key] = {**(old.get(key) or {}), **(body.get(key) or {})}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    os.replace(tmp, path)
    written = [path]
    if log_samples and samples:
        from datetime import datetime

        tracker = EvaluationTracker(output_path=str(path))
        tracker.date_id = datetime.now().isoformat().replace(":", "-")  # as its own save sets
        for task in results.get("configs", {}):
            before = set(path.parent.glob(f"samples_{task}_*.jsonl"))
            tracker.save_results_samples(task_name=task, samples=samples[task])
            new = sorted(set(path.parent.glob(f"samples_{task}_*.jsonl")) - before)
            if not new:  # the tracker logs a failure and carries on: we do not
                raise OSError(f"could not write the samples of {task} beside {path}")
            written += new
    return written


def table(results: dict) -> str:
    """The harness's results table (and its groups table, when there are groups)."""
    from lm_eval.utils import make_table

    text = make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    return text


# ------------------------------------------------------------------ the command


def parse_seed(text: str | None) -> tuple[int | None, ...]:
    """lm-eval's ``--seed``: one integer for all four seeds, or four comma-separated
    values (python, numpy, torch, few-shot), ``None`` leaving one unset."""
    if text is None or str(text).strip() == "":
        return (0, 1234, 1234, 1234)
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) == 1:
        parts *= 4
    if len(parts) != 4:
        raise HarnessError(f"--seed={text}: give one integer or four comma-separated values")
    try:
        return tuple(None if p == "None" else int(p) for p in parts)
    except ValueError:
        raise HarnessError(f"--seed={text}: not integers (or None)") from None


def results_path(output_path: str, source, workdir) -> Path | None:
    """Where the results JSON goes: ``output_path`` (a .json file, or a directory that
    gets ``step_<N>.json`` / ``results.json``), else ``WORKDIR/lm_eval/step_<N>.json``;
    None for hf weights without ``output_path`` (nothing is written)."""
    checkpoint = source is not None and source.kind == "checkpoint"
    name = f"step_{source.step}.json" if checkpoint else "results.json"
    if output_path:
        out = Path(output_path)
        return out if out.suffix == ".json" else out / name
    if workdir:
        return Path(workdir) / wd.LM_EVAL / name
    return None


def evaluate_command(
    *,
    tasks: str,
    workdir: str = "",
    step=None,
    init_from: str = "",
    model_args: str = "",
    batch_size: int | None = None,
    num_fewshot: int | None = None,
    limit: float | None = None,
    include_path: str = "",
    output_path: str = "",
    log_samples: bool = False,
    seed: str | None = None,
    gen_kwargs: str = "",
    progress: bool = True,
) -> tuple[dict, Path | None, list[Path]]:
    """``gpt2-jax lm-eval``: checks everything (tasks, their data, the model arguments)
    before any weights load, scores, and writes the results JSON (process 0) ->
    (results, results path or None, every file written)."""
    seeds = parse_seed(seed)
    args = lm_utils.simple_parse_args_string(model_args)
    for key, value in (("workdir", workdir), ("init_from", init_from), ("step", step)):
        if value not in ("", None):
            if key in args:
                raise HarnessError(f"--{key} and --model_args {key}=... both given")
            args[key] = value
    if batch_size is not None:
        args["batch_size"] = batch_size
    unknown = [k for k in args if k not in MODEL_ARGS]
    if unknown:
        raise HarnessError(
            f"--model_args: unknown key {unknown[0]!r} (gpt2_jax takes {', '.join(MODEL_ARGS)})"
        )
    if not args.get("workdir") and not args.get("init_from"):
        raise HarnessError("give --workdir=DIR (a trained run) or --init_from=hf:<dir or hub id>")
    if args.get("init_from"):
        from gpt2_jax.config import base as config_lib

        config_lib.parse_init_from(str(args["init_from"]))
    if log_samples and not output_path and not args.get("workdir"):
        raise HarnessError("--log_samples needs --output_path (or --workdir) to write them to")
    check_weights(args.get("workdir"), args.get("step"), args.get("init_from", ""),
                  args.get("dtype"))  # fmt: skip
    manager = task_manager(include_path)
    names = check_tasks(tasks, manager)
    lm = GPT2JaxLM.from_args(args)
    lm.progress = progress
    results = run(
        lm,
        names,
        manager,
        num_fewshot=num_fewshot,
        limit=limit,
        log_samples=log_samples,
        seed=seeds,
        gen_kwargs=gen_kwargs or None,
    )
    path = results_path(output_path, lm.source, args.get("workdir"))
    written = []
    if path is not None and jax.process_index() == 0:
        written = write_results(results, path, log_samples, merge=True)
    return results, path, written


# ------------------------------------------------------------------ during training


class TrainingHook:
    """``eval.harness_tasks`` during ``gpt2-jax train``: ``hook(step, params)`` scores the
    tasks, writes ``WORKDIR/lm_eval/step_<step>.json`` (process 0) and returns
    ``{"lm_eval/<task>/<metric>": value}`` for metrics.jsonl and TensorBoard.

    Built before the train step compiles, so an unknown task or unreachable data stops
    the run before anything is written; one backend is kept for the whole run (its
    executables compile once) and gets each step's params.
    """

    def __init__(self, cfg, model_cfg: model_lib.GPT2Config, workdir):
        e = cfg.eval
        self.model_cfg = model_cfg
        self.workdir = Path(workdir)
        self.manager = task_manager(e.harness_include_path, flag="eval.harness_include_path")
        self.tasks = check_tasks(e.harness_tasks, self.manager, flag="eval.harness_tasks")
        from gpt2_jax.config import plan as plan_lib

        self.batch_size = plan_lib.eval_batch(cfg, jax.device_count())
        self.limit = e.harness_limit or None
        self.num_fewshot = None if e.harness_num_fewshot < 0 else e.harness_num_fewshot
        self.seed = cfg.train.seed
        self.lm: GPT2JaxLM | None = None

    def __call__(self, step: int, params: dict) -> dict[str, float]:
        if self.lm is None:
            self.lm = GPT2JaxLM(
                dataclasses.replace(self.model_cfg, resid_pdrop=0.0, embd_pdrop=0.0,
                                    attn_pdrop=0.0),
                params,
                batch_size=self.batch_size,
                seed=self.seed,
                progress=False,
                description=f"{self.workdir} step {step}",
            )  # fmt: skip
        else:
            self.lm.set_params(params)
        results = run(
            self.lm, self.tasks, self.manager, num_fewshot=self.num_fewshot, limit=self.limit
        )
        if jax.process_index() == 0:
            path = self.workdir / wd.LM_EVAL / f"step_{step}.json"
            write_results(results, path, merge=True)
        return scalars(results)
