"""Helpers every test file shares: data paths, references (PyTorch, run_clm), the CLI runner.

torch and transformers are imported inside the functions that need them, so that test files
which never touch PyTorch do not pay for importing it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import os
import shutil
import subprocess
import sys
from itertools import chain
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TEST_DATA = ROOT / "tests" / "data"
# 345 lines of wikitext-2's test split, shipped with the tests (see tests/data/README.md).
WIKI_HEAD = TEST_DATA / "wiki.test.head.raw"


# The tests' training config: configs/quickstart.py's variant of 1 layer and 6 steps.
TINY = str(ROOT / "configs" / "quickstart.py:tiny")


def tiny_config(**overrides):
    """``TINY`` loaded, with ``--config.KEY=VALUE`` style overrides (values as strings)."""
    from gpt2_jax.config import base as config_lib

    cfg = config_lib.load_config_file(TINY)
    config_lib.apply_overrides(cfg, {k: str(v) for k, v in overrides.items()})
    return cfg


def isolation_env(basetemp) -> dict[str, str]:
    """The environment every test runs under: token and HF caches inside the session's
    temporary directory (never the user's), the Hugging Face hub offline."""
    return {
        "GPT2_JAX_CACHE": str(Path(basetemp) / "gpt2_jax_cache"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }


@contextlib.contextmanager
def isolated(basetemp):
    """``isolation_env`` for a module- or session-scoped fixture (conftest's autouse
    fixture sets it per test only)."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in isolation_env(basetemp).items():
            mp.setenv(key, value)
        yield


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """A finished training run that several tests read: never write into ``workdir``,
    ``copy_run`` it first."""

    workdir: Path
    results: dict  # what train() returned: {split: {"loss", "perplexity", "tokens"}}
    stdout: str  # what it printed: the start and end summaries (progress bar off)


def train_shared(tmp_path_factory, name: str, **overrides) -> TrainedRun:
    """``train()`` of ``tiny_config(**overrides)`` into a directory of its own, for a
    module- or session-scoped fixture."""
    from gpt2_jax.train import loop as train_lib

    workdir = tmp_path_factory.mktemp(name) / "run"
    out = io.StringIO()
    with isolated(tmp_path_factory.getbasetemp()), contextlib.redirect_stdout(out):
        results = train_lib.train(tiny_config(**overrides), workdir)
    return TrainedRun(workdir, results, out.getvalue())


def copy_run(run: TrainedRun, dst) -> Path:
    """A private copy of a shared run's workdir (to resume, corrupt or prune)."""
    return Path(shutil.copytree(run.workdir, dst))


def train_losses(workdir) -> dict:
    """{step: logged train loss} from a workdir's metrics.jsonl."""
    import json

    lines = [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if r["split"] == "train"}


def last_json(stdout: str, n: int = 1) -> list[dict]:
    """The last ``n`` lines of a command's stdout, each a JSON record."""
    import json

    return [json.loads(line) for line in stdout.strip().splitlines()[-n:]]


def checkpoint_params(workdir):
    """The params of a run's latest checkpoint, restored as saved (no target shardings)."""
    from gpt2_jax.weights import checkpoint as ckpt_lib

    ckpt = ckpt_lib.Checkpointer(Path(workdir) / "checkpoints", read_only=True)
    return ckpt.restore(None)["params"]


def tree_max_abs_diff(a, b) -> float:
    """The largest |a - b| over the leaves of two trees of one structure."""
    import jax

    assert jax.tree.structure(a) == jax.tree.structure(b)
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def snapshot(root) -> dict:
    """Every file under ``root``: {relative path: (size, mtime_ns, sha256)}. "Untouched" means
    equal: nothing added, deleted, rewritten or touched."""
    import hashlib

    root = Path(root)
    return {
        str(p.relative_to(root)): (
            p.stat().st_size,
            p.stat().st_mtime_ns,
            hashlib.sha256(p.read_bytes()).hexdigest(),
        )
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ---------------------------------------------------------------------- data


def shared_data() -> Path:
    """The developers' shared corpora (``../shared/data``, or ``$GPT2_JAX_SHARED_DATA``).

    Only `slow` tests may read it: a user's clone has no ``shared/``.
    """
    return Path(os.environ.get("GPT2_JAX_SHARED_DATA", ROOT.parent / "shared" / "data"))


def require_shared_file(relative: str) -> Path:
    """A file of the shared corpora; FAILS (never skips) when it is missing.

    A slow test asked for by name (``make test-all``) that cannot read its corpus has checked
    nothing, so it must not come out green or as an easily overlooked skip.
    """
    path = shared_data() / relative
    if not path.is_file():
        pytest.fail(
            f"{path} not found: this slow test needs the shared corpora; set "
            "GPT2_JAX_SHARED_DATA to their directory, or run `make test` (not slow) instead",
            pytrace=False,
        )
    return path


def wiki_lines() -> list[str]:
    """The shipped wikitext slice as lines, line ends kept (as datasets' text builder reads)."""
    return WIKI_HEAD.read_text(encoding="utf-8").splitlines(keepends=True)


@functools.cache
def _wiki_tokens() -> np.ndarray:
    from gpt2_jax.data import tokenizer

    ids = tokenizer.get_tokenizer().encode_ordinary(WIKI_HEAD.read_text(encoding="utf-8"))
    return np.asarray(ids, np.int32)


def wiki_ids(n_tokens: int) -> np.ndarray:
    """The first ``n_tokens`` GPT-2 ids of the shipped wikitext slice, int32 [n_tokens]."""
    ids = _wiki_tokens()
    assert len(ids) >= n_tokens, f"{WIKI_HEAD} holds {len(ids)} tokens, {n_tokens} asked for"
    return ids[:n_tokens].copy()  # callers may write into it


def group_texts(examples: dict[str, list[list[int]]], block_size: int) -> dict:
    """run_clm.py's ``group_texts`` (transformers examples), verbatim in its logic.

    Concatenates one batch of rows per column, drops the remainder, and cuts blocks of
    ``block_size``; run_clm maps it over batches of 1000 rows, so each batch drops its own.
    """
    concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
    total_length = len(concatenated[list(examples.keys())[0]])
    total_length = (total_length // block_size) * block_size
    return {
        k: [t[i : i + block_size] for i in range(0, total_length, block_size)]
        for k, t in concatenated.items()
    }


# ---------------------------------------------------------------------- PyTorch references


def random_hf_model(seed: int = 0, **config):
    """A transformers GPT2LMHeadModel (eval mode) whose every parameter is random.

    Biases and LayerNorms too (default init leaves them 0 / 1, which hides mapping bugs);
    ``config`` are GPT2Config fields (n_layer, n_embd, ...).
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    m = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():  # wte and lm_head are one (tied) parameter
            is_ln_scale = name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight"))
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if is_ln_scale else 0.1 * torch.randn_like(p))
    return m


def torch_loss(m, blocks: np.ndarray) -> float:
    """Hugging Face's shifted loss over equal-length blocks [N, T] (= mean of per-block losses)."""
    import torch

    ids = torch.as_tensor(np.asarray(blocks), dtype=torch.long)
    with torch.no_grad():
        return float(m(ids, labels=ids).loss)


def torch_greedy(m, prompt: list[int], n: int) -> tuple[list[int], float]:
    """Greedy continuation ids and the smallest top-1 / top-2 logit gap along the way."""
    import torch

    ids, gap = list(prompt), np.inf
    with torch.no_grad():
        for _ in range(n):
            logits = m(torch.as_tensor([ids], dtype=torch.long)).logits[0, -1]
            top2 = torch.topk(logits, 2).values
            gap = min(gap, float(top2[0] - top2[1]))
            ids.append(int(logits.argmax()))
    return ids, gap


def torch_sliding_window(m, ids: np.ndarray, max_length: int, stride: int) -> tuple[float, int]:
    """The loop of huggingface.co/docs/transformers/perplexity, verbatim in its logic.

    ids: [seq_len] token ids. Returns (mean NLL per scored prediction, number scored);
    perplexity is exp of the first.
    """
    import torch

    encodings = torch.as_tensor(ids, dtype=torch.long)[None]
    seq_len = encodings.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            neg_log_likelihood = m(input_ids, labels=target_ids).loss
        # Hugging Face shifts labels inside the model: each row loses one prediction.
        num_loss_tokens = int((target_ids != -100).sum()) - target_ids.size(0)
        nll_sum += float(neg_log_likelihood) * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum / n_tokens, n_tokens


# ---------------------------------------------------------------------- the command line


def run_cli(args, devices: int = 1, timeout: int = 600, env_extra=None, cwd=ROOT):
    """Runs ``python -m gpt2_jax ARGS`` in a fresh process (device count set before jax)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "gpt2_jax", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@dataclasses.dataclass
class CliResult:
    """What the tests read of a finished command (as of a subprocess.CompletedProcess)."""

    returncode: int
    stdout: str
    stderr: str


def cli_in_process(args) -> CliResult:
    """``gpt2_jax.cli.main(ARGS)`` in this process, stdout and stderr captured.

    The same code as ``run_cli`` after start-up, without a new Python and jax: for tests
    of what a command computes. Exit codes as a process sees them, signals and device
    counts need ``run_cli``.
    """
    from gpt2_jax.cli import main as cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    return CliResult(code, out.getvalue(), err.getvalue())


# ---------------------------------------------------------------------- W&B files


def wandb_records(path) -> list:
    """The protobuf records of a W&B ``run-<id>.wandb`` file (offline mode writes them).

    wandb 0.31 no longer ships a Python reader: the file is a ``:W&B`` header and then
    LevelDB-log framing (32 KiB blocks, 7-byte record headers: crc, length, type
    full/first/middle/last) around ``wandb_internal_pb2.Record`` messages.
    """
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", path
    pos, block, parts, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):  # block padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):  # a whole record, or the last piece of one
            rec = pb.Record()
            rec.ParseFromString(parts)
            out.append(rec)
            parts = b""
    return out


def wandb_history(path) -> list[dict]:
    """Every ``run.log`` row of a .wandb file: {key: value} with ``_step``."""
    import json

    rows = []
    for rec in wandb_records(path):
        if rec.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                         for i in rec.history.item})  # fmt: skip
    return rows


# ---------------------------------------------------------------------- fault injection


def poison_step(monkeypatch, step: int, seed: int = 0) -> None:
    """NaN gradients (the loss itself stays finite) for the update to ``step`` (1-based),
    injected from the test side by wrapping ``train.loss_fn``.

    ``train_step`` passes ``loss_fn`` the dropout key ``fold_in(fold_in(state_rng, s), 0)``
    for the update from step ``s`` (first microbatch), with ``state_rng`` the second half of
    ``split(PRNGKey(train.seed))`` (``init_state``): the wrapper recognises step's key and
    adds a term whose value is 0 and whose gradient is NaN.
    """
    import jax
    import jax.numpy as jnp

    from gpt2_jax.train import step as step_lib

    original = step_lib.loss_fn
    state_rng = jax.random.split(jax.random.PRNGKey(seed))[1]
    target = jax.random.fold_in(jax.random.fold_in(state_rng, step - 1), 0)

    def poisoned(params, batch, dropout_rng, **kwargs):
        loss = original(params, batch, dropout_rng, **kwargs)
        hit = jnp.all(_raw_key(dropout_rng) == _raw_key(target))
        # sqrt at 0 has an infinite slope: 0 * inf = NaN gradient at that step only; the
        # term's value is 0 (minus its own stop_gradient), so the loss stays finite.
        term = jnp.sqrt(jnp.where(hit, 0.0, 1.0) + 0.0 * params["wte"]["embedding"]).sum()
        return loss + (term - jax.lax.stop_gradient(term))

    monkeypatch.setattr(step_lib, "loss_fn", poisoned)


def _raw_key(key):
    import jax

    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    return jax.random.key_data(key) if typed else key
