"""Fixed-size examples over a split's token stream, cut exactly as run_clm's ``group_texts``,
and ``load_splits``: the data layer's entry point, ``{split: Blocks}`` for a ``DataConfig``.

Blocks are non-overlapping ``block_size`` slices of the concatenated rows; run_clm's
``datasets.map(group_texts, batched=True)`` drops each ``group_rows``-row batch's
remainder, so the same is done here per group, not once over the stream.
"""

from __future__ import annotations

import numpy as np

from gpt2_jax.data import splits as splits_lib
from gpt2_jax.data import token_cache
from gpt2_jax.data.config import DataConfig
from gpt2_jax.data.sources import DataError


def block_starts(offsets: np.ndarray, block_size: int, group_rows: int = 1000) -> np.ndarray:
    """Start positions [num_blocks] int64 of run_clm's ``group_texts`` blocks.

    ``datasets.map(group_texts, batched=True)`` concatenates each batch of ``group_rows``
    rows and drops that batch's remainder (``total // block_size * block_size``), so the
    remainder is dropped per chunk, not once. ``group_rows=0``: one global chunk.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    n_rows = len(offsets) - 1
    step = group_rows if group_rows > 0 else max(n_rows, 1)
    edges = np.append(np.arange(0, n_rows, step), n_rows)
    begin, end = offsets[edges[:-1]], offsets[edges[1:]]
    counts = (end - begin) // block_size  # blocks per chunk
    first = np.cumsum(counts) - counts  # index of each chunk's first block
    within = np.arange(int(counts.sum())) - np.repeat(first, counts)
    return np.repeat(begin, counts) + within * block_size


class Blocks:
    """Fixed ``block_size`` examples over a (memmapped) token stream."""

    def __init__(
        self, tokens: np.ndarray, offsets: np.ndarray, block_size: int, group_rows: int = 1000
    ):
        self.tokens = tokens
        self.offsets = offsets
        self.block_size = int(block_size)
        self.group_rows = int(group_rows)
        self.starts = block_starts(offsets, self.block_size, self.group_rows)
        # Where the tokens came from (load_splits sets it; the run summary reports it).
        self.cache: token_cache.CacheInfo | None = None

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def num_tokens(self) -> int:
        """Tokens in all blocks (``len(self) * block_size``), remainders excluded."""
        return len(self) * self.block_size

    def __getitem__(self, idx) -> np.ndarray:
        """``blocks[idx]``: int32 [len(idx), block_size] (index array); [block_size] for an int."""
        starts = self.starts[idx]
        pos = np.asarray(starts)[..., None] + np.arange(self.block_size)
        return np.asarray(self.tokens[pos], dtype=np.int32)


def load_splits(data_cfg: DataConfig, splits=("train", "validation")) -> dict[str, Blocks]:
    """Loads, tokenizes (cached) and groups each split; ``{split: Blocks}``, or for the SFT
    formats ``{split: examples.Examples}`` (rows of one or, packed, several examples)."""
    data_cfg.validate()
    if data_cfg.examples:  # one example a row (prompt_completion, messages)
        from gpt2_jax.data.examples import load_examples

        return {name: load_examples(data_cfg, name) for name in splits}
    specs = {name: splits_lib.split_spec(data_cfg, name) for name in splits}  # errors first
    out = {}
    for name, spec in specs.items():
        tokens, offsets, info = token_cache.cached_or_built(data_cfg, spec)
        blocks = Blocks(tokens, offsets, data_cfg.block_size, data_cfg.group_rows)
        blocks.cache = info
        if len(blocks) == 0:
            raise _too_little(name, blocks)
        out[name] = blocks
    return out


def _too_little(split: str, blocks: Blocks) -> DataError:
    n_tok = int(blocks.offsets[-1])
    msg = (
        f"split {split!r} has {n_tok} tokens, too few for one block of "
        f"data.block_size={blocks.block_size}"
    )
    if n_tok >= blocks.block_size and blocks.group_rows:
        biggest = np.diff(blocks.offsets[:: blocks.group_rows].tolist() + [n_tok]).max()
        msg += (
            f" within one group of data.group_rows={blocks.group_rows} rows (largest group: "
            f"{biggest} tokens; run_clm drops each group's remainder)"
        )
    return DataError(msg + "; use a smaller --config.data.block_size or more data")
