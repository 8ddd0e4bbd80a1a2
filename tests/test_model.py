"""The model package: shapes, causality, the attention paths, the loss heads, layouts, dtypes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_jax.model import attention, losses
from gpt2_jax.model import gpt2 as m
from gpt2_jax.model.config import GPT2Config, size_fields

# Odd sizes catch shape bugs: 2 layers, 3 heads, n_embd 48, vocab not a power of two.
CFG = GPT2Config(vocab_size=97, n_positions=24, n_embd=48, n_layer=2, n_head=3, scan_layers=True)


@pytest.fixture(scope="module")
def params():
    return m.init_params(CFG, jax.random.PRNGKey(0))


def _ids(B=2, T=16, seed=1):
    return jax.random.randint(jax.random.PRNGKey(seed), (B, T), 0, CFG.vocab_size)


def test_shapes_and_names(params):
    logits = m.GPT2(CFG).apply({"params": params}, _ids())
    assert logits.shape == (2, 16, CFG.vocab_size) and logits.dtype == jnp.float32
    assert set(params) == {"wte", "wpe", "h", "ln_f"}
    assert params["wte"]["embedding"].shape == (97, 48)
    assert params["h"]["attn"]["c_attn"]["kernel"].shape == (2, 48, 144)
    assert params["h"]["mlp"]["c_fc"]["kernel"].shape == (2, 48, 192)
    assert params["h"]["mlp"]["c_proj"]["kernel"].shape == (2, 192, 48)
    assert "lm_head" not in params  # tied to wte


def test_causal(params):
    ids = _ids()
    base = m.GPT2(CFG).apply({"params": params}, ids)
    t = 7
    changed = ids.at[:, t + 1].set((ids[:, t + 1] + 1) % CFG.vocab_size)
    out = m.GPT2(CFG).apply({"params": params}, changed)
    np.testing.assert_allclose(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6)
    assert np.abs(np.asarray(out[:, t + 1] - base[:, t + 1])).max() > 1e-4


def test_dropout_only_when_asked(params):
    ids = _ids()
    det = m.GPT2(CFG).apply({"params": params}, ids)
    again = m.GPT2(CFG).apply({"params": params}, ids, deterministic=True)
    np.testing.assert_array_equal(det, again)
    drop1 = m.GPT2(CFG).apply(
        {"params": params}, ids, deterministic=False, rngs={"dropout": jax.random.PRNGKey(3)}
    )
    drop2 = m.GPT2(CFG).apply(
        {"params": params}, ids, deterministic=False, rngs={"dropout": jax.random.PRNGKey(3)}
    )
    np.testing.assert_array_equal(drop1, drop2)
    assert np.abs(np.asarray(drop1 - det)).max() > 1e-3


def test_scan_and_unrolled_agree(params):
    unrolled_cfg = GPT2Config(**{**CFG.__dict__, "scan_layers": False})
    unrolled = m.unstack_layers(params)
    assert sorted(k for k in unrolled if k.startswith("h_")) == ["h_0", "h_1"]
    ids = _ids()
    a = m.GPT2(CFG).apply({"params": params}, ids)
    b = m.GPT2(unrolled_cfg).apply({"params": unrolled}, ids)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    back = m.stack_layers(unrolled, CFG.n_layer)
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_token_nll_matches_hand_computed_cross_entropy():
    logits = jnp.array([[[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [1.0, 1.0, 1.0]]])  # [1, 3, 3]
    ids = jnp.array([[0, 2, 1]])
    nll = np.asarray(losses.token_nll(logits, ids))
    # position 0 predicts ids[1]=2; position 1 predicts ids[2]=1; the last logit is unused.
    p0 = np.exp([2.0, 0.5, -1.0]) / np.exp([2.0, 0.5, -1.0]).sum()
    p1 = np.exp([0.1, 0.2, 0.3]) / np.exp([0.1, 0.2, 0.3]).sum()
    np.testing.assert_allclose(nll, [[-np.log(p0[2]), -np.log(p1[1])]], rtol=1e-6)


def bf16_logit_problems(logits: np.ndarray, ref: np.ndarray) -> list[str]:
    """What is wrong with bf16-compute logits [B, T, V] against the fp32 ones ``ref``.

    bf16 keeps 8 significant bits: one rounding moves a value by up to 2**-9 of itself.
    This 2-layer model's correct bf16 forward lands within ~0.7 * 2**-8 * max|ref| of fp32
    (measured 0.0027 with max|ref| 0.95); the bound 3 * 2**-8 * max|ref| (0.011) leaves 4x
    for other XLA versions, and is ~13x tighter than the atol=0.1, rtol=0.05 it replaces
    (which let through logits off by as much as their own spread, 0.15).
    """
    problems = []
    err, bound = np.max(np.abs(logits - ref)), 3 * 2.0**-8 * np.max(np.abs(ref))
    if not err < bound:
        problems.append(f"max |bf16 - fp32| = {err:.4g} >= {bound:.4g}")
    if not err > 1e-4:  # fp32 reduction-order noise is ~1e-7: this was not computed in bf16
        problems.append(f"max |bf16 - fp32| = {err:.3g}: no bf16 rounding at all")
    # Logits that passed through bf16 (a head without float32 accumulation, or a cast
    # down and up) all lie on the bf16 grid; float32 accumulation almost never does.
    on_grid = np.mean(logits == logits.astype(jnp.bfloat16).astype(np.float32))
    if on_grid > 0.5:
        problems.append(f"{on_grid:.0%} of the logits are bf16 values")
    return problems


def test_bf16_compute_keeps_fp32_params_and_logits(params):
    cfg = GPT2Config(**{**CFG.__dict__, "dtype": "bfloat16"})
    logits = m.GPT2(cfg).apply({"params": params}, _ids())
    assert logits.dtype == jnp.float32
    ref = np.asarray(m.GPT2(CFG).apply({"params": params}, _ids()))
    assert bf16_logit_problems(np.asarray(logits), ref) == []
    fresh = m.init_params(cfg, jax.random.PRNGKey(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(fresh))

    # The check rejects the casts it is there for: the fp32 logits themselves (dtype
    # ignored), and a tied head that multiplies and accumulates in bf16.
    assert bf16_logit_problems(ref, ref) == ["max |bf16 - fp32| = 0: no bf16 rounding at all"]
    hidden = m.GPT2(cfg).apply({"params": params}, _ids(), return_hidden=True)  # bf16
    wte = params["wte"]["embedding"].astype(jnp.bfloat16)
    bf16_head = np.asarray(jnp.einsum("btc,vc->btv", hidden, wte).astype(jnp.float32))
    assert any("bf16 values" in p for p in bf16_logit_problems(bf16_head, ref))


def test_sequence_longer_than_positions_is_an_error(params):
    with pytest.raises(ValueError, match="n_positions"):
        m.GPT2(CFG).apply({"params": params}, jnp.zeros((1, CFG.n_positions + 1), jnp.int32))


def test_named_sizes_param_counts():
    # Hugging Face's counts for the tied models: 124M, 355M, 774M, 1558M.
    expected = {
        "gpt2": 124_439_808,
        "gpt2-medium": 354_823_168,
        "gpt2-large": 774_030_080,
        "gpt2-xl": 1_557_611_200,
    }
    for size, n in expected.items():
        cfg = GPT2Config(**size_fields(size))
        shapes = jax.eval_shape(functools.partial(m.init_params, cfg), jax.random.PRNGKey(0))
        assert m.count_params(shapes) == n, size


def test_config_validation_names_field():
    with pytest.raises(ValueError, match="n_embd=50 is not divisible by model.n_head=3"):
        GPT2Config(n_embd=50, n_head=3).validate()
    with pytest.raises(ValueError, match="model.size"):
        size_fields("gpt5")


def test_padded_training_head_equals_plain_logits_loss(params):
    ids = _ids()
    logits = m.GPT2(CFG).apply({"params": params}, ids)
    hidden = m.GPT2(CFG).apply({"params": params}, ids, return_hidden=True)
    assert losses.padded_vocab_size(CFG.vocab_size) == 128
    plain = losses.token_nll(logits, ids)
    padded = losses.hidden_token_nll(hidden, params["wte"]["embedding"], ids)
    np.testing.assert_allclose(padded, plain, rtol=1e-5, atol=1e-5)

    def loss_plain(p):
        return losses.token_nll(m.GPT2(CFG).apply({"params": p}, ids), ids).mean()

    def loss_padded(p):
        h = m.GPT2(CFG).apply({"params": p}, ids, return_hidden=True)
        return losses.hidden_token_nll(h, p["wte"]["embedding"], ids).mean()

    # jitted: one compile each instead of one per op of the eager backward pass.
    g1, g2 = jax.jit(jax.grad(loss_plain))(params), jax.jit(jax.grad(loss_padded))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g2)


@pytest.mark.parametrize("chunk", [7, 10, 1024])  # padded last chunk, exact split, plain head
def test_chunked_training_loss_equals_the_plain_head(params, chunk):
    ids = _ids(B=2, T=16)  # 30 predictions

    def plain(p):
        h = m.GPT2(CFG).apply({"params": p}, ids, return_hidden=True)
        return losses.hidden_token_nll(h, p["wte"]["embedding"], ids).mean()

    def chunked(p):
        h = m.GPT2(CFG).apply({"params": p}, ids, return_hidden=True)
        return losses.mean_token_nll(h, p["wte"]["embedding"], ids, chunk=chunk)

    (l1, g1), (l2, g2) = (jax.jit(jax.value_and_grad(f))(params) for f in (plain, chunked))
    np.testing.assert_allclose(l2, l1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7), g1, g2)
    # Scaled cotangents (a loss multiplied by a constant) scale the gradients.
    g3 = jax.jit(jax.grad(lambda p: 3.0 * chunked(p)))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, 3 * a, rtol=1e-4, atol=1e-7), g1, g3)


def test_cudnn_attention_falls_back_where_cudnn_is_absent():
    # On a machine without cuDNN the fused path declines (None) instead of failing, and
    # the model never asks for it off GPU.
    assert attention.cudnn_attention(jnp.ones((1, 4, 12)), 2) is None
    assert not attention.use_cudnn(GPT2Config(dtype="bfloat16")) or jax.default_backend() == "gpu"


def test_the_cudnn_branch_lays_out_heads_as_the_xla_attention_does():
    # The fused call takes [B, T, nh, hs] operands split from qkv its own way: through jax's
    # XLA implementation (the CPU has no cuDNN) it must equal the model's own attention.
    # tests/test_gpu.py holds the real cuDNN kernel to it on a GPU.
    qkv = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 3 * 3 * 4))
    fused = attention.cudnn_attention(qkv, 3, implementation="xla")
    np.testing.assert_allclose(fused, attention.xla_attention(qkv, 3), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scan", [True, False])
def test_packed_rows_score_as_separate_sequences(params, scan):
    """Three sequences in one row (own positions, a segment mask) give each one's logits."""
    cfg = GPT2Config(**{**CFG.__dict__, "scan_layers": scan, "remat": scan})
    p = params if scan else m.unstack_layers(params)
    a, b, c = _ids(1, 7, 2), _ids(1, 11, 3), _ids(1, 4, 4)
    row = jnp.concatenate([a, b, c, jnp.zeros((1, 2), a.dtype)], axis=1)  # + 2 padding
    positions = jnp.concatenate([jnp.arange(7), jnp.arange(11), jnp.arange(4), jnp.zeros(2, int)])
    segments = jnp.asarray([0] * 7 + [1] * 11 + [2] * 4 + [-1] * 2)
    apply = functools.partial(m.GPT2(cfg).apply, {"params": p})
    packed = apply(row, positions=positions[None], segment_ids=segments[None])
    for x, (lo, hi) in ((a, (0, 7)), (b, (7, 18)), (c, (18, 22))):
        np.testing.assert_allclose(packed[:, lo:hi], apply(x), rtol=1e-5, atol=1e-6)
    whole = apply(row)  # without the mask, b sees a: different
    assert np.abs(np.asarray(whole[:, 7:18] - packed[:, 7:18])).max() > 1e-4


