"""The train step: a pure function of (state, batch), and the one builder that compiles it.

``train_step`` is one optimizer update, gradient accumulation scanned inside it;
``build_step(plan)`` makes the optimizer, the abstract state, shardings, donation, jit and
the ahead-of-time compile, once a run (the loop runs it; ``preflight.check_step`` reads it).

LoRA (``model_cfg.lora``): the state's ``params`` are the adapters alone (so the optimizer
state is theirs alone), and the frozen base params are a third argument of the step,
``train_step(state, batch, base)``, sharded as the state is and never donated: the
gradient is taken of the adapters only, the base is a constant of it. Without LoRA the
step is called and compiled exactly as before, ``train_step(state, batch)``.
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
from gpt2_jax.data.tokenizer import EOT_ID
from gpt2_jax.model import attention, lora
from gpt2_jax.model import config as gpt2_config
from gpt2_jax.model import gpt2 as model_lib
from gpt2_jax.model import losses as losses_lib
from gpt2_jax.optim import optimizer as optim
from gpt2_jax.parallel import sharding

# {"step": int32[], "params": ..., "opt_state": ..., "rng": uint32[2]}; LoRA: params = adapters
TrainState = dict[str, Any]


# ------------------------------------------------------------------ pure functions


def init_state(
    rng: jax.Array,
    *,
    model_cfg: gpt2_config.GPT2Config,
    tx: optax.GradientTransformation,
    params=None,
) -> TrainState:
    """A fresh train state (random params unless ``params`` is given). LoRA: ``params``
    are the adapters (fresh ones: ``lora.init_adapters``, A random and B zero)."""
    init_rng, train_rng = jax.random.split(rng)
    if params is None and model_cfg.lora is not None:
        params = lora.init_adapters(model_cfg.lora, model_cfg, init_rng, model_cfg.scan_layers)
    elif params is None:
        params = model_lib.init_params(model_cfg, init_rng)
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "rng": train_rng,
    }


def loss_fn(
    params,
    batch,
    dropout_rng: jax.Array,
    *,
    model_cfg: gpt2_config.GPT2Config,
    deterministic: bool = False,
    document_mask: bool = False,
    num_targets: jax.Array | None = None,
    base=None,
) -> jax.Array:
    """The loss of one microbatch. ``base``: LoRA's frozen params, ``params`` then the
    adapters (``{"params": base, "lora": params}``; the head is the base's ``wte``).

    ``batch`` [B, T] int (the text format): the mean next-token cross-entropy over each
    block's T - 1 predictions; with ``document_mask`` attention and positions restart at
    every ``<|endoftext|>`` (``attention.document_segments``), every prediction still a
    target. ``batch`` a dict (the SFT formats, ``data.examples``: ``input_ids``,
    ``loss_mask``, and packed ``positions``, ``segment_ids``, all [B, T]): the sum of the
    targets' NLLs divided by ``num_targets``, the target count of the whole step's batch.
    """
    if isinstance(batch, dict):
        ids, positions, segments = batch["input_ids"], batch.get("positions"), batch.get("segment_ids")
    else:
        ids, positions, segments = batch, None, None
        if document_mask:
            positions, segments = attention.document_segments(ids, EOT_ID)
    variables = {"params": params} if base is None else {"params": base, lora.COLLECTION: params}
    hidden = model_lib.GPT2(model_cfg).apply(
        variables,
        ids,
        deterministic=deterministic,
        return_hidden=True,
        positions=positions,
        segment_ids=segments,
        rngs={"dropout": dropout_rng},
    )
    wte = (params if base is None else base)["wte"]["embedding"]
    if not isinstance(batch, dict):
        return losses_lib.mean_token_nll(hidden, wte, ids)
    weights = batch["loss_mask"][:, 1:].astype(jnp.float32) / num_targets
    return losses_lib.weighted_token_nll_sum(hidden, wte, ids, weights)


def count_targets(batch) -> jax.Array | None:
    """The target tokens of a step's whole batch (at least 1: no targets gives loss 0, not
    NaN); None for the text format, whose loss is a mean of means."""
    if not isinstance(batch, dict):
        return None
    return jnp.maximum(jnp.sum(batch["loss_mask"], dtype=jnp.float32), 1.0)


def train_step(
    state: TrainState,
    batch: jax.Array,
    base=None,
    *,
    model_cfg: gpt2_config.GPT2Config,
    tx: optax.GradientTransformation,
    skip_nonfinite: bool = False,
    document_mask: bool = False,
) -> tuple[TrainState, dict]:
    """One optimizer update from ``batch`` [accum, micro_batch, T] int32 (or, the SFT
    formats, a dict of such arrays: ``loss_fn``).

    Gradients of the ``accum`` microbatches are accumulated by a scan inside the step. Text:
    averaged (every block has the same T-1 targets, so this is the mean over all tokens).
    SFT: summed, each microbatch's sum already divided by the target count of the whole
    batch, so any ``accum`` gives the same mean over its targets (``num_items_in_batch``).
    ``skip_nonfinite``: a non-finite loss or gradient norm leaves params and optimizer
    state as they were (the step counter still advances). ``base``: LoRA's frozen params
    (``state["params"]`` are then the adapters, the only arguments differentiated).
    """
    rng = jax.random.fold_in(state["rng"], state["step"])
    num_targets = count_targets(batch)
    frozen = {} if base is None else {"base": base}
    grad_fn = jax.value_and_grad(
        functools.partial(
            loss_fn, model_cfg=model_cfg, document_mask=document_mask, num_targets=num_targets,
            **frozen,
        )  # fmt: skip
    )
    accum = jax.tree.leaves(batch)[0].shape[0]
    params = state["params"]

    if accum == 1:
        loss, grads = grad_fn(params, jax.tree.map(lambda x: x[0], batch), jax.random.fold_in(rng, 0))
    else:

        def micro(carry, xs):
            mb, i = xs
            loss_i, grads_i = grad_fn(params, mb, jax.random.fold_in(rng, i))
            return jax.tree.map(jnp.add, carry, (loss_i, grads_i)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (loss, grads), _ = jax.lax.scan(micro, zeros, (batch, jnp.arange(accum)))
        if num_targets is None:  # text: the mean of the microbatches' means
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


def batch_spec(plan: plan_lib.Plan, lead: tuple[int, ...], batch_sh=None):
    """The abstract batch of ``plan``'s data: [*lead, T] int32 token blocks (text), or the
    SFT formats' dict (``data.examples.Examples``' arrays)."""
    shape = (*lead, plan.data.block_size)

    def spec(dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sh)

    if not plan.data.examples:
        return spec(np.int32)
    out = {"input_ids": spec(np.int32), "loss_mask": spec(np.bool_)}
    if plan.data.packing:
        out.update(positions=spec(np.int32), segment_ids=spec(np.int32))
    return out


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
    base_shardings: Any = None  # LoRA: the frozen base params' shardings (else None)
    abstract_base: Any = None  # LoRA: the base params' ShapeDtypeStructs with their shardings


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
    abstract_batch = batch_spec(plan, (accum, plan.micro_batch), batch_sh)
    skip = plan.train.nonfinite == "skip"
    doc = plan.data.document_mask
    base_sh, abstract_base = _base_spec(plan, mesh)
    frozen = () if base_sh is None else (base_sh,)  # LoRA's base: a third argument
    jitted = jax.jit(
        functools.partial(
            train_step, model_cfg=plan.model, tx=tx, skip_nonfinite=skip, document_mask=doc
        ),
        in_shardings=(state_sh, batch_sh, *frozen),
        out_shardings=(state_sh, None),
        donate_argnums=0,
    )
    base_args = () if abstract_base is None else (abstract_base,)
    compiled = jitted.lower(abstract_state, abstract_batch, *base_args).compile()
    return Step(
        compiled, tx, schedule, mesh, abstract_fn, state_sh, batch_sh, abstract_state,
        abstract_batch, base_sh, abstract_base,
    )  # fmt: skip


def base_params_spec(model_cfg: gpt2_config.GPT2Config) -> Any:
    """The abstract params of a LoRA run's base: ``model_cfg`` without the adapters."""
    plain = dataclasses.replace(model_cfg, lora=None)
    return jax.eval_shape(functools.partial(model_lib.init_params, plain), jax.random.PRNGKey(0))


def _base_spec(plan: plan_lib.Plan, mesh) -> tuple[Any, Any]:
    """(shardings, abstract arrays with them) of a LoRA run's frozen base params, sharded
    by the state's rules (FSDP splits them as it splits full fine-tuning's); (None, None)
    without LoRA."""
    if plan.model.lora is None:
        return None, None
    abstract = base_params_spec(plan.model)
    shardings = sharding.state_sharding(mesh, abstract)
    return shardings, jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
