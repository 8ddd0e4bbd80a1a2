"""LoRA: PEFT parity (import, export, merge), adapter-only gradients, bad adapters, lora=None.

PEFT 0.21 on a random odd-shaped GPT2LMHeadModel is the reference. Its adapters are made with
``init_lora_weights=False`` (a random B: a zero B would hide a wrong A), and ours get random
A and B before export, for the same reason.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from gpt2_jax.model import gpt2, layers, lora
from gpt2_jax.weights import hf
from gpt2_jax.weights import peft as peft_io

from . import helpers

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# Odd shapes: c_attn 48 x 144, c_fc 48 x 72, mlp.c_proj 72 x 48 (a transpose cannot hide).
SHAPE = dict(n_layer=2, n_head=4, n_embd=48, n_inner=72, n_positions=32, vocab_size=101)
ALL = ["c_attn", "c_proj", "c_fc"]
TOL = dict(rtol=1e-5, atol=1e-5)


def torch_logits(m, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return m(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()


def jax_logits(model_cfg, variables: dict, ids: np.ndarray) -> np.ndarray:
    return np.asarray(gpt2.GPT2(model_cfg).apply(variables, ids))


def peft_adapter(base_dir, out_dir, **kwargs):
    """PEFT's LoRA (random B) on a fresh copy of the base, saved to ``out_dir``: the
    PeftModel (eval mode)."""
    m = transformers.GPT2LMHeadModel.from_pretrained(base_dir).eval()
    config = peft.LoraConfig(init_lora_weights=False, fan_in_fan_out=True, **kwargs)
    pm = peft.get_peft_model(m, config).eval()
    pm.save_pretrained(out_dir)
    return pm


def random_adapters(lora_cfg, model_cfg, seed: int, scanned: bool) -> dict:
    """init_adapters with B (and A) made random: every entry matters in a parity check."""
    adapters = lora.init_adapters(lora_cfg, model_cfg, jax.random.PRNGKey(seed), scanned)
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    noise = [
        0.2 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, [x + n for x, n in zip(leaves, noise, strict=True)])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The random base saved as a Hugging Face directory, and random ids."""
    root = tmp_path_factory.mktemp("lora")
    helpers.random_hf_model(0, **SHAPE).save_pretrained(root / "base")
    ids = np.random.default_rng(0).integers(0, SHAPE["vocab_size"], (2, SHAPE["n_positions"]))
    return {"root": root, "dir": root / "base", "ids": ids.astype(np.int32)}


@pytest.fixture(scope="module")
def peft_all(base):
    """PEFT's adapter on c_attn, c_proj (both) and c_fc: its dir, logits, merged weights."""
    out = base["root"] / "peft_all"
    pm = peft_adapter(base["dir"], out, target_modules=ALL, r=4, lora_alpha=8, lora_dropout=0.1)
    logits = torch_logits(pm, base["ids"])
    merged = pm.merge_and_unload()
    state = {k: v.detach().numpy().copy() for k, v in merged.state_dict().items()}
    return {"dir": out, "logits": logits, "merged": state}


@pytest.fixture(scope="module")
def peft_attn_proj(base):
    """PEFT's adapter on the attention's c_proj only (``attn.c_proj``: a suffix match)."""
    out = base["root"] / "peft_attn_proj"
    pm = peft_adapter(base["dir"], out, target_modules=["attn.c_proj"], r=3, lora_alpha=5)
    return {"dir": out, "logits": torch_logits(pm, base["ids"])}


# ---------------------------------------------------------------------- config and init


