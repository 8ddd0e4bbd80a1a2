"""The train step: a pure function of (state, batch), and the one builder that compiles it.

``train_step`` is one optimizer update, gradient accumulation scanned inside it;
``build_step(plan)`` makes the optimizer, the abstract state, shardings, donation, jit and
the ahead-of-time compile, once a run (the loop runs it; ``preflight.check_step`` reads it).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gpt2_jax.config import plan as plan_lib
from gpt2_jax.model import config as gpt2_config
from gpt2_jax.model import gpt2 as model_lib
from gpt2_jax.model import losses as losses_lib
from gpt2_jax.optim import optimizer as optim
from gpt2_jax.parallel import sharding

TrainState = dict[str, Any]  # {"step": int32[], "params": ..., "opt_state": ..., "rng": uint32[2]}


# ------------------------------------------------------------------ pure functions


def init_state(
    rng: jax.Array,
    *,
    model_cfg: gpt2_config.GPT2Config,
    tx: optax.GradientTransformation,
    params=None,
) -> TrainState:
    """A fresh train state (random params unless ``params`` is given)."""
    init_rng, train_rng = jax.random.split(rng)
    if params is None:
        params = model_lib.init_params(model_cfg, init_rng)
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "rng": train_rng,
    }


def loss_fn(
    params,
    batch: jax.Array,
    dropout_rng: jax.Array,
    *,
    model_cfg: gpt2_config.GPT2Config,
    deterministic: bool = False,
) -> jax.Array:
    """Mean next-token cross-entropy over a batch [B, T] (each block's T-1 predictions)."""
    hidden = model_lib.GPT2(model_cfg).apply(
        {"params": params},
        batch,
        deterministic=deterministic,
        return_hidden=True,
        rngs={"dropout": dropout_rng},
    )
    return losses_lib.mean_token_nll(hidden, params["wte"]["embedding"], batch)


def train_step(
    state: TrainState,
    batch: jax.Array,
    *,
    model_cfg: gpt2_config.GPT2Config,
    tx: optax.GradientTransformation,
    skip_nonfinite: bool = False,
) -> tuple[TrainState, dict]:
    """One optimizer update from ``batch`` [accum, micro_batch, T] int32.

    Gradients of the ``accum`` microbatches are averaged by a scan inside the step (every
    block has the same T-1 targets, so this is the mean over all tokens).
    ``skip_nonfinite``: a non-finite loss or gradient norm leaves params and optimizer
    state as they were (the step counter still advances).
    """
    rng = jax.random.fold_in(state["rng"], state["step"])
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, model_cfg=model_cfg))
    accum = batch.shape[0]
    params = state["params"]

    if accum == 1:
        loss, grads = grad_fn(params, batch[0], jax.random.fold_in(rng, 0))
    else:

        def micro(carry, xs):
            mb, i = xs
            loss_i, grads_i = grad_fn(params, mb, jax.random.fold_in(rng, i))
            return jax.tree.map(jnp.add, carry, (loss_i, grads_i)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (loss, grads), _ = jax.lax.scan(micro, zeros, (batch, jnp.arange(accum)))
        loss, grads = jax.tree.map(lambda x: x / accum, (loss, grads))

    grad_norm = optax.global_norm(grads)
    new_params, opt_state = tx.apply(grads, state["opt_state"], params)  # optim.Fused...
    if skip_nonfinite:
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(ok, new, old))
        new_params, opt_state = keep(new_params, params), keep(opt_state, state["opt_state"])
    new_state = {
        "step": state["step"] + 1,
        "params": new_params,
        "opt_state": opt_state,
        "rng": state["rng"],
    }
    return new_state, {"loss": loss, "grad_norm": grad_norm}


# ------------------------------------------------------------------ the step builder


@dataclasses.dataclass(frozen=True)
class Step:
    """The compiled train step and what it was built from (``build_step``, once a run)."""

    compiled: Any  # compiled(state, batch) -> (state, metrics); the state is donated
    tx: Any  # optim.FusedTransformation
    schedule: Callable[[int], Any]
    mesh: jax.sharding.Mesh
    abstract_fn: Callable  # model config -> the abstract train state (restores use it)
    state_shardings: Any
    batch_sharding: jax.sharding.NamedSharding
    abstract_state: Any  # ShapeDtypeStructs with their shardings
    abstract_batch: jax.ShapeDtypeStruct


def build_step(plan: plan_lib.Plan) -> Step:
    """Optimizer, abstract state, shardings, donation, jit and the ahead-of-time compile
    of ``train_step`` for ``plan``: the one place the step is made (the loop runs it,
    ``preflight.check_step`` reads it)."""
    tx, schedule = optim.make_optimizer(plan.optim, plan.total_steps)
    mesh = sharding.mesh_of(plan.mesh_shape)
    rng = jax.random.PRNGKey(plan.train.seed)

    def abstract_fn(model_cfg):
        return jax.eval_shape(functools.partial(init_state, model_cfg=model_cfg, tx=tx), rng)

    abstract = abstract_fn(plan.model)
    state_sh = sharding.state_sharding(mesh, abstract)
    batch_sh = sharding.batch_sharding(mesh, leading=1)
    accum = plan.optim.accumulation_steps
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh
    )
    abstract_batch = jax.ShapeDtypeStruct(
        (accum, plan.micro_batch, plan.data.block_size), np.int32, sharding=batch_sh
    )
    skip = plan.train.nonfinite == "skip"
    jitted = jax.jit(
        functools.partial(train_step, model_cfg=plan.model, tx=tx, skip_nonfinite=skip),
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, None),
        donate_argnums=0,
    )
    compiled = jitted.lower(abstract_state, abstract_batch).compile()
    return Step(
        compiled, tx, schedule, mesh, abstract_fn, state_sh, batch_sh, abstract_state,
        abstract_batch,
    )  # fmt: skip
