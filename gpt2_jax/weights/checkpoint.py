"""Orbax checkpoints of plain pytrees, with the run's resolved config saved beside each.

Layout: ``<workdir>/checkpoints/<step>/{state, config}``. Saves are asynchronous; Orbax
writes each into a temporary directory renamed on completion, so a ``kill -9`` leaves the
last finished checkpoint intact (leftover temporaries are removed at the next start).
This module knows pytrees, not models.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from gpt2_jax.errors import UserError


class CheckpointError(UserError, RuntimeError):
    pass


# The metric saved with a step (train.keep_best): the first eval split's loss.
BEST_METRIC = "eval_loss"


@contextlib.contextmanager
def _absl_quieted(level: int | None = None, drop: str = ""):
    """Orbax's absl log, for one call, at ``level`` and without records containing
    ``drop``; restored afterwards (nothing process-wide stays changed)."""
    logger = logging.getLogger("absl")
    previous = logger.level

    def keep(record: logging.LogRecord) -> bool:
        return not drop or drop not in record.getMessage()

    if level is not None:
        logger.setLevel(level)
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)
        logger.setLevel(previous)


class Checkpointer:
    """A thin wrapper over ``ocp.CheckpointManager`` that fails loudly.

    Orbax reports an async save's error only at the next save/wait/close, and returns
    False (silently) for a step at or below the latest one: both become exceptions here.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        max_to_keep: int = 3,
        async_save: bool = True,
        read_only: bool = False,
        keep_best: bool = False,
    ):
        # Relative paths break async saves (the error surfaces only at the next save).
        self.directory = Path(directory).absolute()
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"no checkpoint directory at {self.directory}")
        keep = None if read_only else (max_to_keep or None)
        policy = None
        if keep_best and not read_only:
            # The newest ``keep``, plus the one with the lowest eval loss among those saved
            # with metrics (``save(..., eval_loss=...)``): keep-N never removes it.
            policy = ocp.checkpoint_managers.AnyPreservationPolicy(
                [
                    ocp.checkpoint_managers.LatestN(n=keep),
                    ocp.checkpoint_managers.BestN(
                        get_metric_fn=lambda m: -m[BEST_METRIC],  # keeps the largest: negate
                        n=1,
                        keep_checkpoints_without_metrics=False,
                    ),
                ]
            )
        options = ocp.CheckpointManagerOptions(
            # Read-only managers must not keep/prune or save (Orbax warns otherwise).
            max_to_keep=None if policy is not None else keep,
            preservation_policy=policy,
            # Orbax writes a step's metrics to disk only when best_fn is set.
            best_fn=(lambda m: m[BEST_METRIC]) if policy is not None else None,
            best_mode="min",
            # Step directories made in the calling thread: an unwritable directory (read-only,
            # full, not a directory) then fails save() at once. Made asynchronously, Orbax's
            # writer threads wait up to 20 minutes for a creation signal that never comes.
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
            save_interval_steps=0 if read_only else 1,
            enable_async_checkpointing=async_save and not read_only,
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        )
        # Orbax warns that a read-only manager will not save: we know.
        with _absl_quieted(logging.ERROR if read_only else None):
            self._mngr = ocp.CheckpointManager(
                self.directory, options=options, item_names=("state", "config")
            )

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def best_step(self) -> int | None:
        """The saved step with the lowest recorded eval loss (None if none has one)."""
        scored = []
        for step in self.all_steps():
            metrics = self._mngr.metrics(step)
            if metrics and BEST_METRIC in metrics:
                scored.append((metrics[BEST_METRIC], step))
        return min(scored)[1] if scored else None

    def save(
        self,
        step: int,
        state: Any,
        config: dict,
        force: bool = True,
        eval_loss: float | None = None,
    ) -> None:
        """Starts an async save of ``state`` (any pytree of arrays) and ``config`` (JSON).

        ``eval_loss`` is recorded with the step (what ``keep_best`` / ``best_step`` rank).
        A write error of this or an earlier async save raises CheckpointError naming the
        directory.
        """
        metrics = None if eval_loss is None else {BEST_METRIC: float(eval_loss)}
        # With keep_best, steps saved between evals have no metrics, by design: no warning.
        try:
            with _absl_quieted(drop="did not provide metrics"):
                saved = self._mngr.save(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.PyTreeSave(state), config=ocp.args.JsonSave(config)
                    ),
                    force=force,
                    metrics=metrics,
                )
        except Exception as e:
            raise self._write_error(step, e) from e
        if not saved and step not in self._mngr.all_steps():
            raise CheckpointError(
                f"checkpoint for step {step} was not saved in {self.directory} "
                f"(latest saved step: {self._mngr.latest_step()})"
            )

    def restore(self, step: int | None, abstract_state: Any = None, partial: bool = False) -> Any:
        """Restores ``abstract_state``'s structure (ShapeDtypeStructs with shardings).

        ``step=None`` is the latest; ``abstract_state=None`` restores the tree as saved.
        ``partial=True`` restores only the subtrees given (e.g. ``{"params": ...}``).
        Shape or structure mismatches raise CheckpointError naming the directory.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        if abstract_state is None:  # as saved, on the default device (inspection, tests)
            args = ocp.args.PyTreeRestore()
        else:
            args = ocp.args.PyTreeRestore(
                item=abstract_state,
                partial_restore=partial,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
            )
        try:
            out = self._mngr.restore(step, args=ocp.args.Composite(state=args))
        except Exception as e:  # orbax raises ValueError/KeyError/etc. for mismatches
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} does not match this model/optimizer: "
                f"{type(e).__name__}: {str(e)[:2000]}"
            ) from e
        return out.state

    def restore_config(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        out = self._mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return out.config

    def wait(self) -> None:
        """Blocks until pending saves finish; their errors raise CheckpointError."""
        try:
            self._mngr.wait_until_finished()
        except Exception as e:
            raise self._write_error(None, e) from e

    def _write_error(self, step: int | None, e: Exception) -> CheckpointError:
        what = f"step {step}" if step is not None else "a checkpoint"
        first = (str(e).splitlines() or [type(e).__name__])[0][:300]
        return CheckpointError(
            f"saving {what} to {self.directory} failed ({type(e).__name__}: {first}); "
            f"earlier checkpoints there are unchanged"
        )

    def close(self) -> None:
        try:
            self._mngr.close()  # waits for a pending save: its error surfaces here too
        except Exception as e:
            raise self._write_error(None, e) from e

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``tree`` (arrays or ShapeDtypeStructs) carrying ``shardings``."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