def test_config_targets_and_validation():
    assert lora.module_paths(lora.LoraConfig()) == lora.MODULES
    assert lora.module_paths(lora.LoraConfig(targets=["c_proj"])) == ("attn.c_proj", "mlp.c_proj")
    assert lora.module_paths(lora.LoraConfig(targets=("mlp.c_proj", "c_attn"))) == (
        "attn.c_attn",
        "mlp.c_proj",
    )
    assert lora.LoraConfig(rank=4, alpha=8).scale == 2.0
    hash(lora.LoraConfig(targets=["c_fc"]))  # a list becomes a tuple: GPT2Config stays hashable
    for kwargs, key in (
        (dict(rank=-1), "lora.rank"),
        (dict(alpha=0.0), "lora.alpha"),
        (dict(dropout=1.0), "lora.dropout"),
        (dict(targets=("c_attn", "q_proj")), "lora.targets"),
        (dict(targets=()), "lora.targets"),
    ):
        with pytest.raises(ValueError, match=key) as e:
            lora.LoraConfig(**kwargs).validate()
        if "q_proj" in str(kwargs):
            assert "'q_proj'" in str(e.value) and "attn.c_proj, mlp.c_fc" in str(e.value)
    cfg = gpt2.GPT2Config(**SHAPE, lora=lora.LoraConfig(rank=-2))
    with pytest.raises(ValueError, match="lora.rank"):
        cfg.validate()


def test_init_adapters_layouts_and_init():
    lora_cfg = lora.LoraConfig(rank=4, alpha=8)
    model_cfg = gpt2.GPT2Config(**SHAPE)
    unrolled = lora.init_adapters(lora_cfg, model_cfg, jax.random.PRNGKey(0), scanned=False)
    scanned = lora.init_adapters(lora_cfg, model_cfg, jax.random.PRNGKey(0), scanned=True)
    assert jax.tree.map(jnp.shape, unrolled["h_1"]["mlp"]["c_proj"]) == {
        "lora_A": (4, 72),
        "lora_B": (48, 4),
    }
    assert scanned["h"]["attn"]["c_attn"]["lora_A"].shape == (2, 4, 48)
    assert helpers.tree_max_abs_diff(gpt2.stack_layers(unrolled, 2), scanned) == 0.0
    for path, a in (("attn.c_attn", 48), ("mlp.c_proj", 72)):
        group, name = path.split(".")
        A, B = (unrolled["h_0"][group][name][w] for w in ("lora_A", "lora_B"))
        assert 0.8 / np.sqrt(a) < float(jnp.abs(A).max()) <= 1 / np.sqrt(a)
        assert not jnp.any(B)

    # The model's own init makes the same tree (both layouts), "params" as without LoRA.
    def init(cfg):
        x = jnp.zeros((1, 1), jnp.int32)
        return jax.eval_shape(lambda: gpt2.GPT2(cfg).init(jax.random.PRNGKey(0), x))

    for scan, reference in ((False, unrolled), (True, scanned)):
        cfg = dataclasses.replace(model_cfg, scan_layers=scan)
        variables = init(dataclasses.replace(cfg, lora=lora_cfg))
        assert set(variables) == {"params", "lora"}
        assert jax.tree.map(jnp.shape, variables["lora"]) == jax.tree.map(jnp.shape, reference)
        shapes = jax.tree.map(jnp.shape, init(cfg))
        assert jax.tree.map(jnp.shape, variables["params"]) == shapes["params"]


def test_lora_none_is_the_plain_model(base):
    model_cfg, params = hf.load_pretrained(base["dir"], scan_layers=True)
    assert model_cfg.lora is None
    x = jnp.zeros((1, 1), jnp.int32)
    variables = jax.eval_shape(lambda: gpt2.GPT2(model_cfg).init(jax.random.PRNGKey(0), x))
    assert set(variables) == {"params"}  # no "lora" collection, no lora leaves
    for lora_cfg, path in ((None, "attn.c_attn"), (lora.LoraConfig(rank=0), "attn.c_attn"),
                           (lora.LoraConfig(targets=("c_fc",)), "attn.c_attn")):  # fmt: skip
        cfg = dataclasses.replace(model_cfg, lora=lora_cfg)
        assert type(layers.dense(cfg, 8, "c_attn", 0.02, path)) is nn.Dense
    plain = jax_logits(model_cfg, {"params": params}, base["ids"])
    # LoRA with B = 0 adds exact zeros to nn.Dense's own numbers: bit-identical logits.
    lora_cfg = lora.LoraConfig(rank=4, alpha=8)
    zero_b = lora.init_adapters(lora_cfg, model_cfg, jax.random.PRNGKey(0), scanned=True)
    with_lora = dataclasses.replace(model_cfg, lora=lora_cfg)
    got = jax_logits(with_lora, {"params": params, "lora": zero_b}, base["ids"])
    np.testing.assert_array_equal(got, plain)


