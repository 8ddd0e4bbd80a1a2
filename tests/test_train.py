"""End to end on a tiny model: learning, exact resume, SIGTERM, devices, accumulation."""

import json
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gpt2_jax import data as data_lib
from gpt2_jax.config import base as config_lib
from gpt2_jax.train import loop as train_lib
from gpt2_jax.train import monitor
from gpt2_jax.weights import checkpoint as ckpt_lib

from .helpers import (
    ROOT,
    TINY,
    checkpoint_params,
    cli_in_process,
    copy_run,
    run_cli,
    tiny_config,
    train_losses,
    train_shared,
)

# checkpoint_params restores a checkpoint as saved (no target shardings): Orbax says so each time.
pytestmark = pytest.mark.filterwarnings("ignore:Sharding info not provided when restoring")


def train_command(*overrides: str) -> list[str]:
    """argv of `python -m gpt2_jax train` on the tiny config, for a process of its own."""
    return [sys.executable, "-m", "gpt2_jax", "train", f"--config={TINY}", *overrides]


def test_train_writes_workdir_and_learns(tmp_path):
    cfg = tiny_config(**{"train.steps": 30, "train.log_every": 5, "optim.learning_rate": 1e-2})
    results = train_lib.train(cfg, tmp_path)
    losses = train_losses(tmp_path)
    assert losses[30] < losses[5] - 0.5, losses  # visibly learns
    assert (tmp_path / "config.json").is_file()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["train"]["steps"] == 30 and saved["model"]["n_layer"] == 1
    assert ckpt_lib.Checkpointer(tmp_path / "checkpoints", read_only=True).latest_step() == 30
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    evals = [
        json.loads(x)
        for x in (tmp_path / "metrics.jsonl").read_text().splitlines()
        if json.loads(x)["split"] == "validation"
    ]
    assert evals and evals[-1]["step"] == 30
    r = results["validation"]
    np.testing.assert_allclose(r["perplexity"], np.exp(r["loss"]), rtol=1e-5)
    assert r["tokens"] > 0
    train_line = next(json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines())
    assert {"step", "split", "loss", "learning_rate", "tokens_per_second"} <= set(train_line)


def test_resume_gives_the_losses_of_an_uninterrupted_run(tiny_dropout_run, tmp_path):
    full = tiny_dropout_run.workdir  # 6 steps, checkpoints at 3 and 6
    part = copy_run(tiny_dropout_run, tmp_path / "part")
    shutil.rmtree(part / "checkpoints" / "6")  # as if the run had died after step 3
    train_lib.train(tiny_config(**{"model.dropout": 0.1}), part)
    assert train_losses(part) == train_losses(full)  # bitwise: same device count
    a, b = checkpoint_params(full), checkpoint_params(part)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_rerun_of_a_finished_run_trains_nothing_more(tiny_run, tmp_path):
    work = copy_run(tiny_run, tmp_path / "run")
    before = train_losses(work)
    train_lib.train(tiny_config(), work)
    assert train_losses(work) == before


def test_gradient_accumulation_matches_one_big_batch(tiny_run, tmp_path):
    one = tiny_run.results
    two = train_lib.train(tiny_config(**{"optim.accumulation_steps": 2}), tmp_path / "two")
    la, lb = train_losses(tiny_run.workdir), train_losses(tmp_path / "two")
    np.testing.assert_allclose([lb[s] for s in sorted(lb)], [la[s] for s in sorted(la)], rtol=1e-5)
    np.testing.assert_allclose(two["validation"]["loss"], one["validation"]["loss"], rtol=1e-5)


def test_non_finite_loss_stops_the_run_without_checkpointing_it(tmp_path):
    # log_every=6 > checkpoint_every=3: the check also runs at checkpoint steps.
    cfg = tiny_config(**{"optim.learning_rate": 1e12, "optim.grad_clip": 0, "train.log_every": 6})
    with pytest.raises(monitor.TrainingError, match="loss is (nan|inf) at step 3"):
        train_lib.train(cfg, tmp_path)
    assert ckpt_lib.Checkpointer(tmp_path / "checkpoints", read_only=True).latest_step() is None


