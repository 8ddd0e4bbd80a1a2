"""Checks that need a GPU (``pytest -m gpu``; experiments/gpu/run.sh runs them there).

cuDNN attention against the XLA attention (forward, gradients, bf16, causal) and its
fallback, bf16 training against fp32, the memory preflight on the GPU's ``bytes_limit``,
greedy generation and checkpoints between the GPU and a CPU-only process, the train loop's
MFU against the device's peak.

``GPT2_JAX_GPU`` picks the mode:
  unset     on a GPU when jax has one; else every test skips with the reason (conftest's
            no-skip rule exempts that one reason; `make test` deselects these tests)
  require   a GPU must be there (run.sh on the GPU machine): none is a failure
  dry-run   the CPU stands in, at tiny shapes (run.sh --dry-run, which `make test` runs):
            every test runs its code path, with cuDNN's kernel stood in by jax's XLA
            attention (the same reshapes and call) and the CPU's MemAvailable as the budget

Tolerances are stated where they are used. Relative errors are ||a - b|| / ||b|| in float64
against a float32 reference at ``precision="highest"`` on the same device, from the same
bf16-rounded inputs; bf16 operands land between 1e-3 and 1e-2 (the device notes' METHOD.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_jax.config import base as config_lib
from gpt2_jax.config import plan as plan_lib
from gpt2_jax.evaluation import generate as gen
from gpt2_jax.model import attention, flops
from gpt2_jax.model import attention as attention_lib
from gpt2_jax.model import config as gpt2_config
from gpt2_jax.model import gpt2 as model_lib
from gpt2_jax.optim import optimizer as optim
from gpt2_jax.train import loop as train_lib
from gpt2_jax.train import preflight
from gpt2_jax.train import step as step_lib
from gpt2_jax.weights import checkpoint as ckpt_lib

from . import cpu_side
from .conftest import NO_GPU
from .helpers import ROOT, tiny_config, wiki_ids

pytestmark = pytest.mark.gpu

MODE = os.environ.get("GPT2_JAX_GPU", "")
MODES = ("", "require", "dry-run")


@dataclasses.dataclass(frozen=True)
class Accel:
    device: jax.Device
    dry: bool  # the CPU standing in for the GPU (GPT2_JAX_GPU=dry-run)

    def shapes(self, gpu, dry):
        return dry if self.dry else gpu


@pytest.fixture(scope="module")
def accel() -> Accel:
    if MODE not in MODES:
        pytest.fail(f"GPT2_JAX_GPU={MODE!r}: not one of {MODES}")
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:  # no GPU backend at all
        gpus = []
    if gpus:
        return Accel(gpus[0], dry=False)
    if MODE == "dry-run":
        return Accel(jax.devices("cpu")[0], dry=True)
    if MODE == "require":
        pytest.fail(f"GPT2_JAX_GPU=require, but jax sees no GPU: {jax.devices()}")
    pytest.skip(f"{NO_GPU} ({jax.devices()[0].platform} only); experiments/gpu/run.sh runs it")


def _rel(a, b) -> float:
    """||a - b|| / ||b|| in float64 (a, b: arrays or pytrees of the same structure)."""
    a = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(a)])
    b = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(b)])
    assert np.isfinite(a).all(), "non-finite values"
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _fused(accel: Accel):
    """cuDNN's attention on the GPU; on the dry run the same call through jax's XLA one."""
    impl = "xla" if accel.dry else "cudnn"
    return functools.partial(attention_lib.cudnn_attention, implementation=impl)


def _cfg(**fields) -> gpt2_config.GPT2Config:
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return gpt2_config.GPT2Config(**{**no_dropout, **fields})


# ---------------------------------------------------------------- cuDNN attention

# jax lowers its cuDNN attention to custom calls __cudnn$fmhaSoftmax (forward) and
# __cudnn$fmhaSoftmaxBackward (jax 0.10 to 0.12, jax/_src/cudnn/fused_attention_stablehlo.py).
CUDNN_FMHA = "__cudnn$fmhaSoftmax"
ATT_FWD_TOL = 1e-2  # bf16 attention output vs the fp32 reference
ATT_GRAD_TOL = 2e-2  # its gradient with respect to qkv


def test_cudnn_attention_matches_xla_forward_and_gradients(accel, record_property):
    # GPT-2 124M's attention (B=4, T=1024, 12 heads of 64) on the GPU.
    B, T, nh, hs = accel.shapes((4, 1024, 12, 64), (2, 64, 2, 16))
    rng = np.random.default_rng(0)
    qkv = jnp.asarray(rng.standard_normal((B, T, 3 * nh * hs)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((B, T, nh * hs)), jnp.float32)  # d loss / d y
    fused = _fused(accel)

    def xla(x):
        return attention_lib.xla_attention(x, nh)

    def fused_nh(x):
        return fused(x, nh)

    def grad_of(f):
        return jax.jit(jax.grad(lambda x: jnp.sum(f(x).astype(jnp.float32) * w)))

    if jax.eval_shape(fused_nh, qkv) is None:
        pytest.fail("cuDNN declined GPT-2's own attention shape")
    lowered = jax.jit(fused_nh).lower(qkv)
    fwd = lowered.compile()  # compiled once, run twice
    y_fused = fwd(qkv)
    y_xla = jax.jit(xla)(qkv)
    g_fused, g_xla = grad_of(fused_nh)(qkv), grad_of(xla)(qkv)
    with jax.default_matmul_precision("highest"):
        x32 = qkv.astype(jnp.float32)  # the same (bf16-rounded) inputs, fp32 arithmetic
        y_ref, g_ref = jax.jit(xla)(x32), grad_of(xla)(x32)
    errors = {
        "forward fused": _rel(y_fused, y_ref),
        "forward xla": _rel(y_xla, y_ref),
        "grad fused": _rel(g_fused, g_ref),
        "grad xla": _rel(g_xla, g_ref),
    }
    record_property("rel_errors_vs_fp32", errors)
    assert errors["forward fused"] <= ATT_FWD_TOL and errors["forward xla"] <= ATT_FWD_TOL, errors
    assert errors["grad fused"] <= ATT_GRAD_TOL and errors["grad xla"] <= ATT_GRAD_TOL, errors
    assert y_fused.dtype == jnp.bfloat16 and y_fused.shape == (B, T, nh * hs)
    # Causal: the first half of the sequence does not depend on the second half.
    cut = T // 2
    changed = qkv.at[:, cut:].set(0)
    np.testing.assert_array_equal(
        np.asarray(fwd(changed)[:, :cut], np.float32), np.asarray(y_fused[:, :cut], np.float32)
    )
    if not accel.dry:  # the program really calls cuDNN's fused attention
        assert CUDNN_FMHA in lowered.as_text(), "no cuDNN attention call in the program"


MODEL_LOSS_TOL = 2e-2  # |loss(cuDNN path) - loss(XLA path)|, both bf16, nats
MODEL_GRAD_TOL = 5e-2  # relative difference of their parameter gradients


def test_the_model_uses_cudnn_in_bf16_and_matches_its_xla_path(accel, monkeypatch, record_property):
    cfg = _cfg(
        **accel.shapes(
            dict(n_layer=2, n_head=4, n_embd=256, n_positions=256),
            dict(n_layer=1, n_head=2, n_embd=64, n_positions=32, vocab_size=512),
        ),
        dtype="bfloat16",
    )
    B, T = 4, cfg.n_positions
    params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
    ids = jnp.asarray(wiki_ids(B * T).reshape(B, T) % cfg.vocab_size)
    key = jax.random.PRNGKey(1)

    def value_and_grads():
        # A new function each time: jax.jit must trace again under the patched branch.
        f = jax.value_and_grad(
            lambda p, x: step_lib.loss_fn(p, x, key, model_cfg=cfg, deterministic=True)
        )
        return jax.jit(f).lower(params, ids)

    if accel.dry:  # the cuDNN branch of Attention, with its kernel stood in
        monkeypatch.setattr(attention, "use_cudnn", lambda c: True)
        monkeypatch.setattr(attention, "cudnn_attention", _fused(accel))
    assert attention.use_cudnn(cfg)
    lowered = value_and_grads()
    loss_c, grads_c = lowered.compile()(params, ids)
    if not accel.dry:  # forward and backward through cuDNN
        assert f"{CUDNN_FMHA}Backward" in lowered.as_text(), "the model did not use cuDNN"
    monkeypatch.setattr(attention, "use_cudnn", lambda c: False)
    lowered = value_and_grads()
    assert CUDNN_FMHA not in lowered.as_text()
    loss_x, grads_x = lowered.compile()(params, ids)
    diff, grad_rel = abs(float(loss_c) - float(loss_x)), _rel(grads_c, grads_x)
    record_property("loss_abs_diff", diff)
    record_property("grads_rel_diff", grad_rel)
    assert math.isfinite(float(loss_c)) and diff <= MODEL_LOSS_TOL, (float(loss_c), float(loss_x))
    assert grad_rel <= MODEL_GRAD_TOL, grad_rel


def test_cudnn_declines_and_the_model_falls_back(accel, monkeypatch):
    # Refused while tracing, forward and backward: a head size that is no multiple of 8,
    # and float32 operands (cuDNN's fused attention takes fp16/bf16 only). On the dry
    # run's CPU there is no cuDNN at all: refused too.
    assert attention_lib.cudnn_attention(jnp.ones((1, 16, 3 * 2 * 12), jnp.bfloat16), 2) is None
    assert attention_lib.cudnn_attention(jnp.ones((1, 16, 3 * 2 * 64), jnp.float32), 2) is None
    cfg = _cfg(n_layer=1, n_head=2, n_embd=24, n_positions=32, vocab_size=512, dtype="bfloat16")
    params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 32)), jnp.int32)

    def lowered_step():
        loss = functools.partial(step_lib.loss_fn, model_cfg=cfg, deterministic=True)
        f = jax.value_and_grad(lambda p, x: loss(p, x, jax.random.PRNGKey(0)))
        return jax.jit(f).lower(params, ids)

    monkeypatch.setattr(attention, "use_cudnn", lambda c: True)  # asks cuDNN first
    asked = lowered_step()
    monkeypatch.setattr(attention, "use_cudnn", lambda c: False)  # XLA's attention only
    # The declined shape compiles the XLA program, op for op, and runs.
    assert asked.as_text() == lowered_step().as_text()
    loss, _ = asked.compile()(params, ids)
    assert math.isfinite(float(loss))


# ---------------------------------------------------------------- bf16 training

TRAIN_STEPS = 30
BF16_LOSS_TOL = 0.05  # |bf16 loss - fp32 loss| at every one of the 30 steps, nats
BF16_LEARNS = 0.05  # both runs' loss falls by at least this fraction over the 30 steps


def _train_losses(cfg, params, tx, batches, precision=None) -> np.ndarray:
    state = step_lib.init_state(jax.random.PRNGKey(0), model_cfg=cfg, tx=tx, params=params)
    step = jax.jit(functools.partial(step_lib.train_step, model_cfg=cfg, tx=tx))
    losses = []
    ctx = jax.default_matmul_precision(precision) if precision else contextlib.nullcontext()
    with ctx:
        for b in batches:
            state, m = step(state, b)
            losses.append(m["loss"])
    return np.asarray(jax.device_get(losses), np.float64)


def test_bf16_training_tracks_fp32(accel, record_property):
    shape = accel.shapes(
        dict(n_layer=2, n_head=4, n_embd=256, n_positions=256),  # heads of 64: cuDNN's path
        # The dry run's CPU emulates bf16 slowly: a 512-token vocabulary (ids folded into it).
        dict(n_layer=1, n_head=2, n_embd=64, n_positions=32, vocab_size=512),
    )
    B, T = accel.shapes(8, 4), shape["n_positions"]
    blocks = wiki_ids(37000 // T * T).reshape(-1, T) % shape.get("vocab_size", 50257)
    order = np.random.default_rng(0).integers(0, len(blocks), (TRAIN_STEPS, B))
    batches = [jnp.asarray(blocks[i][None]) for i in order]  # [1, B, T] each
    ocfg = config_lib.base_config().optim
    ocfg.learning_rate, ocfg.schedule = 1e-3, "constant"
    tx, _ = optim.make_optimizer(ocfg, TRAIN_STEPS)
    cfg32 = _cfg(**shape)
    params = model_lib.init_params(cfg32, jax.random.PRNGKey(0))  # fp32 params in both runs
    fp32 = _train_losses(cfg32, params, tx, batches, precision="highest")
    bf16 = _train_losses(dataclasses.replace(cfg32, dtype="bfloat16"), params, tx, batches)
    gap = np.abs(bf16 - fp32)
    record_property("fp32_losses", np.round(fp32, 4).tolist())
    record_property("bf16_losses", np.round(bf16, 4).tolist())
    record_property("max_abs_gap", float(gap.max()))
    assert np.isfinite(bf16).all() and np.isfinite(fp32).all()
    learned = (1 - BF16_LEARNS) * fp32[0]
    assert fp32[-1] < learned and bf16[-1] < learned, (fp32, bf16)
    assert gap.max() <= BF16_LOSS_TOL, np.round(gap, 4)


# ---------------------------------------------------------------- memory preflight

GiB = 1024**3


def _preflight(cfg, workdir) -> preflight.MemoryEstimate | None:
    """What ``train.loop.train`` runs before it writes anything: the plan, the one step
    build (the ahead-of-time compile) and the memory preflight of that compiled step."""
    plan = plan_lib.training(cfg, workdir, jax.device_count())
    plan = plan_lib.with_data(plan, steps_per_epoch=1)  # train.steps is set: unused
    step = step_lib.build_step(plan)
    return preflight.check_step(step.compiled, step.abstract_state, step.abstract_batch, plan)


def test_preflight_reads_the_device_limit_and_refuses_what_cannot_fit(
    accel, capsys, tmp_path, record_property
):
    budget, source = preflight.device_budget(accel.device, 1)
    if accel.dry:
        assert source.startswith("MemAvailable") and budget > 0, (budget, source)
    else:
        assert source == "gpu bytes_limit", source
        assert budget == accel.device.memory_stats()["bytes_limit"]
        assert 1 * GiB < budget <= 200 * GiB, budget  # XLA's share of one card's memory
    # What fits: the tests' tiny config (1 sequence a device).
    per_device = {"train.batch_size": jax.device_count()}
    small = tiny_config(**per_device)
    assert _preflight(small, tmp_path / "small") is not None
    assert "preflight: predicted peak" in capsys.readouterr().err
    # What cannot: parameters plus AdamW's two moments (12 bytes a parameter, in the step's
    # arguments, which no rematerialization can shrink) of 1.5 budgets. Layers scanned, so
    # the compile does not grow with them, and one sequence of 128 tokens a device.
    C = 4096 if not accel.dry else 2048
    n_params = 1.5 * budget / 12
    n_layer = math.ceil((n_params - 50257 * C) / (12 * C * C))
    big = tiny_config(
        **{
            "model.n_layer": n_layer,
            "model.n_embd": C,
            "model.n_head": C // 128,
            "model.n_positions": 128,
            "model.scan_layers": True,
            "data.block_size": 128,
            **per_device,
        }
    )
    with pytest.raises(preflight.PreflightError) as e:
        _preflight(big, tmp_path / "big")
    msg = str(e.value)
    record_property("budget_bytes", budget)
    record_property("refused", f"{n_layer} layers x {C}: {msg}")
    # The figure's source: "(gpu bytes_limit)", or "(MemAvailable ...)" on the dry run.
    assert f"({source.split()[0]}" in msg and "exceeds" in msg, msg
    assert not (tmp_path / "small").exists() and not (tmp_path / "big").exists()


# ---------------------------------------------------------------- GPU vs a CPU process


def _cpu_process(command: str, args: dict, tmp_path) -> dict:
    """tests/cpu_side.py in a fresh process that sees only the CPU."""
    path = tmp_path / f"{command}.json"
    path.write_text(json.dumps(args))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.cpu_side", command, str(path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _decisive_params(cfg, seed: int) -> dict:
    """Random weights far from GPT-2's 0.02 init (0.3-std kernels and embeddings, LayerNorm
    scales 1 +- 0.2): peaked logits, whose greedy choices are rarely near-ties."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(functools.partial(model_lib.init_params, cfg), jax.random.PRNGKey(0))

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        if "ln_" in name and "scale" in name:
            return (1 + 0.2 * rng.standard_normal(s.shape)).astype(np.float32)
        return (0.3 * rng.standard_normal(s.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def test_greedy_generation_on_the_gpu_equals_the_cpus(accel, tmp_path, record_property):
    cfg = _cfg(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=512)
    params = _decisive_params(cfg, seed=0)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 512, n).tolist() for n in (3, 9, 5)]  # mixed lengths: padding
    new_tokens = 24

    def on(device, precision):
        gen._EXECUTABLES.clear()  # compiled per device and precision, not reused across them
        with jax.default_device(device), jax.default_matmul_precision(precision):
            return gen.generate_batch(cfg, params, prompts, new_tokens, temperature=0.0)

    # Exact fp32 matmuls: the check is of the decode loop on the device, not of TF32, under
    # which NVIDIA GPUs run fp32 matmuls by default (jax's default precision there).
    on_device = on(accel.device, "highest")
    default_precision = on_device if accel.dry else on(accel.device, "default")
    cpu_side.save_tree(tmp_path / "params.npz", params)
    cpu = _cpu_process(
        "generate",
        {
            "cfg": cpu_side.config_fields(cfg),
            "params": str(tmp_path / "params.npz"),
            "prompts": prompts,
            "new_tokens": new_tokens,
        },
        tmp_path,
    )
    record_property("cpu_min_top2_gap", cpu["margin"])
    # Recorded, not asserted: near-ties may flip under TF32.
    record_property("equal_at_default_precision", default_precision == cpu["new_ids"])
    assert cpu["margin"] > 1e-3  # no choice was a tie that fp32 rounding order could flip
    assert on_device == cpu["new_ids"]
    assert all(len(row) == new_tokens for row in on_device)


