"""Hugging Face GPT-2 import / export: logits parity with PyTorch, exact round trips, errors."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from gpt2_jax.data import tokenizer
from gpt2_jax.model import config as gpt2_config
from gpt2_jax.model import gpt2 as model
from gpt2_jax.weights import hf

from . import helpers

# Many small PyTorch forwards: one thread is ~10x faster than 2 on a shared 2-core box.
pytestmark = pytest.mark.usefixtures("torch_one_thread")

# Odd sizes: non-square c_attn (64 x 192), c_fc (64 x 96), mlp.c_proj (96 x 64) catch transposes.
SMALL = dict(n_layer=3, n_head=4, n_embd=64, n_positions=96, n_inner=96, vocab_size=50257)


def random_hf_model(seed: int = 0, **sizes):
    """helpers.random_hf_model of this file's SMALL shape (``sizes`` override fields)."""
    return helpers.random_hf_model(seed, **{**SMALL, **sizes})


def torch_logits(m, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return m(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()


def jax_logits(cfg, params, ids: np.ndarray) -> np.ndarray:
    return np.asarray(model.GPT2(cfg).apply({"params": params}, ids))


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The random small model saved three ways, plus reference logits on random ids.

    The ids need no real text (logit parity is about weights, not language), so they are
    drawn over the whole vocabulary: rare ids' embedding rows get checked too.
    """
    m = random_hf_model()
    root = tmp_path_factory.mktemp("hf_small")
    dirs = {name: root / name for name in ("safetensors", "bin", "bin_original")}
    m.save_pretrained(dirs["safetensors"])
    state = m.state_dict()
    for name in ("bin", "bin_original"):
        dirs[name].mkdir()
        shutil.copy(dirs["safetensors"] / "config.json", dirs[name] / "config.json")
    torch.save(state, dirs["bin"] / "pytorch_model.bin")
    # Like openai-community/gpt2's .bin: no prefix, no lm_head, mask buffers per layer.
    P = m.config.n_positions
    original = {
        k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"
    }
    mask = torch.tril(torch.ones(P, P, dtype=torch.uint8)).view(1, 1, P, P)
    for i in range(m.config.n_layer):
        original[f"h.{i}.attn.bias"] = mask
        original[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(original, dirs["bin_original"] / "pytorch_model.bin")
    ids = np.random.default_rng(0).integers(0, SMALL["vocab_size"], (2, SMALL["n_positions"]))
    ids = ids.astype(np.int32)
    return {"model": m, "dirs": dirs, "ids": ids, "logits": torch_logits(m, ids)}


# ---------------------------------------------------------------------- import parity


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("fmt", ["safetensors", "bin", "bin_original"])
def test_imported_logits_match_pytorch(small, fmt, scan_layers):
    cfg, params = hf.load_pretrained(small["dirs"][fmt], scan_layers=scan_layers)
    assert cfg.n_layer == 3 and cfg.n_inner == 96 and cfg.scan_layers == scan_layers
    assert ("h" in params) == scan_layers and ("h_2" in params) != scan_layers
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))
    got = jax_logits(cfg, params, small["ids"])
    np.testing.assert_allclose(got, small["logits"], rtol=0, atol=1e-4)


def test_sharded_safetensors(small, tmp_path):
    small["model"].save_pretrained(tmp_path, max_shard_size="1MB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    cfg, params = hf.load_pretrained(tmp_path)
    _, reference = hf.load_pretrained(small["dirs"]["safetensors"])
    assert_trees_equal(params, reference)


def test_hf_prefix_accepted(small):
    cfg, params = hf.load_pretrained(f"hf:{small['dirs']['safetensors']}")
    assert cfg.n_layer == 3


def test_param_dtype_override(small):
    cfg, params = hf.load_pretrained(
        small["dirs"]["safetensors"], param_dtype="bfloat16", dtype="bfloat16", scan_layers=False
    )
    _, fp32 = hf.load_pretrained(small["dirs"]["safetensors"], scan_layers=False)
    assert cfg.param_dtype == "bfloat16"
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(params))
    assert_trees_equal(params, jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16), fp32))


def test_gpt2_124m_shape_logits_match(tmp_path):
    """The real gpt2 shapes (square c_proj, 50257 x 768 wte, 1024 positions), random weights."""
    # Built on the meta device and filled here: HF's own init of 124M params takes ~7 s.
    with torch.device("meta"):
        m = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    m = m.to_empty(device="cpu").eval()
    m.tie_weights()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.02)
            else:  # LayerNorm scales near 1, biases near 0
                p.copy_(float(name.endswith(".weight")) + 0.05 * torch.randn_like(p))
    m.save_pretrained(tmp_path)
    ids = helpers.wiki_ids(256).reshape(2, 128)
    expected = torch_logits(m, ids)
    del m
    cfg, params = hf.load_pretrained(tmp_path)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.n_positions) == (12, 12, 768, 1024)
    assert model.count_params(params) == 124_439_808
    np.testing.assert_allclose(jax_logits(cfg, params, ids), expected, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------- export


@pytest.mark.parametrize("scan_layers", [True, False])
def test_export_loads_in_transformers(small, tmp_path, capfd, scan_layers):
    cfg, params = hf.load_pretrained(small["dirs"]["safetensors"], scan_layers=scan_layers)
    out = hf.save_pretrained(cfg, params, tmp_path / "export")
    capfd.readouterr()
    loaded, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert all(not v for v in info.values()), info  # no missing / unexpected / mismatched
    logged = capfd.readouterr().err.lower()
    assert "missing" not in logged and "unexpected" not in logged and "initialized" not in logged
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    np.testing.assert_allclose(
        torch_logits(loaded.eval(), small["ids"]), small["logits"], rtol=0, atol=1e-6
    )
    exported = json.loads((out / "config.json").read_text())
    assert exported["model_type"] == "gpt2" and exported["tie_word_embeddings"] is True
    assert exported["n_inner"] == 96 and exported["bos_token_id"] == 50256


def test_export_roundtrip_is_exact(small, tmp_path):
    cfg, scanned = hf.load_pretrained(small["dirs"]["safetensors"], scan_layers=True)
    hf.save_pretrained(cfg, scanned, tmp_path / "a")
    cfg_a, again = hf.load_pretrained(tmp_path / "a", scan_layers=True)
    assert cfg_a == cfg
    assert_trees_equal(again, scanned)
    # Either layout, on host or on device, exports the same tensors.
    unrolled = jax.device_put(model.unstack_layers(scanned))
    hf.save_pretrained(cfg, unrolled, tmp_path / "b")
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    assert sorted(a) == sorted(b) and "lm_head.weight" not in a
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_export_roundtrip_bfloat16(small, tmp_path):
    cfg, params = hf.load_pretrained(small["dirs"]["safetensors"], param_dtype="bfloat16")
    hf.save_pretrained(cfg, params, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    _, again = hf.load_pretrained(tmp_path / "bf16", param_dtype="bfloat16")
    assert_trees_equal(again, params)


def test_export_tokenizer_matches_ours(small, tmp_path):
    cfg, params = hf.load_pretrained(small["dirs"]["safetensors"])
    out = hf.save_pretrained(cfg, params, tmp_path / "export")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = tokenizer.get_tokenizer()
    lines = helpers.wiki_lines()
    lines += ["  héllo wörld 😀  ", "it's 3.14 -- 'quoted' \t tabs\n\n", "ÆØÅ 中文 1234567"]
    for line in lines:
        assert hf_tok(line)["input_ids"] == ours.encode_ordinary(line), line
    assert hf_tok.eos_token_id == tokenizer.EOT_ID


def test_export_refuses_non_empty_dir(small, tmp_path):
    cfg, params = hf.load_pretrained(small["dirs"]["safetensors"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        hf.save_pretrained(cfg, params, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left behind
    hf.save_pretrained(cfg, params, out, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_wrong_params_writes_nothing(small, tmp_path):
    cfg, params = hf.load_pretrained(small["dirs"]["safetensors"])
    wrong = gpt2_config.GPT2Config(**{**SMALL, "n_inner": 128})
    with pytest.raises(ValueError, match="mlp/c_fc/kernel"):
        hf.save_pretrained(wrong, params, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- bad checkpoints


def corrupted_copy(src: Path, dst: Path, edit) -> Path:
    """Copies a safetensors HF dir to ``dst`` with ``edit(tensors dict)`` applied."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_corrupted_checkpoint_lists_every_problem(small, tmp_path):
    def edit(t):
        fc = "transformer.h.1.mlp.c_fc.weight"
        t[fc] = np.ascontiguousarray(t[fc].T)
        for k in [k for k in t if k.startswith("transformer.h.2.")]:
            del t[k]  # a whole layer missing
        t["transformer.h.0.attn.rotary.weight"] = np.zeros(3, np.float32)

    path = corrupted_copy(small["dirs"]["safetensors"], tmp_path / "bad", edit)
    with pytest.raises(hf.HFImportError) as e:
        hf.load_pretrained(path)
    msg = str(e.value)
    assert str(path) in msg
    assert "h.1.mlp.c_fc.weight: checkpoint (96, 64), config wants (64, 96)" in msg
    assert "12 missing tensors" in msg
    for name in hf.expected_shapes(gpt2_config.GPT2Config(**SMALL)):
        if name.startswith("h.2."):
            assert name in msg
    assert "1 unexpected tensors" in msg and "h.0.attn.rotary.weight" in msg


@pytest.mark.parametrize("what", ["shape", "missing", "extra"])
def test_single_problem_is_reported(small, tmp_path, what):
    def edit(t):
        if what == "shape":
            t["transformer.wpe.weight"] = t["transformer.wpe.weight"][:50].copy()
        elif what == "missing":
            del t["transformer.ln_f.bias"]
        else:
            t["transformer.h.3.ln_1.weight"] = t["transformer.h.2.ln_1.weight"]

    path = corrupted_copy(small["dirs"]["safetensors"], tmp_path / what, edit)
    expected = {
        "shape": "wpe.weight: checkpoint (50, 64), config wants (96, 64)",
        "missing": "1 missing tensors:\n  ln_f.bias",
        "extra": "1 unexpected tensors:\n  h.3.ln_1.weight",
    }[what]
    with pytest.raises(hf.HFImportError, match="does not match its config.json") as e:
        hf.load_pretrained(path)
    assert expected in str(e.value)


def test_untied_head_rejected(small, tmp_path):
    def edit(t):
        t["lm_head.weight"] = t["transformer.wte.weight"] + 1.0

    path = corrupted_copy(small["dirs"]["safetensors"], tmp_path / "untied", edit)
    with pytest.raises(hf.HFImportError, match="untied output heads are not supported"):
        hf.load_pretrained(path)


@pytest.mark.parametrize(
    "field, value, needle",
    [
        ("activation_function", "relu", "activation_function='relu'"),
        ("model_type", "gpt_neo", "model_type='gpt_neo'"),
        ("scale_attn_by_inverse_layer_idx", True, "scale_attn_by_inverse_layer_idx=True"),
        ("reorder_and_upcast_attn", True, "reorder_and_upcast_attn=True"),
        ("scale_attn_weights", False, "scale_attn_weights=False"),
        ("n_head", 5, "n_embd=64 is not divisible by model.n_head=5"),
    ],
)
def test_unsupported_config_rejected(small, tmp_path, field, value, needle):
    path = tmp_path / "cfg"
    shutil.copytree(small["dirs"]["safetensors"], path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(hf.HFImportError) as e:
        hf.load_pretrained(path)
    assert needle in str(e.value) and "config.json" in str(e.value)


def test_identity_override_rejected(small):
    with pytest.raises(hf.HFImportError, match=r"cannot override \['n_layer'\]"):
        hf.load_pretrained(small["dirs"]["safetensors"], n_layer=2)


def test_missing_local_dir(tmp_path):
    with pytest.raises(hf.HFImportError, match="no such directory"):
        hf.load_pretrained(tmp_path / "nope")


def test_hub_id_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(hf.HFImportError) as e:
        hf.load_pretrained("gpt2-jax-tests/no-such-model")
    assert time.monotonic() - start < 10
    msg = str(e.value)
    assert "gpt2-jax-tests/no-such-model" in msg and "hf:/path/to/dir" in msg
    assert "HF_HUB_OFFLINE" in msg