# ---------------------------------------------------------------------- PEFT parity


@pytest.mark.parametrize("scan_layers", [False, True])
def test_peft_adapter_logits_match(base, peft_all, scan_layers):
    model_cfg, params = hf.load_pretrained(base["dir"], scan_layers=scan_layers)
    lora_cfg, adapters, meta = peft_io.read_adapter(peft_all["dir"], model_cfg, scan_layers)
    assert lora_cfg == lora.LoraConfig(rank=4, alpha=8.0, dropout=0.1, targets=lora.MODULES)
    assert ("h" in adapters) == scan_layers and meta["path"] == str(peft_all["dir"])
    cfg = dataclasses.replace(model_cfg, lora=lora_cfg)
    got = jax_logits(cfg, {"params": params, "lora": adapters}, base["ids"])
    np.testing.assert_allclose(got, peft_all["logits"], **TOL)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_peft_single_c_proj_logits_match(base, peft_attn_proj, scan_layers):
    model_cfg, params = hf.load_pretrained(base["dir"], scan_layers=scan_layers)
    lora_cfg, adapters, _ = peft_io.read_adapter(peft_attn_proj["dir"], model_cfg, scan_layers)
    assert lora_cfg.targets == ("attn.c_proj",) and lora_cfg.scale == 5 / 3
    block = adapters["h"] if scan_layers else adapters["h_1"]
    assert list(block) == ["attn"] and list(block["attn"]) == ["c_proj"]
    cfg = dataclasses.replace(model_cfg, lora=lora_cfg)
    got = jax_logits(cfg, {"params": params, "lora": adapters}, base["ids"])
    np.testing.assert_allclose(got, peft_attn_proj["logits"], **TOL)


@pytest.mark.parametrize(
    "targets, scan_layers, want",
    [(tuple(ALL), True, ALL), (("mlp.c_proj",), False, ["mlp.c_proj"]),
     (("c_fc", "attn.c_proj"), False, ["attn.c_proj", "c_fc"])],
)  # fmt: skip
def test_exported_adapter_loads_in_peft(base, tmp_path, targets, scan_layers, want):
    model_cfg, params = hf.load_pretrained(base["dir"], scan_layers=scan_layers)
    lora_cfg = lora.LoraConfig(rank=3, alpha=6.0, targets=targets)
    adapters = random_adapters(lora_cfg, model_cfg, 7, scan_layers)
    cfg = dataclasses.replace(model_cfg, lora=lora_cfg)
    ours = jax_logits(cfg, {"params": params, "lora": adapters}, base["ids"])
    out = peft_io.write_adapter(tmp_path / "a", lora_cfg, adapters, "hf:base", model_cfg)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == want and config["fan_in_fan_out"] is True
    assert config["base_model_name_or_path"] == "hf:base" and config["r"] == 3
    m = transformers.GPT2LMHeadModel.from_pretrained(base["dir"]).eval()
    pm = peft.PeftModel.from_pretrained(m, out).eval()
    adapted = {n.split(".lora_A")[0] for n, _ in pm.named_modules() if n.endswith(".lora_A")}
    assert len(adapted) == len(lora.module_paths(lora_cfg)) * SHAPE["n_layer"]
    np.testing.assert_allclose(torch_logits(pm, base["ids"]), ours, **TOL)
    # Round trip through the reader: the same arrays.
    back_cfg, back, _ = peft_io.read_adapter(out, model_cfg, scan_layers)
    assert lora.module_paths(back_cfg) == lora.module_paths(lora_cfg)
    assert helpers.tree_max_abs_diff(back, adapters) == 0.0


