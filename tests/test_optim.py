"""Schedules, decay mask, clipping."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from gpt2_jax.optim import optimizer as optim


def _cfg(**kw):
    c = ml_collections.ConfigDict(
        dict(
            learning_rate=1e-3,
            warmup_steps=10,
            schedule="linear",
            min_lr_ratio=0.1,
            weight_decay=0.1,
            decay_embeddings=False,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            grad_clip=1.0,
        )
    )
    c.update(kw)
    return c


def test_linear_schedule_matches_hf_get_linear_schedule_with_warmup():
    total, warm, lr = 100, 10, 1e-3
    sched = optim.make_schedule(_cfg(), total)

    def hf(step):  # transformers.get_linear_schedule_with_warmup's lr_lambda * lr
        if step < warm:
            return lr * step / warm
        return lr * max(0.0, (total - step) / (total - warm))

    for s in [0, 1, 5, 10, 11, 50, 99, 100]:
        np.testing.assert_allclose(float(sched(s)), hf(s), rtol=1e-5, atol=1e-12)


def test_cosine_schedule_ends_at_floor():
    sched = optim.make_schedule(_cfg(schedule="cosine"), 100)
    np.testing.assert_allclose(float(sched(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(sched(100)), 1e-4, rtol=1e-5)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="optim.schedule"):
        optim.make_schedule(_cfg(schedule="poly"), 10)


def test_decay_mask_spares_biases_layernorm_embeddings():
    params = {
        "wte": {"embedding": 1},
        "h": {"ln_1": {"scale": 1, "bias": 1}, "attn": {"c_attn": {"kernel": 1, "bias": 1}}},
    }
    mask = optim.decay_mask(params)
    assert mask == {
        "wte": {"embedding": False},
        "h": {
            "ln_1": {"scale": False, "bias": False},
            "attn": {"c_attn": {"kernel": True, "bias": False}},
        },
    }
    assert optim.decay_mask(params, decay_embeddings=True)["wte"]["embedding"] is True


def test_weight_decay_applies_to_kernels_only():
    tx, _ = optim.make_optimizer(
        _cfg(warmup_steps=0, schedule="constant", grad_clip=0.0, weight_decay=0.5), 10
    )
    params = {"d": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["d"]["kernel"], -1e-3 * 0.5, rtol=1e-6)
    np.testing.assert_array_equal(updates["d"]["bias"], 0.0)


def test_clipping_bounds_the_global_norm():
    # Adam's first moment after one step is (1 - b1) * the (clipped) gradient.
    grads = {"a": jnp.full((4,), 10.0)}  # global norm 20
    for clip, norm in ((1.0, 1.0), (0.0, 20.0)):
        tx, _ = optim.make_optimizer(_cfg(grad_clip=clip), 10)
        _, state = tx.update(grads, tx.init(grads), grads)
        mu = optax.tree_utils.tree_get(state, "mu")
        np.testing.assert_allclose(float(optax.global_norm(mu)), 0.1 * norm, rtol=1e-5)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),  # clip on, decay on kernels
        dict(grad_clip=0.0, weight_decay=0.0),
        dict(grad_clip=0.5, decay_embeddings=True, schedule="cosine"),
    ],
)
def test_fused_update_equals_the_optax_chain(kw):
    # The fused per-leaf update must give optax's numbers and state, step after step,
    # with clipping both triggered (large gradients) and not (small ones).
    cfg = _cfg(**kw)
    tx, schedule = optim.make_optimizer(cfg, 20)
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(
        optax.adamw(
            schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
            mask=lambda p: optim.decay_mask(p, cfg.decay_embeddings),
        )
    )  # fmt: skip
    ref = optax.chain(*parts)
    params = {
        "wte": {"embedding": jnp.linspace(-1, 1, 12).reshape(4, 3)},
        "d": {"kernel": jnp.linspace(0.5, -0.5, 6).reshape(3, 2), "bias": jnp.ones(2)},
    }
    p_fused, s_fused = params, tx.init(params)
    p_ref, s_ref = params, ref.init(params)
    assert jax.tree.structure(s_fused) == jax.tree.structure(s_ref)  # checkpoints interchange
    for i in range(6):
        scale = 5.0 if i % 2 else 0.01
        grads = jax.tree.map(
            lambda x, i=i, scale=scale: scale * jax.random.normal(jax.random.PRNGKey(i), x.shape),
            params,
        )
        p_fused, s_fused = jax.jit(tx.apply)(grads, s_fused, p_fused)
        updates, s_ref = jax.jit(ref.update)(grads, s_ref, p_ref)
        p_ref = optax.apply_updates(p_ref, updates)
        # The `update` half (optax's interface) gives the same step as `apply`.
        if i == 0:
            u, _ = tx.update(grads, tx.init(params), params)
            u_ref, _ = ref.update(grads, ref.init(params), params)
            for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(u_ref), strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    for a, b in zip(
        jax.tree.leaves((p_fused, s_fused)), jax.tree.leaves((p_ref, s_ref)), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
