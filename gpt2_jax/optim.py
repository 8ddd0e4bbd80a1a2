"""Optimizer: optax AdamW with a decay mask, warmup + decay schedule, global-norm clipping.

Gradient accumulation is not an optax wrapper here: ``train.train_step`` scans over
microbatches inside the one jitted step (one optimizer update per step, no extra state).
"""

from __future__ import annotations

import optax
from flax import traverse_util

SCHEDULES = ("cosine", "linear", "constant")


def make_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """Learning rate as a function of the update count.

    Warmup is linear from 0 to ``learning_rate`` over ``warmup_steps``; then
    ``cosine`` decays to ``learning_rate * min_lr_ratio`` at ``total_steps``,
    ``linear`` decays to 0 at ``total_steps`` (Hugging Face Trainer's
    ``get_linear_schedule_with_warmup``), ``constant`` stays.
    """
    lr, warmup = float(optim_cfg.learning_rate), int(optim_cfg.warmup_steps)
    decay_steps = max(total_steps - warmup, 1)
    if optim_cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, decay_steps, alpha=float(optim_cfg.min_lr_ratio))
    elif optim_cfg.schedule == "linear":
        after = optax.linear_schedule(lr, 0.0, decay_steps)
    elif optim_cfg.schedule == "constant":
        after = optax.constant_schedule(lr)
    else:
        raise ValueError(f"optim.schedule={optim_cfg.schedule!r} is not one of {SCHEDULES}")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def decay_mask(params, decay_embeddings: bool = False):
    """True where weight decay applies: Dense kernels (and embeddings if asked).

    Biases and LayerNorm scales never decay (as in GPT-2 recipes and HF's Trainer).
    """
    flat = traverse_util.flatten_dict(params)

    def decays(path) -> bool:
        leaf = path[-1]
        if leaf == "kernel":
            return True
        return leaf == "embedding" and decay_embeddings

    return traverse_util.unflatten_dict({k: decays(k) for k in flat})


def make_optimizer(
    optim_cfg, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax chain for ``optim_cfg`` and its learning-rate schedule."""
    schedule = make_schedule(optim_cfg, total_steps)
    parts = []
    if optim_cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(float(optim_cfg.grad_clip)))
    parts.append(
        optax.adamw(
            schedule,
            b1=float(optim_cfg.b1),
            b2=float(optim_cfg.b2),
            eps=float(optim_cfg.eps),
            weight_decay=float(optim_cfg.weight_decay),
            mask=lambda p: decay_mask(p, bool(optim_cfg.decay_embeddings)),
        )
    )
    return optax.chain(*parts), schedule
