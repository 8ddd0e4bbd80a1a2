"""Scoring many (tokens, targets) requests fast: packed rows, length buckets, and two
bounded-cache executables per batch (the model's trunk and the head).

- Requests are packed: those of at most ``PACK`` tokens share rows of up to ``PACK``
  tokens (best-fit decreasing, ``buckets.pack``), each with its own positions and a segment
  mask (a token sees only earlier tokens of its own request), so short requests cost their
  tokens, not a padded row each. A longer request has a row of its own.
- Rows are sorted by length, longest first, and each goes to a length bucket ``T``
  (``buckets.length_bucket``, at most ``n_positions``). A batch holds rows of one bucket:
  at most ``batch_size`` rows and, on a CPU, ``ROW_TOKENS`` tokens a device; a bucket's
  last batch is padded to the power of two >= its rows.
- Two executables per batch: the trunk for ``[batch, T]`` (hidden states stay on the
  device), and the head for ``(T, C)``, where ``C`` bounds the scored positions of each row
  (a power of two, at least ``MIN_SCORED``; model/losses.py: ``scored_logprobs``). Each is
  compiled once per bucket and kept in a bounded cache (``core.cache.LRU``,
  ``SCORING_EXECUTABLES_KEPT``).
- The batch axis is split over every device; under ``gpt2-jax launch`` each process puts
  its rows of each batch on its devices, and the per-row results come back replicated.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gpt2_jax.core.cache import LRU
from gpt2_jax.evaluation import buckets as bucket_lib
from gpt2_jax.evaluation import perplexity
from gpt2_jax.model import config as gpt2_config
from gpt2_jax.model import gpt2 as model_lib
from gpt2_jax.model import losses as losses_lib
from gpt2_jax.parallel import sharding

MIN_SCORED = 8  # fewest scored positions per row in a head bucket
PACK = 256  # requests up to this many tokens share rows of this length (pack)
ROW_TOKENS = 2048  # CPU: tokens per device per trunk call (see Scorer.rows_for)
# Compiled trunks and heads kept: a GPT-2 run of many tasks uses a few dozen buckets, so
# this only bounds a process that scores many model shapes or batch sizes.
SCORING_EXECUTABLES_KEPT = 128


@dataclasses.dataclass
class ScoringStats:
    """What scoring compiled and ran (read by tests and the benchmark)."""

    trunk_buckets: set = dataclasses.field(default_factory=set)  # (rows B, length T) used
    head_buckets: set = dataclasses.field(default_factory=set)  # (B, T, scored C) used
    compiles: int = 0  # executables compiled (trunk + head)
    compile_seconds: float = 0.0
    batches: int = 0


@dataclasses.dataclass(frozen=True)
class Row:
    """One scoring request: ``tokens`` go in, the last ``n`` predictions are scored."""

    tokens: tuple[int, ...]  # the input, at most n_positions long
    targets: tuple[int, ...]  # the n tokens those predictions must give


def _trunk(params: dict, ids, positions, segments, *, model_cfg) -> jax.Array:
    """Packed rows: ids, positions, segment ids [B, T] int32 -> the final hidden states
    [B, T, n_embd] (after ln_f)."""
    return model_lib.GPT2(model_cfg).apply(
        {"params": params}, ids, return_hidden=True, positions=positions, segment_ids=segments
    )


@functools.lru_cache(maxsize=8)  # a jit wrapper per model shape (or mesh): few a process
def _trunk_fn(model_cfg: gpt2_config.GPT2Config):
    return jax.jit(functools.partial(_trunk, model_cfg=model_cfg))


@functools.lru_cache(maxsize=8)  # a jit wrapper per model shape (or mesh): few a process
def _head_fn(mesh: Mesh):
    # Per-row results are tiny: replicated, so every process gets every row.
    return jax.jit(losses_lib.scored_logprobs, out_shardings=NamedSharding(mesh, PartitionSpec()))


class Scorer:
    """Scores ``Row``s with ``model_cfg`` (unrolled layers) on ``mesh``: at most
    ``batch_size`` rows a batch (a multiple of the device count)."""

    def __init__(self, model_cfg: gpt2_config.GPT2Config, mesh: Mesh, batch_size: int):
        self.model_cfg, self.mesh, self.batch_size = model_cfg, mesh, batch_size
        self.stats = ScoringStats()
        self._exes: LRU = LRU(SCORING_EXECUTABLES_KEPT)
        self._params = None

    def set_params(self, host_params: dict) -> None:
        """New weights (host arrays, unrolled): replicated over the mesh once."""
        self._params = jax.device_put(host_params, NamedSharding(self.mesh, PartitionSpec()))

    def score(self, rows: list[Row], bar) -> list[tuple[float, bool]]:
        """[(summed log-probability, is-greedy)] for each row, in order; ``bar`` (tqdm)
        advances by the rows done."""
        batches, scored = self._batches(rows)
        pending, results = [], [None] * len(rows)
        for T, bins in batches:
            B = self.rows_for(T, len(bins))
            C = min(max(bucket_lib.pow2(scored[T]), MIN_SCORED), T)
            pending.append((bins, self._score_batch(rows, bins, T, B, C)))
            if len(pending) > 2:  # keep the device busy; fetch two batches back
                _collect(rows, pending.pop(0), results, bar)
        for item in pending:
            _collect(rows, item, results, bar)
        return results

    def _batches(self, rows: list[Row]) -> tuple[list, dict]:
        """([(T, [packed rows])], in that order, one length bucket per batch; {T: the most
        scored positions of a packed row of that length})."""
        capacity = min(PACK, self.model_cfg.n_positions)
        packed = bucket_lib.pack([len(r.tokens) for r in rows], capacity)
        fill = [sum(len(rows[i].tokens) for i in b) for b in packed]
        order = sorted(range(len(packed)), key=lambda b: (-fill[b], b))
        # Packed rows are all as long as the longest unless there is only one: the last
        # rows' fill is all that varies, and a shorter bucket for it would cost compiles.
        shared = max(fill) if len(packed) > 1 else 0
        batches = []
        for b in order:
            T = bucket_lib.length_bucket(max(fill[b], min(shared, capacity)))
            T = min(T, self.model_cfg.n_positions)
            if batches and batches[-1][0] == T and len(batches[-1][1]) < self.rows_for(T):
                batches[-1][1].append(packed[b])
            else:
                batches.append((T, [packed[b]]))
        # Scored positions per row: one bound C for all rows of a length (one head each).
        scored: dict[int, int] = {}
        for T, bins in batches:
            for b in bins:
                scored[T] = max(scored.get(T, 0), sum(len(rows[i].targets) for i in b))
        return batches, scored

    def rows_for(self, T: int, n: int | None = None) -> int:
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
        return min(full, max(-(-bucket_lib.pow2(n) // devices) * devices, devices))

    def _score_batch(self, rows: list[Row], bins: list[list[int]], T: int, B: int, C: int):
        """Dispatches one batch of packed rows (no wait): device arrays (logprob [B, C],
        greedy [B, C]), each row's requests' scored positions one after the other."""
        arrays = _batch_arrays(rows, bins, T, B, C)
        batch = sharding.batch_sharding(self.mesh)
        lo, hi = perplexity.local_rows(B, batch)
        ids, positions, segments, pos, targets = (
            jax.make_array_from_process_local_data(batch, x[lo:hi], (B, *x.shape[1:]))
            for x in arrays
        )
        args = (self._params, ids, positions, segments)
        hidden = self._executable(("trunk", B, T), _trunk_fn(self.model_cfg), args)(*args)
        args = (self._params["wte"]["embedding"], hidden, pos, targets)
        head = self._executable(("head", B, T, C), _head_fn(self.mesh), args)
        self.stats.trunk_buckets.add((B, T))
        self.stats.head_buckets.add((B, T, C))
        self.stats.batches += 1
        return head(*args)

    def _executable(self, key: tuple, fn, args: tuple):
        def compile_it():
            t0 = time.perf_counter()
            exe = fn.lower(*args).compile()
            self.stats.compiles += 1
            self.stats.compile_seconds += time.perf_counter() - t0
            return exe

        return self._exes.get(key, compile_it)[0]


def _batch_arrays(rows: list[Row], bins: list[list[int]], T: int, B: int, C: int) -> tuple:
    """Host arrays of one batch: ids, positions, segment ids [B, T] int32 and the scored
    positions, targets [B, C] int32. Padding rows: zeros, nothing scored."""
    ids, positions = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
    segments = np.full((B, T), -1, np.int32)  # padding: a segment of its own
    pos, targets = np.zeros((B, C), np.int32), np.zeros((B, C), np.int32)
    for b, requests in enumerate(bins):
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
    return ids, positions, segments, pos, targets


def _collect(rows: list[Row], item, results: list, bar) -> None:
    """Each request's (summed log-probability, all greedy) from a fetched batch."""
    bins, (logprob, greedy) = item
    logprob, greedy = np.asarray(logprob, np.float64), np.asarray(greedy)
    for b, requests in enumerate(bins):
        c = 0
        for i in requests:
            n = len(rows[i].targets)
            results[i] = (float(logprob[b, c : c + n].sum()), bool(greedy[b, c : c + n].all()))
            c += n
    bar.update(sum(len(r) for r in bins))