def saved_layouts(workdir) -> dict:
    """{"params/h/attn/c_attn/kernel": (partition spec, shape, shape of one written shard)}
    for every array of the latest checkpoint's state, as Orbax recorded it at save time."""
    step = ckpt_lib.Checkpointer(workdir / "checkpoints", read_only=True).latest_step()
    meta = ocp.PyTreeCheckpointer().metadata(workdir / "checkpoints" / str(step) / "state")
    flat = jax.tree_util.tree_flatten_with_path(meta.item_metadata.tree)[0]
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): (
            tuple(leaf.sharding.partition_spec),
            tuple(leaf.shape),
            tuple(leaf.storage.write_shape),
        )
        for path, leaf in flat
    }


def test_two_devices_and_fsdp_match_one_device(tmp_path):
    args = ["train", f"--config={TINY}", "--config.model.dropout=0.1", "--config.train.steps=4"]
    args.append("--config.model.scan_layers=true")  # the stacked layout: its layer axis stays whole
    # Two devices need a process of their own (XLA_FLAGS before jax starts): both at once,
    # while this one (1 device) trains the reference.
    with ThreadPoolExecutor(2) as pool:
        two = pool.submit(run_cli, [*args, f"--workdir={tmp_path}/two"], devices=2)
        fsdp_args = [*args, f"--workdir={tmp_path}/fsdp", "--config.mesh.fsdp=2"]
        fsdp = pool.submit(run_cli, fsdp_args, devices=2)
        one = cli_in_process([*args, f"--workdir={tmp_path}/one"])
        two, fsdp = two.result(), fsdp.result()
    for out in (one, two, fsdp):
        assert out.returncode == 0, out.stderr[-3000:]
    assert "'data': 2" in two.stdout + two.stderr and "'fsdp': 2" in fsdp.stdout + fsdp.stderr
    ref = train_losses(tmp_path / "one")
    for name in ("two", "fsdp"):
        got = train_losses(tmp_path / name)
        np.testing.assert_allclose(
            [got[s] for s in sorted(ref)], [ref[s] for s in sorted(ref)], rtol=1e-5, err_msg=name
        )

    # The layouts the runs really used: data parallel replicates every parameter and moment;
    # FSDP splits each kernel and embedding (params and both Adam moments) in two along one
    # axis, and never along the stacked layer axis of h/.
    replicated = saved_layouts(tmp_path / "two")
    assert all(spec == () or set(spec) == {None} for spec, _, _ in replicated.values())
    split = saved_layouts(tmp_path / "fsdp")
    matrices = [k for k in split if k.endswith(("kernel", "embedding"))]
    assert len(matrices) == 3 * 6  # (wte, wpe, c_attn, attn.c_proj, c_fc, mlp.c_proj) x 3
    for key in matrices:
        spec, shape, written = split[key]
        assert spec.count("fsdp") == 1, (key, spec)
        axis = spec.index("fsdp")
        assert written[axis] * 2 == shape[axis], (key, shape, written)
        if "/h/" in f"/{key}":
            assert axis != 0, key  # layer axis of the scanned stack
    assert split["params/h/attn/c_attn/kernel"][0] == (None, None, "fsdp")  # [L, C, 3C]


@pytest.fixture(scope="module")
def forty_steps(tmp_path_factory):
    """The uninterrupted run the interrupted ones must reproduce: 40 steps, saved at the end."""
    return train_shared(
        tmp_path_factory, "forty", **{"train.steps": 40, "train.checkpoint_every": 0}
    )


