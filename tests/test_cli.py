"""The `gpt2-jax` command line end to end, as a new user runs it: what a command computes
through ``cli.main`` in this process, what only a process shows (exit codes, stderr holding
just the error line, the console script) through ``python -m gpt2_jax``.

A tiny random Hugging Face GPT-2 (2 layers, n_embd 32, the full 50257 vocabulary) is the
starting point; PyTorch's GPT2LMHeadModel is the reference for every number checked:
eval losses (blocks and sliding window), the first train loss, exported logits, greedy
samples. Also: resume without the Hugging Face weights, export safety, and that bad input
ends in one "error:" line with exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from gpt2_jax import data
from gpt2_jax.cli import main as cli
from gpt2_jax.config import base as config_lib
from gpt2_jax.config import plan as plan_lib
from gpt2_jax.data import tokenizer
from gpt2_jax.evaluation.perplexity import evaluate_splits
from gpt2_jax.model import config as gpt2_config
from gpt2_jax.model import gpt2 as model
from gpt2_jax.parallel import sharding
from gpt2_jax.weights import checkpoint as ckpt_lib
from gpt2_jax.weights import hf

from . import helpers
from .helpers import ROOT, checkpoint_params, cli_in_process, last_json, run_cli, snapshot

CONFIG = f"{ROOT / 'configs' / 'gpt2_wikitext2.py'}:local"
SHAPE = dict(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
BLOCK = 64
EVAL_BATCH = 4
LR = 1e-4
pytestmark = [
    # Many small PyTorch forwards: one thread is ~10x faster than 2 on a shared 2-core box.
    pytest.mark.usefixtures("torch_one_thread"),
    # Checkpointer.restore(None) (tests only) reads the shardings saved with the checkpoint.
    pytest.mark.filterwarnings("ignore:Sharding info not provided when restoring"),
]


# ---------------------------------------------------------------------- helpers


def random_hf_model(seed: int = 0, **sizes):
    """helpers.random_hf_model of this file's SHAPE (``sizes`` override fields)."""
    return helpers.random_hf_model(seed, **{**SHAPE, **sizes})


def assert_user_error(proc, command: str, *needles: str) -> None:
    """Exit code 2, no traceback, exactly one 'gpt2-jax CMD: error:' line naming the thing."""
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    lines = err.splitlines()
    hits = [i for i, line in enumerate(lines) if "error:" in line]
    assert len(hits) == 1, err[-3000:]
    assert lines[hits[0]].startswith(f"gpt2-jax {command}: error: "), err[-3000:]
    message = "\n".join(lines[hits[0] :])  # a listing (bad tensors) may follow its line
    for needle in needles:
        assert needle in message, (needle, err[-3000:])


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """What conftest's (function-scoped) autouse fixture sets, for the processes started."""
    return helpers.isolation_env(tmp_path_factory.getbasetemp())


def cli_run(args, env, **kw):
    """A command in a process of its own: for what only a process shows (its exit code,
    nothing printed but the one error line)."""
    return run_cli([str(a) for a in args], env_extra=env, **kw)


def cli_runs(arg_lists, env):
    """Several independent commands, two at a time (most of each is Python/JAX start-up)."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda args: cli_run(args, env), arg_lists))


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """Small train / validation files cut (at line ends) from the shipped wikitext slice."""
    lines = helpers.wiki_lines()
    root = tmp_path_factory.mktemp("texts")
    out, start = {}, 0
    for name, chars in (("validation", 6000), ("train", 12000)):
        end, total = start, 0
        while total < chars:
            total += len(lines[end])
            end += 1
        out[name] = root / f"{name}.raw"
        out[name].write_text("".join(lines[start:end]), encoding="utf-8")
        start = end
    return out


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """Hugging Face's GPT-2 tokenizer over the same vocab files (independent of tiktoken)."""
    directory = tmp_path_factory.mktemp("hf_tokenizer")
    encoder_json, vocab_bpe = tokenizer.vocab_files()
    shutil.copyfile(encoder_json, directory / "vocab.json")
    shutil.copyfile(vocab_bpe, directory / "merges.txt")
    return transformers.GPT2Tokenizer.from_pretrained(directory)


def run_clm_tokens(path: Path, tok) -> tuple[list[list[int]], list[int]]:
    """Per-row ids of a text file read as run_clm does (datasets' text builder keeps line
    ends), and their concatenation."""
    rows = [tok(line)["input_ids"] for line in path.read_text(encoding="utf-8").splitlines(True)]
    return rows, [t for row in rows for t in row]


