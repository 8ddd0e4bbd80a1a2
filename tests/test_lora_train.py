"""LoRA training end to end: only the adapters train and are saved, the base stays bitwise,
the export loads in PEFT, 1 vs 2 devices and FSDP, kill -9 and resume, the base's identity,
the weights-reading commands, and bad input.

The base is a random odd-shaped Hugging Face GPT-2 (c_attn 48 x 144, c_fc 48 x 72) with the
real vocabulary (the tiny config's data are GPT-2 tokens); PEFT 0.21 is the reference.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from gpt2_jax.config import base as config_lib
from gpt2_jax.config import plan as plan_lib
from gpt2_jax.model import gpt2, lora
from gpt2_jax.train import lora_run
from gpt2_jax.weights import checkpoint as ckpt_lib
from gpt2_jax.weights import hf, lora_base
from gpt2_jax.weights import resolve as weights

from . import helpers

pytestmark = [
    pytest.mark.usefixtures("torch_one_thread"),
    pytest.mark.filterwarnings("ignore:Sharding info not provided when restoring"),
]

SHAPE = dict(n_layer=2, n_head=4, n_embd=48, n_inner=72, n_positions=64, vocab_size=50257)
STEPS = 40


def lora_overrides(base) -> dict:
    """The LoRA run every test reads: the tiny config on ``base``, rank 4 on every target,
    branch dropout on (a resume must replay its rng), a checkpoint at the end only."""
    return {
        "init_from": f"hf:{base}", "lora.rank": 4, "lora.alpha": 8.0, "lora.dropout": 0.1,
        "train.steps": STEPS, "train.checkpoint_every": 0, "optim.learning_rate": 1e-2,
        "optim.weight_decay": 0.1,
    }  # fmt: skip


def cli_args(command: str, overrides: dict, *extra: str) -> list[str]:
    flags = [f"--config.{k}={v}" for k, v in overrides.items()]
    return [command, f"--config={helpers.TINY}", *flags, *extra]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Two random bases of the same shape (``base``, ``other``) as Hugging Face dirs."""
    root = tmp_path_factory.mktemp("lora_bases")
    for seed, name in ((0, "base"), (1, "other")):
        helpers.random_hf_model(seed, **SHAPE).save_pretrained(root / name)
    return {"base": root / "base", "other": root / "other", "root": root}


@pytest.fixture(scope="module")
def run(tmp_path_factory, bases):
    """The LoRA run (``STEPS`` steps), and the base arrays as the loop held them."""
    placed = []

    def keep(base, shardings):
        placed.append(place(base, shardings))
        return placed[-1]

    place = lora_run.place
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lora_run, "place", keep)
        overrides = lora_overrides(bases["base"])
        trained = helpers.train_shared(tmp_path_factory, "lora_run", **overrides)
    return {"run": trained, "workdir": trained.workdir, "placed": placed[0]}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, bases):
    """One step of full fine-tuning of the same base (LoRA off)."""
    return helpers.train_shared(
        tmp_path_factory, "full_run", **{"init_from": f"hf:{bases['base']}", "train.steps": 1}
    )


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    """The run exported as a PEFT adapter dir and, with --merge, as a Hugging Face GPT-2."""
    out = tmp_path_factory.mktemp("lora_export")
    for name, extra in (("adapter", []), ("merged", ["--merge"])):
        got = helpers.cli_in_process(["export", f"--workdir={run['workdir']}",
                                      f"--out={out / name}", *extra])  # fmt: skip
        assert got.returncode == 0, got.stderr
    return {"adapter": out / "adapter", "merged": out / "merged"}


def leaf_paths(tree) -> list[str]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in flat]