def test_a_checkpoint_moves_from_the_gpu_to_a_cpu_process_and_back(accel, tmp_path):
    cfg = _cfg(n_layer=2, n_head=4, n_embd=64, n_positions=32, vocab_size=512)
    step = cpu_side.train_step_fn(cfg)
    with jax.default_device(accel.device):
        state = step_lib.init_state(jax.random.PRNGKey(0), model_cfg=cfg, tx=cpu_side.optimizer())
        state, _ = step(state, cpu_side.batch(cfg, seed=1))  # a non-zero optimizer state
    assert {d for x in jax.tree.leaves(state) for d in x.devices()} == {accel.device}
    with ckpt_lib.Checkpointer(tmp_path / "from_gpu") as ckpt:
        ckpt.save(1, state, {"saved_on": accel.device.platform})
        ckpt.wait()
    np.savez(tmp_path / "from_gpu.npz", **cpu_side.state_to_numpy(state))
    cpu = _cpu_process(
        "checkpoint",
        {
            "cfg": cpu_side.config_fields(cfg),
            "src": str(tmp_path / "from_gpu"),
            "expect": str(tmp_path / "from_gpu.npz"),
            "dst": str(tmp_path / "from_cpu"),
            "dst_npz": str(tmp_path / "from_cpu.npz"),
        },
        tmp_path,
    )
    assert cpu == {"step": 2, "leaves": len(jax.tree.leaves(state)), "platform": "cpu"}
    # ... and the CPU's checkpoint restores onto this device, leaf for leaf.
    with ckpt_lib.Checkpointer(tmp_path / "from_cpu", read_only=True) as ckpt:
        back = ckpt.restore(None, cpu_side.abstract_state(cfg, accel.device))
    assert {d for x in jax.tree.leaves(back) for d in x.devices()} == {accel.device}
    with np.load(tmp_path / "from_cpu.npz") as f:
        want = {k: f[k] for k in f.files}
    got = cpu_side.state_to_numpy(back)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    _, metrics = step(back, cpu_side.batch(cfg, seed=3))  # and training goes on from it
    assert math.isfinite(float(metrics["loss"]))


# ---------------------------------------------------------------- the train loop


def test_the_train_loop_logs_mfu_against_the_devices_peak(accel, tmp_path, record_property):
    peak = flops.peak_flops(accel.device.device_kind, "bfloat16")
    if not accel.dry:
        assert peak, f"gpt2_jax/flops.py has no peak for {accel.device.device_kind!r}"
    overrides = {"train.steps": 8, "train.log_every": 4, "model.dtype": "bfloat16"}
    if accel.dry:
        overrides["train.peak_flops"] = 1e12  # the CPU's peak is unknown: one given
    cfg = tiny_config(**overrides)
    with jax.default_device(accel.device):
        train_lib.train(cfg, tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in lines if r["split"] == "train"][-1]
    record_property("last_train_line", last)
    assert last["step"] == 8 and math.isfinite(last["loss"])
    model_cfg = config_lib.validate(cfg, 1)
    want = last["tokens_per_second"] * flops.flops_per_token(model_cfg, 32) / (peak or 1e12)
    assert 0 < last["mfu"] < 1 and math.isclose(last["mfu"], want, rel_tol=1e-6), last