def run_clm_blocks(path: Path, tok) -> np.ndarray:
    """run_clm's group_texts: concatenate each 1000-row chunk, cut BLOCK-token blocks, drop
    each chunk's remainder."""
    rows, _ = run_clm_tokens(path, tok)
    out = []
    for start in range(0, len(rows), 1000):
        out += helpers.group_texts({"input_ids": rows[start : start + 1000]}, BLOCK)["input_ids"]
    return np.asarray(out, np.int64).reshape(-1, BLOCK)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """(torch model, its save_pretrained directory)."""
    m = random_hf_model()
    directory = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    m.save_pretrained(directory)
    return m, directory


def data_args(texts) -> list[str]:
    return [
        f"--config.data.train_files={texts['train']}",
        f"--config.data.validation_files={texts['validation']}",
        f"--config.data.block_size={BLOCK}",
        f"--config.eval.batch_size={EVAL_BATCH}",
    ]


def train_args(workdir: Path, hf_dir: Path, texts, steps: int) -> list[str]:
    return [
        "train",
        f"--config={CONFIG}",
        f"--workdir={workdir}",
        f"--config.init_from=hf:{hf_dir}",
        *data_args(texts),
        "--config.train.batch_size=4",
        f"--config.train.steps={steps}",
        "--config.train.log_every=1",
        "--config.model.dropout=0",
        f"--config.optim.learning_rate={LR}",
        "--config.train.progress=false",
        "--config.eval.max_batches=1",
    ]