def run_logits(workdir, ids, merged: bool) -> np.ndarray:
    """The run's logits: the base with the adapters beside it (as trained), or merged (as
    the weights-reading commands run it)."""
    cfg = config_lib.for_command(None, str(workdir), {})
    source = plan_lib.weights_only(cfg, str(workdir), None, 1).source
    if merged:
        return np.asarray(gpt2.GPT2(source.model_cfg).apply(
            {"params": weights.params_of(source)}, ids))  # fmt: skip
    model_cfg = dataclasses.replace(source.model_cfg, lora=source.lora)
    variables = {"params": weights.load_hf_params(source.base), "lora": weights.adapters_of(source)}
    return np.asarray(gpt2.GPT2(model_cfg).apply(variables, ids))


def torch_logits(m, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return m(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()


# ---------------------------------------------------------------------- what trains


def test_only_the_adapters_train_and_the_base_stays_bitwise(run, bases):
    workdir = run["workdir"]
    _, fresh = hf.load_pretrained(bases["base"])
    # The base the steps read, after all of them: every array bitwise the file's.
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(run["placed"]), fresh)
    # The checkpoint holds the adapters and their optimizer state: no base leaf.
    state = ckpt_lib.Checkpointer(workdir / "checkpoints", read_only=True).restore(None)
    params = leaf_paths(state["params"])
    assert len(params) == 2 * 4 * 2 and all(p.endswith(("lora_A", "lora_B")) for p in params)
    assert not [p for p in leaf_paths(state) if p.endswith(("kernel", "embedding", "bias"))]
    flat = jax.tree_util.tree_flatten_with_path(state["params"])[0]
    assert all(np.any(x) for path, x in flat if path[-1].key == "lora_B")  # B starts at zero
    losses = helpers.train_losses(workdir)
    assert np.mean([losses[s] for s in range(31, 41)]) < np.mean([losses[s] for s in range(1, 11)])
    # The base's identity is recorded with the run and each checkpoint.
    record = json.loads((workdir / "config.json").read_text())["lora"]
    identity = {"init_from": f"hf:{bases['base']}", "sha256": lora_base.base_sha256(fresh)}
    assert record["base"] == identity and (record["rank"], record["alpha"]) == (4, 8.0)
    saved = ckpt_lib.Checkpointer(workdir / "checkpoints", read_only=True).restore_config()
    assert saved["lora"]["base"] == identity
    assert "lora        rank 4, alpha 8 on c_attn,c_proj,c_fc, dropout 0.1; trains" in (
        run["run"].stdout
    )


def test_base_hash_ignores_the_layout_and_sees_one_changed_number(bases):
    _, unrolled = hf.load_pretrained(bases["base"])
    _, scanned = hf.load_pretrained(bases["base"], scan_layers=True)
    assert lora_base.base_sha256(unrolled) == lora_base.base_sha256(scanned)
    unrolled["h_1"]["mlp"]["c_fc"]["bias"][3] += 1e-7
    assert lora_base.base_sha256(unrolled) != lora_base.base_sha256(scanned)


# ---------------------------------------------------------------------- PEFT and export


def test_export_loads_in_peft_with_the_runs_logits(run, exported, bases):
    import peft
    import transformers

    ids = np.random.default_rng(0).integers(0, SHAPE["vocab_size"], (2, 32)).astype(np.int32)
    config = json.loads((exported["adapter"] / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(bases["base"])
    assert (config["r"], config["lora_alpha"], config["fan_in_fan_out"]) == (4, 8, True)
    base = transformers.GPT2LMHeadModel.from_pretrained(bases["base"]).eval()
    pm = peft.PeftModel.from_pretrained(base, exported["adapter"]).eval()
    want = torch_logits(pm, ids)
    np.testing.assert_allclose(run_logits(run["workdir"], ids, False), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run_logits(run["workdir"], ids, True), want, rtol=1e-5, atol=1e-5)
    merged = transformers.GPT2LMHeadModel.from_pretrained(exported["merged"]).eval()
    np.testing.assert_allclose(
        torch_logits(merged, ids), torch_logits(pm.merge_and_unload(), ids), rtol=1e-5, atol=1e-5
    )


def test_merge_of_a_run_that_trained_every_weight_is_an_error(full_run, tmp_path):
    got = helpers.cli_in_process(
        ["export", f"--workdir={full_run.workdir}", f"--out={tmp_path / 'x'}", "--merge"]
    )
    assert got.returncode == 2 and "--merge" in got.stderr and "not a LoRA run" in got.stderr
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------- devices, resume


def test_two_devices_and_fsdp_match_one_device(run, bases, tmp_path):
    args = cli_args("train", {**lora_overrides(bases["base"]), "train.progress": "false"})
    with ThreadPoolExecutor(2) as pool:
        two = pool.submit(helpers.run_cli, [*args, f"--workdir={tmp_path}/two"], devices=2)
        fsdp_args = [*args, f"--workdir={tmp_path}/fsdp", "--config.mesh.fsdp=2"]
        fsdp = pool.submit(helpers.run_cli, fsdp_args, devices=2)
        two, fsdp = two.result(), fsdp.result()
    for out in (two, fsdp):
        assert out.returncode == 0, out.stderr[-3000:]
    assert "'data': 2" in two.stdout + two.stderr and "'fsdp': 2" in fsdp.stdout + fsdp.stderr
    ref = helpers.train_losses(run["workdir"])
    for name in ("two", "fsdp"):
        got = helpers.train_losses(tmp_path / name)
        np.testing.assert_allclose(
            [got[s] for s in sorted(ref)], [ref[s] for s in sorted(ref)], rtol=1e-5, err_msg=name
        )


def test_kill_9_then_the_same_command_resumes_the_runs_losses(run, bases, tmp_path):
    work = tmp_path / "killed"
    overrides = {**lora_overrides(bases["base"]), "train.checkpoint_every": 1}
    args = [sys.executable, "-m", "gpt2_jax", *cli_args("train", overrides, f"--workdir={work}")]
    proc = subprocess.Popen(
        args, cwd=helpers.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpts = work / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and len([p for p in ckpts.glob("*") if p.name.isdigit()]) < 3:
        time.sleep(0.05)
    proc.kill()
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    saved = ckpt_lib.Checkpointer(ckpts, read_only=True).latest_step()
    assert saved is not None and saved < STEPS
    resumed = subprocess.run(args, cwd=helpers.ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {ckpts / str(saved)}" in resumed.stdout + resumed.stderr
    assert helpers.train_losses(work) == helpers.train_losses(run["workdir"])  # bitwise
    jax.tree.map(
        np.testing.assert_array_equal,
        helpers.checkpoint_params(work),
        helpers.checkpoint_params(run["workdir"]),
    )


def test_resume_on_another_base_is_refused_naming_both(run, bases, tmp_path):
    work = helpers.copy_run(run["run"], tmp_path / "run")
    before = helpers.snapshot(work)
    other = {**lora_overrides(bases["other"]), "train.steps": STEPS + 2}
    got = helpers.cli_in_process(cli_args("train", other, f"--workdir={work}"))
    assert got.returncode == 2, got.stderr
    line = got.stderr.strip().splitlines()[-1]
    assert f"hf:{bases['base']}" in line and f"hf:{bases['other']}" in line, line
    recorded = json.loads((work / "config.json").read_text())["lora"]["base"]["sha256"]
    assert recorded in line
    assert helpers.snapshot(work) == before
    # The weights-reading commands check the content (the base may have moved).
    got = helpers.cli_in_process(["eval", f"--workdir={work}",
                                  f"--config.init_from=hf:{bases['other']}"])  # fmt: skip
    assert got.returncode == 2 and recorded in got.stderr and "sha256" in got.stderr


def test_a_full_checkpoint_is_not_resumed_with_lora_on(full_run, bases, tmp_path):
    work = helpers.copy_run(full_run, tmp_path / "run")
    before = helpers.snapshot(work)
    got = helpers.cli_in_process(cli_args("train", lora_overrides(bases["base"]),
                                          f"--workdir={work}"))  # fmt: skip
    assert got.returncode == 2 and "lora.rank" in got.stderr and "every weight" in got.stderr
    assert helpers.snapshot(work) == before


# ---------------------------------------------------------------------- the commands


def test_eval_and_generate_of_the_workdir_and_of_base_plus_adapter_agree(run, exported, bases):
    from gpt2_jax.evaluation import harness
    from gpt2_jax.evaluation.harness import command as harness_command

    workdir, base = run["workdir"], f"hf:{bases['base']}"
    a = helpers.cli_in_process(["eval", f"--workdir={workdir}"])
    b = helpers.cli_in_process(["eval", f"--config={helpers.TINY}", f"--config.init_from={base}",
                                f"--adapter={exported['adapter']}"])  # fmt: skip
    assert a.returncode == b.returncode == 0, a.stderr + b.stderr
    ra, rb = helpers.last_json(a.stdout)[0], helpers.last_json(b.stdout)[0]
    np.testing.assert_allclose(ra["loss"], run["run"].results["validation"]["loss"], rtol=1e-6)
    np.testing.assert_allclose(rb["loss"], ra["loss"], rtol=1e-6)
    flags = ["--prompt=The if statement", "--max_new_tokens=8", "--temperature=0"]
    c = helpers.cli_in_process(["generate", f"--workdir={workdir}", *flags])
    d = helpers.cli_in_process(["generate", f"--init_from={base}",
                                f"--adapter={exported['adapter']}", *flags])  # fmt: skip
    assert c.returncode == d.returncode == 0, c.stderr + d.stderr
    assert c.stdout == d.stdout and f"(LoRA adapters on {base})" in c.stderr
    # lm-eval's loading: the same merged weights; --adapter goes with --init_from.
    _, from_workdir, _ = harness.load_weights(workdir=workdir)
    _, from_adapter, _ = harness.load_weights(init_from=base, adapter=str(exported["adapter"]))
    assert helpers.tree_max_abs_diff(from_workdir, from_adapter) < 1e-6
    args = harness_command.command_args("", "", None, base, None, str(exported["adapter"]))
    assert args == {"init_from": base, "adapter": str(exported["adapter"])}
    with pytest.raises(harness.HarnessError, match="--adapter"):
        harness_command.command_args("", str(workdir), None, "", None, str(exported["adapter"]))


# ---------------------------------------------------------------------- bad input


def bad_adapters(exported, root) -> dict:
    """Adapter directories that must be refused, by what their message names."""
    out = {}
    empty = root / "no_config"
    empty.mkdir()
    out["adapter_config.json"] = empty
    ia3 = shutil.copytree(exported["adapter"], root / "ia3")
    config = json.loads((ia3 / "adapter_config.json").read_text())
    (ia3 / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    out["peft_type='IA3'"] = ia3
    shapes = shutil.copytree(exported["adapter"], root / "shapes")
    tensors = load_file(shapes / "adapter_model.safetensors")
    name = "base_model.model.transformer.h.1.mlp.c_fc.lora_A.weight"
    tensors[name] = np.zeros((4, 40), np.float32)
    save_file(tensors, str(shapes / "adapter_model.safetensors"))
    out[f"tensor {name} has shape (4, 40)"] = shapes
    return out


def test_bad_input_is_one_line_exit_2_and_writes_nothing(exported, bases, tmp_path):
    base = f"hf:{bases['base']}"
    lora_on = lora_overrides(bases["base"])
    targets = "lora.targets: 'q_proj' is not a GPT-2 module LoRA can adapt; valid names: c_attn"
    cases = [
        (cli_args("train", {**lora_on, "lora.targets": "c_attn,q_proj"}), [targets]),
        (cli_args("train", {**lora_on, "init_from": ""}), ["lora.rank: LoRA adapts pretrained"]),
    ]
    for needle, adapter in bad_adapters(exported, tmp_path).items():
        named = ["lora.init_from: ", str(adapter), needle]
        cases.append((cli_args("train", {**lora_on, "lora.init_from": adapter}), named))
        cases.append((["generate", f"--init_from={base}", f"--adapter={adapter}"], named))
        cases.append((["eval", f"--config={helpers.TINY}", f"--config.init_from={base}",
                       f"--adapter={adapter}"], named))  # fmt: skip
    for i, (argv, needles) in enumerate(cases):
        work = tmp_path / f"work{i}"
        got = helpers.cli_in_process([*argv, f"--workdir={work}"] if argv[0] == "train" else argv)
        lines = got.stderr.strip().splitlines()
        assert got.returncode == 2, (argv, got.stderr[-2000:])
        assert len(lines) == 1 and all(n in lines[0] for n in needles), (argv, lines)
        assert not work.exists()


# ---------------------------------------------------------------------- SFT formats


def test_lora_with_sft_packing_and_accumulation(bases, tmp_path):
    from gpt2_jax.train import loop as train_lib

    sft = str(helpers.ROOT / "configs" / "sft.py:tiny")
    common = {"init_from": f"hf:{bases['base']}", "lora.rank": "4", "train.steps": "3",
              "train.checkpoint_every": "0", "train.progress": "false"}  # fmt: skip
    losses = []
    for accum in (1, 2):
        cfg = config_lib.load_config_file(sft)
        config_lib.apply_overrides(cfg, {**common, "optim.accumulation_steps": str(accum)})
        train_lib.train(cfg, tmp_path / f"a{accum}")
        losses.append(helpers.train_losses(tmp_path / f"a{accum}"))
    assert sorted(losses[0]) == [1, 2, 3]
    np.testing.assert_allclose(
        [losses[1][s] for s in (1, 2, 3)], [losses[0][s] for s in (1, 2, 3)], rtol=1e-5
    )


def test_sft_lora_recipes(tmp_path, bases):
    cfg = config_lib.load_config_file(str(helpers.ROOT / "configs" / "sft.py:lora"))
    config_lib.validate(cfg, 1)
    s = config_lib.sections(cfg)
    assert s.lora.lora_config() == lora.LoraConfig(rank=16, alpha=32.0, dropout=0.05)
    assert s.init_from == "hf:openai-community/gpt2" and s.optim.learning_rate == 2e-4
    local = config_lib.load_config_file(str(helpers.ROOT / "configs" / "sft.py:local_lora"))
    with pytest.raises(config_lib.ConfigError, match="lora.rank: LoRA adapts pretrained"):
        plan_lib.training(local, tmp_path / "run", 1)
    config_lib.apply_overrides(local, {"init_from": f"hf:{bases['base']}", "data.block_size": "64"})
    plan = plan_lib.training(local, tmp_path / "run", 1)
    assert plan.model.lora.rank == 16 and plan.model.n_embd == SHAPE["n_embd"]
    assert plan.record["lora"]["targets"] == "c_attn,c_proj,c_fc"
    assert not (tmp_path / "run").exists()


def test_training_starts_from_a_peft_adapter(run, exported, bases, tmp_path):
    """lora.init_from: the adapter's config fixes rank, alpha and targets (a note says so),
    and its tensors are the starting adapters (the first warmup step's learning rate is 0:
    still them after it)."""
    overrides = {**lora_overrides(bases["base"]), "lora.rank": 16, "train.steps": 1,
                 "optim.learning_rate": 1e-30, "lora.init_from": exported["adapter"]}  # fmt: skip
    got = helpers.cli_in_process(cli_args("train", overrides, f"--workdir={tmp_path / 'run'}"))
    assert got.returncode == 0, got.stderr[-3000:]
    assert "note: lora.rank: 16 -> 4" in got.stderr
    jax.tree.map(
        np.testing.assert_array_equal,
        helpers.checkpoint_params(tmp_path / "run"),
        helpers.checkpoint_params(run["workdir"]),
    )
