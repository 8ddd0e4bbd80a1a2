"""Which examples each process reads at each step: a pure function of (seed, step), so a
resumed run needs no loader state."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from gpt2_jax.data.sources import DataError

if TYPE_CHECKING:
    from gpt2_jax.data.blocks import Blocks


class BatchLoader:
    """Which examples each process reads at each step; a pure function of (seed, step).

    Epoch ``e`` visits ``np.random.default_rng([seed, e]).permutation(num_examples)``
    (or ``arange`` with shuffle=False) in ``steps_per_epoch`` global batches; the final
    incomplete batch is dropped so shapes stay fixed. Process ``p`` reads rows
    ``[p * local, (p + 1) * local)`` of each global batch.
    """

    def __init__(
        self,
        num_examples: int,
        global_batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        *,
        shuffle: bool = True,
        block_size: int | None = None,
        unit: str = "blocks",
    ):
        if global_batch_size <= 0 or global_batch_size % process_count:
            raise DataError(
                f"global batch size {global_batch_size} must be a positive multiple "
                f"of the process count {process_count}"
            )
        if not 0 <= process_index < process_count:
            raise DataError(f"process_index {process_index} not in [0, {process_count})")
        self.num_examples = int(num_examples)
        self.global_batch_size = int(global_batch_size)
        self.local_batch_size = global_batch_size // process_count
        self.seed, self.shuffle = int(seed), shuffle
        self.process_index, self.process_count = process_index, process_count
        self.steps_per_epoch = self.num_examples // self.global_batch_size
        self._memo: tuple[int, np.ndarray | None] = (-1, None)
        if self.steps_per_epoch == 0:
            what = f" of {block_size} tokens" if block_size else ""
            raise DataError(
                f"{self.num_examples} {unit}{what} < global batch "
                f"{self.global_batch_size}: use a smaller batch or block_size, or more data"
            )

    def epoch(self, step: int) -> int:
        return step // self.steps_per_epoch

    def _order(self, epoch: int) -> np.ndarray:
        # Memo of the last epoch's order only: the value is a function of (seed, epoch).
        if self._memo[0] != epoch:
            order = (
                np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
                if self.shuffle
                else np.arange(self.num_examples)
            )
            self._memo = (epoch, order)
        return self._memo[1]

    def global_indices(self, step: int) -> np.ndarray:
        """Example indices [global_batch_size] int64 of the global batch at ``step``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        pos = (step % self.steps_per_epoch) * self.global_batch_size
        return self._order(self.epoch(step))[pos : pos + self.global_batch_size]

    def indices(self, step: int) -> np.ndarray:
        """This process's example indices [local_batch_size] int64 at ``step``."""
        lo = self.process_index * self.local_batch_size
        return self.global_indices(step)[lo : lo + self.local_batch_size]

    def batch(self, blocks: Blocks, step: int) -> np.ndarray:
        """This process's tokens at ``step``: int32 [local_batch_size, block_size]."""
        return blocks[self.indices(step)]