@pytest.fixture(scope="module")
def run(tmp_path_factory, hf_model, texts):
    """`gpt2-jax train` for 2 steps from a private copy of the Hugging Face directory."""
    root = tmp_path_factory.mktemp("run")
    hf_copy = root / "hf_for_training"
    shutil.copytree(hf_model[1], hf_copy)
    workdir = root / "workdir"
    with helpers.isolated(tmp_path_factory.getbasetemp()):
        proc = cli_in_process(train_args(workdir, hf_copy, texts, steps=2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"workdir": workdir, "hf": hf_copy, "proc": proc}


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "hf_out"
    with helpers.isolated(tmp_path_factory.getbasetemp()):
        proc = cli_in_process(["export", f"--workdir={run['workdir']}", f"--out={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {out}" in proc.stdout
    return out


# ---------------------------------------------------------------------- 1. eval from hf:


def test_eval_init_from_hf_matches_pytorch(hf_model, texts, hf_tokenizer):
    m, hf_dir = hf_model
    base = ["eval", f"--config={CONFIG}", f"--config.init_from=hf:{hf_dir}", *data_args(texts)]
    blocks_run = cli_in_process([*base, "--config.train.progress=false"])
    window_run = cli_in_process([*base, "--config.eval.stride=32"])
    for proc in (blocks_run, window_run):
        assert proc.returncode == 0, proc.stderr[-3000:]

    # run_clm blocks: the mean of torch's loss over the same blocks.
    (res,) = last_json(blocks_run.stdout)
    assert set(res) == {"split", "loss", "perplexity", "tokens"} and res["split"] == "validation"
    blocks = run_clm_blocks(texts["validation"], hf_tokenizer)
    assert len(blocks) >= 3 * EVAL_BATCH  # several batches, the last one padded or not
    assert res["tokens"] == len(blocks) * (BLOCK - 1)
    np.testing.assert_allclose(res["loss"], helpers.torch_loss(m, blocks), rtol=1e-5)
    np.testing.assert_allclose(res["perplexity"], np.exp(res["loss"]), rtol=1e-9)
    assert "eval:" not in blocks_run.stderr  # train.progress=false silences the bar

    # Sliding window (stride 32, windows of block_size): Hugging Face's perplexity loop.
    (win,) = last_json(window_run.stdout)
    assert {"split", "loss", "perplexity", "tokens", "windows"} <= set(win)
    assert isinstance(win["windows"], int) and isinstance(win["scored_tokens"], int)
    _, stream = run_clm_tokens(texts["validation"], hf_tokenizer)
    ref_loss, ref_tokens = helpers.torch_sliding_window(m, np.asarray(stream), BLOCK, 32)
    assert win["tokens"] == ref_tokens
    np.testing.assert_allclose(win["loss"], ref_loss, rtol=1e-5)
    assert win["windows"] == -(-(len(stream) - BLOCK) // 32) + 1
    assert 1e-4 < abs(win["loss"] - res["loss"]) < 0.5  # more context: close, not equal


def test_eval_max_batches_counts_batches_in_both_modes(hf_model, texts):
    """eval.max_batches=N scores N batches of blocks, or N batches of sliding windows."""
    cfg = config_lib.load_config_file(CONFIG)
    overrides = dict(a[len("--config.") :].split("=", 1) for a in data_args(texts))
    config_lib.apply_overrides(cfg, {**overrides, "eval.max_batches": "2"})
    model_cfg, params = hf.load_pretrained(hf_model[1])
    splits = data.load_splits(data.DataConfig.from_mapping(cfg.data), ("validation",))
    mesh = sharding.make_mesh(cfg.mesh)
    plan = plan_lib.for_params(cfg, model_cfg, jax.device_count())
    (res,) = evaluate_splits(plan, params, splits, mesh, progress=False)
    assert res["tokens"] == 2 * EVAL_BATCH * (BLOCK - 1)
    for stride in (16, BLOCK):
        config_lib.apply_overrides(cfg, {"eval.stride": str(stride)})
        plan = plan_lib.for_params(cfg, model_cfg, jax.device_count())
        (win,) = evaluate_splits(plan, params, splits, mesh, progress=False)
        assert win["windows"] == 2 * EVAL_BATCH, stride
    config_lib.apply_overrides(cfg, {"eval.stride": str(BLOCK + 1)})
    with pytest.raises(config_lib.ConfigError, match="eval.stride=65 must be <= data.block_size"):
        plan_lib.for_params(cfg, model_cfg, jax.device_count())


# ---------------------------------------------------------------------- 2. train from hf:


def test_train_from_hf_starts_at_its_weights(run, hf_model, texts, hf_tokenizer):
    m, hf_dir = hf_model
    workdir = run["workdir"]
    metrics = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_loss = {r["step"]: r["loss"] for r in metrics if r["split"] == "train"}
    assert sorted(train_loss) == [1, 2]
    # Step 1's loss is computed on the unchanged weights: torch's loss on the first batch.
    blocks = run_clm_blocks(texts["train"], hf_tokenizer)
    first = blocks[data.BatchLoader(len(blocks), 4, seed=0).indices(0)]
    np.testing.assert_allclose(train_loss[1], helpers.torch_loss(m, first), rtol=2e-5)
    (final,) = last_json(run["proc"].stdout)
    assert final["split"] == "validation" and final["tokens"] == EVAL_BATCH * (BLOCK - 1)

    # The checkpoint is the HF weights moved by two small AdamW steps (|update| <~ lr each);
    # any other init (scratch is std 0.02 vs these std-0.1 weights) would be ~0.1 away.
    _, hf_params = hf.load_pretrained(hf_dir)
    diff = helpers.tree_max_abs_diff(checkpoint_params(workdir), hf_params)
    assert 0 < diff < 5 * 2 * LR, diff

    saved = json.loads((workdir / "config.json").read_text())
    assert saved["init_from"] == f"hf:{run['hf']}"
    got = {k: saved["model"][k] for k in SHAPE}
    assert got == SHAPE and saved["model"]["size"] == ""


def test_train_rerun_resumes_without_the_hf_weights(run, texts, tmp_path):
    workdir = tmp_path / "workdir"
    shutil.copytree(run["workdir"], workdir)
    before = (workdir / "metrics.jsonl").read_text().splitlines()
    hidden = run["hf"].with_name("hf_moved_away")
    run["hf"].rename(hidden)  # the same command must not need (or reload) them
    try:
        proc = cli_in_process(train_args(workdir, run["hf"], texts, steps=3))
    finally:
        hidden.rename(run["hf"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {workdir / 'checkpoints' / '2'}" in proc.stdout + proc.stderr
    assert ckpt_lib.Checkpointer(workdir / "checkpoints", read_only=True).latest_step() == 3
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    steps = [(r["step"], r["split"]) for r in map(json.loads, lines)]
    assert lines[: len(before)] == before and (3, "train") in steps
    diff = helpers.tree_max_abs_diff(checkpoint_params(workdir), checkpoint_params(run["workdir"]))
    assert 0 < diff < 5 * LR  # one more small step from step 2, not a reload


def test_train_from_hf_model_with_non_default_mlp_width(tmp_path, texts, capsys):
    """n_inner != 4 * n_embd and another layer_norm_epsilon: recorded in config.json, trained."""
    random_hf_model(n_inner=48, layer_norm_epsilon=1e-6).save_pretrained(tmp_path / "hf")
    # model.size='' too: a config that only says init_from gets its shape from config.json.
    argv = [*train_args(tmp_path / "w", tmp_path / "hf", texts, steps=1), "--config.model.size="]
    assert cli.main(argv) == 0, capsys.readouterr().err[-3000:]
    saved = json.loads((tmp_path / "w" / "config.json").read_text())["model"]
    assert saved["n_inner"] == 48 and saved["layer_norm_epsilon"] == 1e-6
    params = checkpoint_params(tmp_path / "w")
    assert params["h_0"]["mlp"]["c_fc"]["kernel"].shape[-1] == 48


# ---------------------------------------------------------------------- 3. export


def test_export_loads_in_transformers_with_the_same_logits(run, exported, capfd):
    loaded, info = transformers.GPT2LMHeadModel.from_pretrained(exported, output_loading_info=True)
    assert all(not v for v in info.values()), info  # nothing missing / unexpected / mismatched
    ids = np.random.default_rng(0).integers(0, SHAPE["vocab_size"], (2, BLOCK))
    with torch.no_grad():
        theirs = loaded.eval()(torch.as_tensor(ids)).logits.numpy()
    ours = model.GPT2(gpt2_config.GPT2Config(**SHAPE)).apply(
        {"params": checkpoint_params(run["workdir"])}, ids.astype(np.int32)
    )
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=0, atol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(exported)
    text = "Hello world, it's 3.14 -- ÆØÅ"
    assert tok(text)["input_ids"] == tokenizer.get_tokenizer().encode_ordinary(text)


def test_export_refuses_a_non_empty_dir_unless_overwrite(run, exported):
    before = snapshot(exported)
    args = ["export", f"--workdir={run['workdir']}", f"--out={exported}"]
    refused = cli_in_process(args)
    assert_user_error(refused, "export", str(exported), "--overwrite")
    assert snapshot(exported) == before
    assert sorted(p.name for p in exported.parent.iterdir()) == [exported.name]  # no temp dir
    again = cli_in_process([*args, "--overwrite"])
    assert again.returncode == 0, again.stderr[-3000:]
    after = snapshot(exported)
    assert sorted(after) == sorted(before)
    mtime, sha = 1, 2  # fields of helpers.snapshot: (size, mtime_ns, sha256)
    assert after["model.safetensors"][sha] == before["model.safetensors"][sha]  # same weights
    assert after["model.safetensors"][mtime] != before["model.safetensors"][mtime]  # rewritten


def test_eval_of_the_run_matches_its_export(run, exported, texts, hf_tokenizer):
    proc = cli_in_process(
        [
            "eval",
            f"--workdir={run['workdir']}",
            "--config.eval.max_batches=2",
            "--config.train.progress=false",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (res,) = last_json(proc.stdout)
    blocks = run_clm_blocks(texts["validation"], hf_tokenizer)[: 2 * EVAL_BATCH]
    assert res["tokens"] == blocks.size - len(blocks)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(exported).eval()
    np.testing.assert_allclose(res["loss"], helpers.torch_loss(loaded, blocks), rtol=1e-5)


# ---------------------------------------------------------------------- 4. generate


def test_generate_greedy_from_workdir_and_hf(run, exported, hf_model):
    greedy = ["--prompt=Hello", "--max_new_tokens=5", "--temperature=0"]
    first, second, from_hf = (
        cli_in_process(args)
        for args in (
            ["generate", f"--workdir={run['workdir']}", *greedy],
            ["generate", f"--workdir={run['workdir']}", *greedy],
            ["generate", f"--init_from=hf:{hf_model[1]}", *greedy],
        )
    )
    for proc in (first, second, from_hf):
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.startswith("Hello") and len(proc.stdout) > len("Hello\n")
    assert first.stdout == second.stdout
    enc = tokenizer.get_tokenizer()
    trained = transformers.GPT2LMHeadModel.from_pretrained(exported).eval()
    for proc, reference in ((first, trained), (from_hf, hf_model[0])):
        ids, gap = helpers.torch_greedy(reference, enc.encode_ordinary("Hello"), 5)
        if gap > 1e-3:  # no near-tie that float rounding could flip
            assert proc.stdout == tokenizer.decode(enc, ids) + "\n"


def test_generate_seed_controls_sampling(hf_model):
    sample = [
        "generate",
        f"--init_from=hf:{hf_model[1]}",
        "--prompt=Hello",
        "--max_new_tokens=12",
        "--temperature=1",
        "--top_k=0",
    ]
    a, a_again, b = (
        cli_in_process([*sample, seed]) for seed in ("--seed=0", "--seed=0", "--seed=1")
    )
    for proc in (a, a_again, b):
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.startswith("Hello")
    assert a.stdout == a_again.stdout
    assert a.stdout != b.stdout  # 12 draws from a near-flat 50257-way distribution


# ---------------------------------------------------------------------- 5. bad input


def test_bad_input_is_one_error_line_and_exit_2(hf_model, texts, env, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()

    bad = tmp_path / "bad_hf"  # wpe cut to 50 of its 64 positions
    bad.mkdir()
    shutil.copy(hf_model[1] / "config.json", bad / "config.json")
    tensors = load_file(hf_model[1] / "model.safetensors")
    tensors["transformer.wpe.weight"] = tensors["transformer.wpe.weight"][:50].copy()
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})

    eval_hf = ["eval", f"--config={CONFIG}", *data_args(texts)]
    cases = [
        (["eval", f"--workdir={empty}"], "eval", [str(empty), "config.json"]),
        ([*eval_hf, "--config.init_from=hf:/nonexistent"], "eval", ["'/nonexistent'"]),
        (
            [*train_args(tmp_path / "w", bad, texts, steps=1)],
            "train",
            ["wpe.weight: checkpoint (50, 32), config wants (64, 32)", str(bad)],
        ),
        (["generate", "--prompt=Hi"], "generate", ["--workdir", "--init_from"]),
        (
            ["train", "--config=configs/nope.py", f"--workdir={tmp_path / 'w2'}"],
            "train",
            ["configs/nope.py"],
        ),
    ]
    procs = cli_runs([args for args, _, _ in cases], env)
    for proc, (_, command, needles) in zip(procs, cases, strict=True):
        assert_user_error(proc, command, *needles)
    assert not (tmp_path / "w2").exists()


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", f"--config={CONFIG}"], "--workdir=DIR is required"),
        (["export", "--out=/tmp/x"], "--workdir=DIR is required"),
        (["generate", "--init_from=/some/dir"], "must be hf:"),
        (["generate", "--init_from=hf:x", "--temperature=-1"], "--temperature=-1.0"),
        (["generate", "--init_from=hf:x", "--prompt="], "--prompt"),
        (["generate", "--init_from=hf:x", "--top_p=0"], "--top_p=0.0"),
        (["eval", f"--config={CONFIG}", "--config.init_from=/some/dir"], "'hf:<dir or hub id>'"),
        (["eval", f"--config={CONFIG}", "--config.nope=1"], "unknown config key 'nope'"),
    ],
)
def test_usage_errors_in_process(argv, needle, capsys):
    """The same contract through cli.main (cheap: no new process)."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gpt2-jax {argv[0]}: error: ") and needle in err, err


def test_workdir_without_checkpoint_is_an_error_not_its_init_weights(run, tmp_path, capsys):
    """A run dir with config.json (init_from set) but no checkpoint yet: eval, export and
    generate must not silently use the Hugging Face starting point instead."""
    workdir = tmp_path / "fresh"
    workdir.mkdir()
    shutil.copy(run["workdir"] / "config.json", workdir / "config.json")
    for argv in (
        ["export", f"--workdir={workdir}", f"--out={tmp_path / 'out'}"],
        ["generate", f"--workdir={workdir}", "--prompt=Hi"],
        ["eval", f"--workdir={workdir}"],
    ):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "has no checkpoint yet" in err and str(workdir) in err, err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- 6. help


def test_help_and_no_command():
    help_run = run_cli(["--help"])
    assert help_run.returncode == 0, help_run.stderr
    for command in ("train", "eval", "generate", "export"):
        assert f"gpt2-jax {command}" in help_run.stdout
    nothing = run_cli([])
    assert nothing.returncode == 2
    assert "gpt2-jax: error: no command given" in nothing.stderr
    unknown = run_cli(["trian"])
    assert unknown.returncode == 2 and "unknown command 'trian'" in unknown.stderr
    script = Path(sys.executable).parent / "gpt2-jax"  # the installed console script
    if script.is_file():
        out = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "gpt2-jax export" in out.stdout, out.stderr