def test_an_executable_from_the_compilation_cache_trains_bit_identically(tmp_path):
    """The suite runs on a persistent compilation cache (conftest.py): a run whose programs
    come from it gives the metrics and weights of a run that compiled them."""
    env = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla_cache"), "JAX_LOG_COMPILES": "1"}
    args = ["train", f"--config={TINY}", "--config.model.dropout=0.1", "--config.train.steps=3"]
    args.append("--config.train.report_to=none")  # no TensorBoard writer: not what is checked
    cold = run_cli([*args, f"--workdir={tmp_path / 'cold'}"], env_extra=env)
    warm = run_cli([*args, f"--workdir={tmp_path / 'warm'}"], env_extra=env)
    for out in (cold, warm):
        assert out.returncode == 0, out.stderr[-3000:]
    hit = "Persistent compilation cache hit for 'jit_train_step'"
    assert hit not in cold.stderr and hit in warm.stderr, warm.stderr[-3000:]

    def metrics(workdir):  # every logged figure but the timings
        lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if "per_second" not in k and k != "mfu"} for r in lines]

    assert metrics(tmp_path / "warm") == metrics(tmp_path / "cold")
    jax.tree.map(
        np.testing.assert_array_equal,
        checkpoint_params(tmp_path / "warm"),
        checkpoint_params(tmp_path / "cold"),
    )


