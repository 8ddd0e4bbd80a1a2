"""weights.py: one resolver for every command; resume honours the user's runtime fields,
refuses a changed shape, starts fresh only when asked, and converts scanned <-> unrolled."""

import json
import shutil

import jax
import numpy as np
import pytest

from gpt2_jax import data as data_lib
from gpt2_jax.cli import main as cli
from gpt2_jax.config import base as config_lib
from gpt2_jax.config import plan as plan_lib
from gpt2_jax.evaluation.perplexity import evaluate_splits
from gpt2_jax.model import config as gpt2_config
from gpt2_jax.model import gpt2 as model_lib
from gpt2_jax.parallel import sharding
from gpt2_jax.train import loop as train_lib
from gpt2_jax.train import step as step_lib
from gpt2_jax.weights import checkpoint as ckpt_lib
from gpt2_jax.weights import resolve as weights

from .helpers import TINY, snapshot, tiny_config, train_losses

pytestmark = pytest.mark.filterwarnings("ignore:Sharding info not provided when restoring")


@pytest.fixture(scope="module")
def six_steps(tiny_dropout_run):
    """A finished 6-step tiny run (dropout 0.1), checkpoints at 3 and 6; shared: read only."""
    return tiny_dropout_run.workdir


def resumable_copy(src, dst):
    """``src`` as if its run had died after step 3."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / "6")
    return dst


# ---------------------------------------------------------------------- pure pieces


def test_shape_fields_are_listed_once():
    assert config_lib.SHAPE_KEYS == gpt2_config.SHAPE_FIELDS
    from gpt2_jax.weights import hf

    assert hf.OVERRIDABLE == {*gpt2_config.RUNTIME_FIELDS, "initializer_range"}
    assert set(gpt2_config.SHAPE_FIELDS) <= set(hf._HF_FIELDS)
    assert set(config_lib.runtime_fields(tiny_config())) == set(gpt2_config.RUNTIME_FIELDS)


def test_shape_diff_and_runtime_changes_name_each_key():
    a = gpt2_config.GPT2Config(n_layer=1, n_head=2, n_embd=32)
    b = gpt2_config.GPT2Config(n_layer=3, n_head=2, n_embd=32, n_inner=64, remat=True)
    assert weights.shape_diff(a, b) == [
        "model.n_layer: saved 1, requested 3",
        "model.n_inner: saved None, requested 64",
    ]
    c = gpt2_config.GPT2Config(
        n_layer=1, n_head=2, n_embd=32, remat=True, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0
    )
    assert weights.runtime_changes(a, c) == [
        "model.remat: False -> True",
        "model.dropout: 0.1 -> 0",
    ]


@pytest.mark.parametrize("text,want", [("", None), ("latest", None), ("best", "best"), ("7", 7)])
def test_parse_step(text, want):
    assert weights.parse_step(text) == want


def test_relayout_round_trip_covers_optimizer_state():
    cfg = gpt2_config.GPT2Config(
        n_layer=2, n_head=2, n_embd=16, vocab_size=64, n_positions=8, scan_layers=True
    )
    params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
    tree = {"params": params, "opt": ({"mu": params, "count": np.int32(3)},)}
    flat = weights.relayout(tree, scan_layers=False, n_layer=2)
    assert "h_1" in flat["params"] and "h_1" in flat["opt"][0]["mu"] and "h" not in flat["params"]
    back = weights.relayout(flat, scan_layers=True, n_layer=2)
    jax.tree.map(np.testing.assert_array_equal, back, tree)


# ---------------------------------------------------------------------- resume


def test_resume_applies_remat_and_dropout_and_records_them(
    six_steps, tmp_path, monkeypatch, capsys
):
    seen = []
    original = step_lib.train_step

    def spy(*args, model_cfg, **kw):
        seen.append(model_cfg)
        return original(*args, model_cfg=model_cfg, **kw)

    monkeypatch.setattr(step_lib, "train_step", spy)
    work = resumable_copy(six_steps, tmp_path / "w")
    train_lib.train(tiny_config(**{"model.remat": True, "model.dropout": 0.0}), work)
    assert seen and seen[0].remat and seen[0].resid_pdrop == seen[0].attn_pdrop == 0.0
    err = capsys.readouterr().err
    assert "resume: model.remat: False -> True" in err and "model.dropout: 0.1 -> 0.0" in err
    saved = json.loads((work / "config.json").read_text())["model"]
    assert saved["remat"] is True and saved["dropout"] == 0.0
    ckpt = ckpt_lib.Checkpointer(work / "checkpoints", read_only=True)
    assert ckpt.restore_config(6)["model"]["remat"] is True
    # Without dropout, step 4 (the first resumed step) computes another loss than with it.
    assert train_losses(work)[4] != train_losses(six_steps)[4]
    assert train_losses(work)[3] == train_losses(six_steps)[3]


def test_resume_with_another_shape_exits_2_naming_it_and_touches_nothing(six_steps, capsys):
    before = snapshot(six_steps)
    argv = ["train", f"--config={TINY}", f"--workdir={six_steps}", "--config.model.n_layer=2"]
    argv += ["--config.model.dropout=0.1", "--config.train.steps=9"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpt2-jax train: error: "), err
    assert "model.n_layer: saved 1, requested 2" in err[0] and "train.fresh=true" in err[0]
    assert snapshot(six_steps) == before


def test_fresh_moves_the_old_run_aside_and_trains_from_scratch(six_steps, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(six_steps, work)
    old = snapshot(work / "checkpoints")
    cfg = tiny_config(**{"train.fresh": True, "model.n_layer": 2, "train.steps": 3})
    train_lib.train(cfg, work)
    (aside,) = work.glob("checkpoints.old-*")
    assert snapshot(aside) == old  # moved whole, not copied or pruned
    assert list(work.glob("metrics.jsonl.old-*"))
    assert sorted(train_losses(work)) == [1, 2, 3]  # from scratch
    ckpt = ckpt_lib.Checkpointer(work / "checkpoints", read_only=True)
    assert ckpt.all_steps() == [3] and ckpt.restore_config(3)["model"]["n_layer"] == 2
    saved = json.loads((work / "config.json").read_text())["train"]
    assert saved["fresh"] is False  # one-time action: resuming this run must not repeat it


@pytest.mark.parametrize(
    "saved_scan", [True, False], ids=["scanned->unrolled", "unrolled->scanned"]
)
def test_a_checkpoint_resumes_and_evaluates_in_the_other_layer_layout(saved_scan, tmp_path):
    # No dropout: the scanned blocks draw their masks from a per-layer split of the rng,
    # the unrolled ones from their module names, so with dropout the two layouts train
    # (equally well, but) on different masks.
    two_layers = {"model.n_layer": 2, "model.dropout": 0.0}
    full = tmp_path / "full"
    final = train_lib.train(tiny_config(**two_layers, **{"model.scan_layers": saved_scan}), full)
    work = resumable_copy(full, tmp_path / "part")
    other = tiny_config(**two_layers, **{"model.scan_layers": not saved_scan})
    train_lib.train(other, work)
    got, want = train_losses(work), train_losses(full)
    np.testing.assert_allclose([got[s] for s in sorted(want)], list(want.values()), rtol=1e-6)

    # eval of the full run's step 6 in the other layout: the run's own final eval.
    cfg = tiny_config(**two_layers, **{"model.scan_layers": not saved_scan})
    source = plan_lib.resolve_weights(cfg, full)
    model_cfg, params = source.model_cfg, weights.params_of(source)
    assert source.step == 6 and model_cfg.scan_layers is (not saved_scan)
    assert ("h" in params) is (not saved_scan)
    splits = data_lib.load_splits(data_lib.DataConfig.from_mapping(cfg.data), ("validation",))
    mesh = sharding.make_mesh(cfg.mesh)
    plan = plan_lib.for_params(cfg, model_cfg, 1)
    (res,) = evaluate_splits(plan, params, splits, mesh, progress=False)
    np.testing.assert_allclose(res["loss"], final["validation"]["loss"], rtol=1e-6)


def test_export_step_n_writes_that_checkpoint(six_steps, tmp_path, capsys):
    from gpt2_jax.weights import hf

    argv = ["export", f"--workdir={six_steps}", "--step=3", f"--out={tmp_path / 'hf3'}"]
    assert cli.main(argv) == 0
    assert f"loaded checkpoint {six_steps / 'checkpoints' / '3'}" in capsys.readouterr().err
    _, exported = hf.load_pretrained(tmp_path / "hf3")
    saved = ckpt_lib.Checkpointer(six_steps / "checkpoints", read_only=True).restore(3)["params"]
    jax.tree.map(np.testing.assert_array_equal, exported, saved)
    assert (
        cli.main(["export", f"--workdir={six_steps}", "--step=4", f"--out={tmp_path / 'x'}"]) == 2
    )
    assert "step 4 is not saved" in capsys.readouterr().err