@pytest.mark.parametrize("T", [5, 128, 300])
def test_blocked_attention_equals_the_plain_attention(T):
    """Inference attention (query blocks, keys up to the block's end, the softmax divided
    after the value matmul) against the training one, with and without a segment mask."""
    qkv = jax.random.normal(jax.random.PRNGKey(T), (2, T, 3 * 48))
    segments = (jnp.arange(T)[None, :] >= jnp.asarray([[T // 3], [T // 2]])).astype(int)
    for seg in (None, segments):
        want = attention.xla_attention(qkv, 3, None, seg)
        got = attention.blocked_attention(qkv, 3, seg, block=128)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    small = attention.blocked_attention(qkv, 3, None, block=16)
    np.testing.assert_allclose(small, attention.xla_attention(qkv, 3), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head_rows", [4, 6, 2048])  # chunks of 1, 2 and all 6 positions
def test_scored_logprobs_equal_the_full_logits_head(params, head_rows):
    """The harness's head (chosen positions and targets, chunked, never the [B, T, V]
    logits) against log_softmax of the model's own logits, gathered."""
    ids = _ids(B=3, T=16)
    hidden = m.GPT2(CFG).apply({"params": params}, ids, return_hidden=True)  # [3, 16, 48]
    logits = np.asarray(m.GPT2(CFG).apply({"params": params}, ids), np.float64)  # [3, 16, 97]
    pos = np.asarray([[0, 3, 4, 9, 12, 15], [2, 2, 7, 8, 13, 14], [1, 5, 6, 10, 11, 0]], np.int32)
    rows = np.arange(3)[:, None]
    # Half the targets are the argmax, so both greedy outcomes are checked.
    noise = np.asarray(_ids(B=3, T=6, seed=7))
    targets = np.where(np.arange(6) % 2 == 0, logits[rows, pos].argmax(-1), noise).astype(np.int32)
    wte = params["wte"]["embedding"]
    logprob, greedy = losses.scored_logprobs(wte, hidden, pos, targets, head_rows)
    assert logprob.shape == greedy.shape == (3, 6) and logprob.dtype == jnp.float32
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = log_softmax[rows, pos, targets]
    np.testing.assert_allclose(logprob, want, rtol=1e-6)
    np.testing.assert_array_equal(greedy, logits[rows, pos].argmax(-1) == targets)
    assert greedy.any() and not greedy.all()