def test_sigterm_saves_then_the_same_command_resumes_exactly(forty_steps, tmp_path):
    steps = 40
    args = train_command(f"--config.train.steps={steps}", "--config.train.checkpoint_every=0")
    work = tmp_path / "killed"
    proc = subprocess.Popen(
        [*args, f"--workdir={work}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        if (work / "metrics.jsonl").exists() and len(train_losses(work)) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    saved = ckpt_lib.Checkpointer(work / "checkpoints", read_only=True).latest_step()
    assert saved is not None and 3 <= saved < steps, err[-2000:]
    assert "SIGTERM: saved step" in out + err
    resumed = subprocess.run(
        [*args, f"--workdir={work}"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {work / 'checkpoints' / str(saved)}" in resumed.stdout + resumed.stderr
    assert train_losses(work) == train_losses(forty_steps.workdir)


def test_too_little_data_for_one_batch_is_a_clear_error_before_anything_is_written(tmp_path):
    cfg = tiny_config(**{"train.batch_size": 4096})
    with pytest.raises(data_lib.DataError, match="4096"):
        train_lib.train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_kill_9_mid_run_then_the_same_command_resumes(forty_steps, tmp_path):
    """kill -9 (no handler runs) while checkpoints are being written every step: the same
    command resumes from the last complete one, trains the losses of an uninterrupted run,
    and leaves no unfinished checkpoint directory behind."""
    work = tmp_path / "killed"
    args = train_command(
        "--config.train.steps=40", "--config.train.checkpoint_every=1", f"--workdir={work}"
    )
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = work / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and len([p for p in ckpts.glob("*") if p.name.isdigit()]) < 3:
        time.sleep(0.05)
    proc.kill()
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    saved = ckpt_lib.Checkpointer(ckpts, read_only=True).latest_step()
    assert saved is not None and saved < 40
    resumed = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {ckpts / str(saved)}" in resumed.stdout + resumed.stderr
    # Orbax writes each step into <step>.orbax-checkpoint-tmp-* and renames it when done.
    assert not list(ckpts.glob("*.orbax-checkpoint-tmp*")), sorted(p.name for p in ckpts.iterdir())
    lines = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["split"] == "train"] == list(range(1, 41))

    full = forty_steps.workdir
    assert train_losses(work) == train_losses(full)  # bitwise: same device count
    jax.tree.map(np.testing.assert_array_equal, checkpoint_params(work), checkpoint_params(full))


# ---------------------------------------------------------------------- keep-N, eval splits


PRUNED = {
    "train.checkpoint_every": 1,
    "train.keep_checkpoints": 2,
    "eval.splits": "validation,train",
}


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    """6 tiny steps, a checkpoint every step of which 2 are kept, eval of two splits."""
    run = train_shared(tmp_path_factory, "pruned", **PRUNED)
    return {"workdir": run.workdir, "overrides": PRUNED, "results": run.results}


def test_keep_checkpoints_prunes_all_but_the_newest(pruned_run):
    ckpts = pruned_run["workdir"] / "checkpoints"
    assert ckpt_lib.Checkpointer(ckpts, read_only=True).all_steps() == [5, 6]
    assert sorted(p.name for p in ckpts.iterdir()) == ["5", "6"]  # nothing else left over
    assert sorted(train_losses(pruned_run["workdir"])) == [1, 2, 3, 4, 5, 6]


def test_each_eval_split_is_scored_on_its_own_blocks(pruned_run):
    """eval.splits=validation,train: one result per split, each the loss of that split's
    first eval.max_batches * eval.batch_size blocks under the final params."""
    from gpt2_jax.evaluation import perplexity as evaluate

    workdir, results = pruned_run["workdir"], pruned_run["results"]
    cfg = tiny_config(**pruned_run["overrides"])
    assert list(results) == ["validation", "train"]
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["split"]) for r in lines if "perplexity" in r]
    assert evals == [(6, "validation"), (6, "train")]
    blocks = data_lib.load_splits(
        data_lib.DataConfig.from_mapping(cfg.data), ("train", "validation")
    )
    n = cfg.eval.max_batches * cfg.eval.batch_size
    model_cfg = config_lib.model_config(cfg)
    for split in ("validation", "train"):
        want = evaluate.eval_blocks(
            model_cfg, checkpoint_params(workdir), blocks[split][np.arange(n)], cfg.eval.batch_size
        )
        assert results[split]["tokens"] == want["tokens"] == n * (cfg.data.block_size - 1)
        np.testing.assert_allclose(results[split]["loss"], want["loss"], rtol=1e-5)
    assert abs(results["train"]["loss"] - results["validation"]["loss"]) > 1e-3


def test_eval_command_prints_one_line_per_split_in_the_order_asked(pruned_run):
    results = pruned_run["results"]
    proc = run_cli(
        ["eval", f"--workdir={pruned_run['workdir']}", "--config.eval.splits=train,validation"]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [json.loads(x) for x in proc.stdout.strip().splitlines()[-2:]]
    assert [r["split"] for r in got] == ["train", "validation"]
    for r in got:
        assert r["tokens"] == results[r["split"]]["tokens"]
        np.testing.assert_allclose(r["loss"], results[r["split"]]["loss"], rtol=1e-6)


def test_a_checkpoint_of_another_shape_is_refused_and_left_intact(pruned_run):
    """Restoring n_embd=32 arrays into an n_embd=64 model raises, naming the checkpoint;
    nothing in it changes."""
    from jax.sharding import NamedSharding, PartitionSpec

    from gpt2_jax.model import gpt2 as model_lib

    ckpts = pruned_run["workdir"] / "checkpoints"
    before = {p: p.read_bytes() for p in sorted(ckpts.rglob("*")) if p.is_file()}
    other = config_lib.model_config(tiny_config(**{"model.n_embd": 64}))
    abstract = jax.eval_shape(lambda rng: model_lib.init_params(other, rng), jax.random.PRNGKey(0))
    replicated = NamedSharding(jax.sharding.Mesh(jax.devices(), ("d",)), PartitionSpec())
    target = ckpt_lib.abstract_like(abstract, jax.tree.map(lambda _: replicated, abstract))
    with pytest.raises(ckpt_lib.CheckpointError, match=str(ckpts / "6")):
        ckpt_lib.Checkpointer(ckpts, read_only=True).restore(None, {"params": target}, partial=True)
    after = {p: p.read_bytes() for p in sorted(ckpts.rglob("*")) if p.is_file()}
    assert after == before