@pytest.mark.parametrize("scan_layers", [False, True])
def test_merge_equals_merge_and_unload(base, peft_all, tmp_path, scan_layers):
    model_cfg, params = hf.load_pretrained(base["dir"], scan_layers=scan_layers)
    lora_cfg, adapters, _ = peft_io.read_adapter(peft_all["dir"], model_cfg, scan_layers)
    before = jax.tree.map(np.copy, params)
    merged = lora.merge(params, adapters, lora_cfg)
    assert helpers.tree_max_abs_diff(params, before) == 0.0  # pure
    out = hf.save_pretrained(model_cfg, merged, tmp_path / "merged")
    ours = load_file(out / "model.safetensors")
    for name, want in peft_all["merged"].items():
        if name != "lm_head.weight":
            np.testing.assert_allclose(ours[name], want, rtol=1e-6, atol=1e-6, err_msg=name)
    m = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    np.testing.assert_allclose(torch_logits(m, base["ids"]), peft_all["logits"], **TOL)
    got = jax_logits(model_cfg, {"params": merged}, base["ids"])
    np.testing.assert_allclose(got, peft_all["logits"], **TOL)


# ---------------------------------------------------------------------- training


def _dot_shapes(jaxpr) -> list[tuple[int, ...]]:
    """Output shapes of every dot_general in a jaxpr and the jaxprs nested in it."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.append(tuple(eqn.outvars[0].aval.shape))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    shapes += _dot_shapes(inner)
    return shapes


def test_only_adapters_get_gradients(base):
    """A train-like step on the scanned layout (the one with nested jaxprs): gradients
    for the adapters only, the base returned bit for bit, no base-kernel gradient formed."""
    model_cfg, params = hf.load_pretrained(base["dir"], scan_layers=True, resid_pdrop=0.0,
                                           embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    params = jax.tree.map(jnp.asarray, params)
    lora_cfg = lora.LoraConfig(rank=4, alpha=8, dropout=0.1)
    cfg = dataclasses.replace(model_cfg, lora=lora_cfg)
    adapters = random_adapters(lora_cfg, model_cfg, 3, scanned=True)
    ids = jnp.asarray(base["ids"])

    def loss(adapters, params, rng):
        variables = {"params": params, "lora": adapters}
        logits = gpt2.GPT2(cfg).apply(variables, ids, False, rngs={"dropout": rng})
        return -jnp.mean(jax.nn.log_softmax(logits[:, :-1]).max(-1))

    @jax.jit
    def step(params, adapters, rng):
        grads = jax.grad(loss)(adapters, params, rng)
        return params, jax.tree.map(lambda a, g: a - 0.1 * g, adapters, grads), grads

    before = jax.tree.map(np.asarray, params)
    traced = step.trace(params, adapters, jax.random.PRNGKey(0))
    new_params, new_adapters, grads = traced.lower().compile()(
        params, adapters, jax.random.PRNGKey(0)
    )
    assert jax.tree.structure(grads) == jax.tree.structure(adapters)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    assert helpers.tree_max_abs_diff(new_params, before) == 0.0  # the base, bit for bit
    assert helpers.tree_max_abs_diff(new_adapters, adapters) > 0
    # No base kernel's gradient is formed: no matmul yields a kernel's shape, [in, out] or
    # [out, in] (a gradient with respect to the params too gives both kinds here).
    kernels = {k for s in lora.module_shapes(model_cfg).values() for k in (s, s[::-1])}
    dots = _dot_shapes(traced.jaxpr.jaxpr)
    assert len(dots) > 10 and not [s for s in dots if s[-2:] in kernels]


def test_lora_dropout_uses_the_dropout_rng(base):
    model_cfg, params = hf.load_pretrained(base["dir"], scan_layers=False)
    model_cfg = dataclasses.replace(model_cfg, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    lora_cfg = lora.LoraConfig(rank=4, alpha=8, dropout=0.5)
    cfg = dataclasses.replace(model_cfg, lora=lora_cfg)
    adapters = random_adapters(lora_cfg, model_cfg, 5, False)
    v = {"params": params, "lora": adapters}

    def run(seed, deterministic=False, dropout=0.5):
        c = dataclasses.replace(cfg, lora=dataclasses.replace(lora_cfg, dropout=dropout))
        rngs = {"dropout": jax.random.PRNGKey(seed)}
        return np.asarray(gpt2.GPT2(c).apply(v, base["ids"], deterministic, rngs=rngs))

    off = run(0, dropout=0.0)
    np.testing.assert_array_equal(run(1, dropout=0.0), off)  # rate 0: no rng drawn
    np.testing.assert_allclose(run(0, deterministic=True), off, **TOL)  # eval: no dropout
    assert not np.allclose(run(0), off, **TOL)
    assert not np.allclose(run(0), run(1), **TOL)
    np.testing.assert_array_equal(run(0), run(0))


# ---------------------------------------------------------------------- bad input


def _edit_config(**changes):
    def edit(d):
        path = d / "adapter_config.json"
        config = json.loads(path.read_text())
        config.update(changes)
        path.write_text(json.dumps(config))

    return edit


def _drop_tensor(name):
    def edit(d):
        tensors = load_file(d / "adapter_model.safetensors")
        del tensors[name]
        save_file(tensors, d / "adapter_model.safetensors")

    return edit


A0 = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
BAD = {
    "no_dir": (lambda d: shutil.rmtree(d), ["no such adapter directory", "{dir}"]),
    "no_config": (lambda d: (d / "adapter_config.json").unlink(), ["{dir}", "adapter_config.json"]),
    "no_weights": (lambda d: (d / "adapter_model.safetensors").unlink(),
                   ["{dir}", "adapter_model.safetensors"]),
    "peft_type": (_edit_config(peft_type="IA3"), ["adapter_config.json", "peft_type='IA3'"]),
    "unknown_target": (_edit_config(target_modules=["c_attn", "q_proj"]),
                       ["'q_proj'", "valid names: c_attn, c_proj, c_fc, attn.c_attn"]),
    "some_layers": (_edit_config(target_modules=r"transformer\.h\.0\.attn\.c_attn"),
                    ["target_modules", "some layers only"]),
    "fan_in_fan_out": (_edit_config(fan_in_fan_out=False), ["fan_in_fan_out=False"]),
    "dora": (_edit_config(use_dora=True), ["use_dora=True"]),
    "rslora": (_edit_config(use_rslora=True), ["use_rslora=True"]),
    "rank_pattern": (_edit_config(rank_pattern={"c_fc": 8}), ["rank_pattern="]),
    "alpha_pattern": (_edit_config(alpha_pattern={"c_fc": 8}), ["alpha_pattern="]),
    "bias": (_edit_config(bias="all"), ["bias='all'"]),
    "layers_to_transform": (_edit_config(layers_to_transform=[0]), ["layers_to_transform=[0]"]),
    "missing_tensor": (_drop_tensor(A0), [A0, "missing"]),
    "rank_vs_tensors": (_edit_config(r=8), [A0, "shape (4, 48)", "(8, 48)"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_adapter_is_refused(base, peft_all, tmp_path, case):
    edit, needles = BAD[case]
    d = shutil.copytree(peft_all["dir"], tmp_path / "adapter")
    edit(d)
    model_cfg = hf.load_pretrained(base["dir"])[0]
    with pytest.raises(peft_io.PeftError) as e:
        peft_io.read_adapter(d, model_cfg, scanned=False)
    for needle in needles:
        assert needle.format(dir=d) in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_adapter_of_another_base_is_refused(base, peft_all):
    other = dataclasses.replace(hf.load_pretrained(base["dir"])[0], n_inner=80)
    with pytest.raises(peft_io.PeftError) as e:
        peft_io.read_adapter(peft_all["dir"], other, scanned=True)
    name = "base_model.model.transformer.h.0.mlp.c_fc.lora_B.weight"
    assert f"tensor {name} has shape (72, 4)" in str(e.value) and "(80, 4)" in str(e.value)
    deeper = dataclasses.replace(other, n_inner=72, n_layer=1)
    with pytest.raises(peft_io.PeftError, match="transformer.h.1.attn.c_attn.lora_A.weight"):
        peft_io.read_adapter(peft_all["dir"], deeper, scanned=True)


def test_write_adapter_refuses_a_non_empty_directory(tmp_path):
    model_cfg = gpt2.GPT2Config(**SHAPE)
    lora_cfg = lora.LoraConfig(rank=2)
    adapters = lora.init_adapters(lora_cfg, model_cfg, jax.random.PRNGKey(0), scanned=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        peft_io.write_adapter(out, lora_cfg, adapters, "b", model_cfg)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary left behind
    peft_io.write_adapter(out, lora_cfg, adapters, "b", model_cfg, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json",
                                                     "adapter_model.safetensors"]  # fmt: skip
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
