"""The token cache builder (corpus.py, workers.py, sources.py, token_cache.py): streaming =
Arrow byte for byte, worker processes, the seeded hold-out, kill -9 and resume, one builder
per cache directory, hub arguments and their errors."""

import dataclasses
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import tracemalloc
import types
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpt2_jax.cli import main as cli
from gpt2_jax.data import corpus, sources, token_cache, tokenizer, workers
from gpt2_jax.data.blocks import load_splits
from gpt2_jax.data.config import DataConfig
from gpt2_jax.data.sources import DataError
from gpt2_jax.data.splits import split_spec
from gpt2_jax.data.token_cache import cache_report, load_token_stream
from gpt2_jax.train import summary

from .helpers import ROOT, TINY, run_cli, train_losses, wiki_lines


def make_cfg(tmp_path, name="cache", **overrides):
    return DataConfig.from_mapping(dict(cache_dir=str(tmp_path / name), num_proc=1) | overrides)


def cache_files(cache_dir) -> dict:
    """{file name: sha256} of the finished token cache files (.tokens / .offsets)."""
    root = Path(cache_dir) / "tokens"
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.iterdir())
        if p.suffix in (".tokens", ".offsets")
    }


def rows_of(tokens, offsets) -> list[str]:
    enc = tokenizer.get_tokenizer()
    return [
        enc.decode(tokens[a:b].tolist()) for a, b in zip(offsets[:-1], offsets[1:], strict=True)
    ]


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(corpus, "CHUNK_BYTES", 8 << 10)  # ~20 chunks of the wikitext slice


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """The shipped wikitext slice (345 rows, 167 KB) as text, jsonl and parquet files."""
    d = tmp_path_factory.mktemp("corpora")
    lines = wiki_lines()
    (d / "wiki.txt").write_text("".join(lines), encoding="utf-8")
    with open(d / "wiki.jsonl", "w", encoding="utf-8") as f:
        for i, line in enumerate(lines):
            f.write(json.dumps({"id": i, "text": line}) + "\n")
    pq.write_table(pa.table({"text": lines}), d / "wiki.parquet", row_group_size=50)
    return {"text": d / "wiki.txt", "jsonl": d / "wiki.jsonl", "parquet": d / "wiki.parquet"}


# ---------------------------------------------------------------- streaming = Arrow


@pytest.mark.parametrize("kind", ["text", "jsonl", "parquet"])
def test_streaming_and_arrow_builds_are_byte_identical(tmp_path, corpora, small_chunks, kind):
    common = dict(train_files=str(corpora[kind]), validation_fraction=0.1, append_eos=True)
    arrow = make_cfg(tmp_path, "arrow", **common)
    stream = make_cfg(tmp_path, "stream", streaming=True, **common)
    got = {name: load_splits(cfg) for name, cfg in (("arrow", arrow), ("stream", stream))}
    assert cache_files(arrow.cache_dir) == cache_files(stream.cache_dir)
    assert len(cache_files(arrow.cache_dir)) == 4  # train + validation, tokens + offsets
    # Streaming wrote the token cache and nothing else: no Arrow copy of the rows.
    assert (Path(arrow.cache_dir) / "datasets").is_dir()
    assert sorted(p.name for p in Path(stream.cache_dir).iterdir()) == ["tokens"]
    assert not list((Path(stream.cache_dir) / "tokens").glob("*.partial*"))
    # The bytes are the rows' encode_ordinary ids + <|endoftext|>, split by the seeded keys.
    lines = wiki_lines()
    held = corpus.holdout_keys(0, 0, len(lines)) < np.uint64(corpus.fraction_threshold(0.1))
    enc = tokenizer.get_tokenizer()
    for split, mask in (("validation", held), ("train", ~held)):
        ids = [
            enc.encode_ordinary(line) + [50256] for line, m in zip(lines, mask, strict=True) if m
        ]
        want = [t for row in ids for t in row]
        for blocks in got.values():
            np.testing.assert_array_equal(blocks[split].tokens, want)
            assert len(blocks[split].offsets) - 1 == mask.sum()


def test_worker_processes_build_the_same_cache(tmp_path, corpora, small_chunks):
    common = dict(train_files=str(corpora["text"]), validation_fraction=0.2)
    one = load_splits(make_cfg(tmp_path, "one", num_proc=1, **common))
    two = load_splits(make_cfg(tmp_path, "two", num_proc=2, **common))
    assert two["train"].cache.built and two["train"].cache.processes == 2
    assert one["train"].cache.processes == 1
    assert cache_files(tmp_path / "one") == cache_files(tmp_path / "two")
    for split in ("train", "validation"):
        np.testing.assert_array_equal(one[split].offsets, two[split].offsets)


def test_encode_chunk_is_encode_ordinary():
    enc = tokenizer.get_tokenizer()
    texts = ["a <|endoftext|> b\n", "", None, "caf\u00e9 \u2028 x", "  spaces   \n\n"]
    dest = np.array([0, 1, -1, 0, 1], np.int8)
    # Arrow (what sources yield) and a list; a list may hold a lone surrogate, which
    # encode_ordinary replaces (Arrow cannot hold one).
    for chunk in (pa.array(texts), texts[:3] + ["caf\u00e9 \ud800 x"] + texts[4:]):
        out = workers.encode_chunk(chunk, dest, 2, append_eos=True)
        rows = chunk if isinstance(chunk, list) else texts
        for o, picked in ((0, [0, 3]), (1, [1, 4])):
            want = [enc.encode_ordinary(rows[i] or "") + [tokenizer.EOT_ID] for i in picked]
            np.testing.assert_array_equal(out[o][0], [t for ids in want for t in ids])
            np.testing.assert_array_equal(out[o][1], [len(ids) for ids in want])
            assert out[o][0].dtype == np.uint16 and out[o][1].dtype == np.int64


# ---------------------------------------------------------------- the hold-out


def test_fractional_holdout_is_seeded_deterministic_and_disjoint(tmp_path):
    rows = [f"row {i} of the corpus\n" for i in range(3000)]
    path = tmp_path / "rows.txt"
    path.write_text("".join(rows))

    def split_rows(name, **kw):
        b = load_splits(make_cfg(tmp_path, name, train_files=str(path), block_size=8, **kw))
        return {s: rows_of(b[s].tokens, b[s].offsets) for s in ("train", "validation")}

    a = split_rows("a", validation_fraction=0.1)
    val, train = set(a["validation"]), set(a["train"])
    assert not val & train and val | train == set(rows)  # disjoint, nothing lost
    assert len(a["validation"]) + len(a["train"]) == len(rows)
    assert a["validation"] == [r for r in rows if r in val]  # source order kept
    assert 220 <= len(val) <= 380  # 300 expected; binomial sd ~16
    assert a["validation"] != rows[: len(val)]  # drawn, not the first rows
    assert split_rows("a2", validation_fraction=0.1) == a  # another cache: the same draw
    assert split_rows("s", validation_fraction=0.1, streaming=True) == a
    assert set(split_rows("f", validation_fraction=0.05)["validation"]) < val  # a prefix
    assert set(split_rows("seed", validation_fraction=0.1, validation_seed=1)["validation"]) != val
    exact = split_rows("k", validation_rows=37)["validation"]
    keys = corpus.holdout_keys(0, 0, len(rows))
    assert exact == [rows[i] for i in sorted(np.argsort(keys)[:37])]
    assert split_rows("ks", validation_rows=37, streaming=True)["validation"] == exact
    # A whole-percent hold-out keeps run_clm's meaning, streamed too: the first 5% of rows.
    pct = split_rows("pct", streaming=True)
    assert pct["validation"] == rows[:150] and pct["train"] == rows[150:]


# ---------------------------------------------------------------- interrupted builds

_BUILD = r"""
import hashlib, json, os, sys, time
from gpt2_jax.data import corpus
from gpt2_jax.data.blocks import load_splits
from gpt2_jax.data.config import DataConfig
from gpt2_jax.data.loader import BatchLoader
cfg_json, chunk_bytes, delay, go = sys.argv[1:5]
corpus.CHUNK_BYTES = int(chunk_bytes)
def hook(n):
    time.sleep(float(delay))
    if go and n == 1:
        while not os.path.exists(go):
            time.sleep(0.05)
corpus._after_commit = hook
cfg = DataConfig.from_mapping(json.loads(cfg_json))
blocks = load_splits(cfg)
train = blocks["train"]
loader = BatchLoader(len(train), 4, seed=0)
print(json.dumps({
    "built": train.cache.built,
    "tokens": {s: hashlib.sha256(bytes(b.tokens)).hexdigest() for s, b in blocks.items()},
    "batches": [hashlib.sha256(train[loader.global_indices(s)]).hexdigest() for s in range(3)],
}))
"""


def _start_build(cfg: dict, marker: str, *, chunk_bytes=4096, delay=0.0, go="", out=None):
    """The build in a subprocess; ``out``: a file for its stdout and stderr (else pipes)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), GPT2_JAX_TEST_MARKER=marker)
    return subprocess.Popen(
        [sys.executable, "-c", _BUILD, json.dumps(cfg), str(chunk_bytes), str(delay), go],
        cwd=ROOT,
        env=env,
        stdout=out or subprocess.PIPE,
        stderr=out or subprocess.PIPE,
        text=True,
    )


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError:  # gone meanwhile
        return b""


def _pids() -> list[int]:
    """Live (not zombie) processes."""
    return [
        int(d.name)
        for d in Path("/proc").iterdir()
        if d.name.isdigit() and b") Z " not in _read(f"{d}/stat")
    ]


def _pids_with_env(marker: str) -> list[int]:
    return [p for p in _pids() if marker.encode() in _read(f"/proc/{p}/environ")]


def _published(tokens_dir: Path) -> list:
    """The meta files of finished caches (a split's cache is complete once it has one)."""
    return [*tokens_dir.glob("train-*.json"), *tokens_dir.glob("validation-*.json")]


def _journal_chunks(cache_dir) -> int:
    for p in (Path(cache_dir) / "tokens").glob("build-*.journal.json"):
        try:
            return json.loads(p.read_text())["chunks"]
        except (OSError, ValueError):
            pass
    return 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc, PDEATHSIG")
def test_kill_9_while_tokenizing_then_rerun_resumes_to_the_same_cache(tmp_path, corpora, capfd):
    common = dict(train_files=str(corpora["text"]), validation_fraction=0.1, append_eos=True)
    ref = make_cfg(tmp_path, "ref", **common)
    load_splits(ref)
    want = cache_files(ref.cache_dir)

    # Streamed, in 2 tokenizer processes; the reference: from Arrow, in this process.
    cfg = make_cfg(tmp_path, "killed", num_proc=2, streaming=True, **common)
    seed = random.randrange(1 << 30)
    kill_at = random.Random(seed).randrange(3, 25)  # of 28 chunks of ~4 KiB
    marker = f"kill-{seed}-{os.getpid()}"
    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        proc = _start_build(cfg.to_dict(), marker, delay=0.05, out=out)
        deadline = time.monotonic() + 120
        while _journal_chunks(cfg.cache_dir) < kill_at:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"no chunk {kill_at} in 120 s (seed {seed})"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    tokens_dir = Path(cfg.cache_dir) / "tokens"
    assert not _published(tokens_dir), "a partial build was published"
    assert list(tokens_dir.glob("*.partial")) and _journal_chunks(cfg.cache_dir) >= kill_at
    deadline = time.monotonic() + 10
    while _pids_with_env(marker):  # the tokenizer processes die with it (PDEATHSIG)
        assert time.monotonic() < deadline, f"orphans left: {_pids_with_env(marker)}"
        time.sleep(0.1)

    capfd.readouterr()
    blocks = load_splits(cfg)
    err = capfd.readouterr().err
    assert "resuming an interrupted build at source row" in err, err[-2000:]
    assert blocks["train"].cache.resumed_from > 0
    assert cache_files(cfg.cache_dir) == want, f"seed {seed}, killed at chunk {kill_at}"
    assert not list(tokens_dir.glob("*.partial*"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_a_killed_tokenizer_process_is_one_error_and_the_rerun_resumes(
    tmp_path, corpora, small_chunks, monkeypatch
):
    common = dict(train_files=str(corpora["text"]), validation_fraction=0.1, num_proc=2)
    ref = make_cfg(tmp_path, "ref", **common)
    load_splits(ref)

    def kill_a_worker(n):
        if n == 4:
            mine = f"\0gpt2_jax-tokenizer\0{ROOT}\0{os.getpid()}\0".encode()
            workers = [p for p in _pids() if mine in _read(f"/proc/{p}/cmdline")]
            assert len(workers) == 2
            os.kill(workers[0], signal.SIGKILL)

    cfg = make_cfg(tmp_path, **common)
    monkeypatch.setattr(corpus, "_after_commit", kill_a_worker)
    with pytest.raises(DataError, match=r"a tokenizer process \(\d+\) died .* resumes"):
        load_splits(cfg)
    monkeypatch.setattr(corpus, "_after_commit", lambda n: None)
    assert load_splits(cfg)["train"].cache.resumed_from > 0
    assert cache_files(cfg.cache_dir) == cache_files(ref.cache_dir)


def test_a_partial_build_that_disagrees_with_its_journal_is_rebuilt(
    tmp_path, corpora, small_chunks, monkeypatch, capfd
):
    common = dict(train_files=str(corpora["text"]), validation_split_percentage=10)
    cfg, ref = make_cfg(tmp_path, **common), make_cfg(tmp_path, "ref", **common)
    load_splits(ref)

    def crash(n):
        if n == 5:
            raise KeyboardInterrupt  # stands for a crash after chunk 5 is on disk

    monkeypatch.setattr(corpus, "_after_commit", crash)
    with pytest.raises(KeyboardInterrupt):
        load_splits(cfg)
    monkeypatch.undo()
    tokens_dir = Path(cfg.cache_dir) / "tokens"
    assert not _published(tokens_dir) and _journal_chunks(cfg.cache_dir) == 5
    (partial,) = tokens_dir.glob("train-*.tokens.partial")
    partial.write_bytes(partial.read_bytes()[:100])  # shorter than the journal says
    capfd.readouterr()
    load_splits(cfg)
    assert "not resumable" in capfd.readouterr().err
    assert cache_files(cfg.cache_dir) == cache_files(ref.cache_dir)


def test_bytes_written_after_the_last_commit_are_dropped_on_resume(
    tmp_path, corpora, small_chunks, monkeypatch, capfd
):
    common = dict(train_files=str(corpora["jsonl"]), validation_fraction=0.1)
    cfg, ref = make_cfg(tmp_path, **common), make_cfg(tmp_path, "ref", **common)
    load_splits(ref)

    def crash(n):
        if n == 7:
            raise KeyboardInterrupt

    monkeypatch.setattr(corpus, "_after_commit", crash)
    with pytest.raises(KeyboardInterrupt):
        load_splits(cfg)
    monkeypatch.undo()
    tokens_dir = Path(cfg.cache_dir) / "tokens"
    for partial in tokens_dir.glob("*.partial"):  # as if killed while writing chunk 8
        with open(partial, "ab") as f:
            f.write(b"\x07" * 24)
    capfd.readouterr()
    load_splits(cfg)
    assert "resuming an interrupted build at source row" in capfd.readouterr().err
    assert cache_files(cfg.cache_dir) == cache_files(ref.cache_dir)


# ---------------------------------------------------------------- one builder


def test_two_processes_one_cache_one_builds_the_other_waits(tmp_path, corpora):
    cfg = make_cfg(tmp_path, "shared", train_files=str(corpora["text"]), num_proc=1)
    cfg = dataclasses.replace(cfg, validation_fraction=0.1)
    go = tmp_path / "go"
    marker = f"wait-{os.getpid()}"
    a = _start_build(cfg.to_dict(), marker, go=str(go))
    deadline = time.monotonic() + 120
    while _journal_chunks(cfg.cache_dir) < 1:  # a holds the lock, paused after chunk 1
        assert a.poll() is None, a.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    b_log = tmp_path / "b.log"
    with open(b_log, "w") as b_out:
        b = _start_build(cfg.to_dict(), marker, out=b_out)
        while "waiting for" not in b_log.read_text():
            assert b.poll() is None, b_log.read_text()[-3000:]
            assert time.monotonic() < deadline, b_log.read_text()
            time.sleep(0.05)
        go.touch()
        out_a, err_a = a.communicate(timeout=120)
        b.wait(timeout=120)
    err_b = out_b = b_log.read_text()
    assert a.returncode == 0 and b.returncode == 0, (err_a[-2000:], err_b[-2000:])
    assert f"waiting for process {a.pid} " in err_b
    assert "tokenized by another process" in err_b and "data: tokenized" not in err_b
    assert "data: tokenized train + validation" in err_a
    got_a, got_b = json.loads(out_a.splitlines()[-1]), json.loads(out_b.splitlines()[-1])
    assert got_a["built"] and not got_b["built"]
    assert got_a["tokens"] == got_b["tokens"] and got_a["batches"] == got_b["batches"]


def test_launch_two_processes_build_once_and_train_as_one(tmp_path):
    """Under `gpt2-jax launch`, one process tokenizes into the shared cache directory, and
    the two train on the batches one process of 2 devices trains on (the same losses)."""
    common = [
        "train",
        f"--config={TINY}",
        "--config.train.steps=3",
        "--config.train.checkpoint_every=0",
        f"--config.data.cache_dir={tmp_path / 'cache'}",
        "--config.data.validation_fraction=0.05",
    ]
    two = tmp_path / "two"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    launched = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpt2_jax",
            "launch",
            "--processes=2",
            "--",
            *common,
            f"--workdir={two}",
        ],
        cwd=ROOT,
        env=env | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    logs = [(two / "logs" / f"process_{i}.log").read_text() for i in (0, 1)]
    built = [i for i, text in enumerate(logs) if "data: tokenized train + validation" in text]
    assert len(built) == 1, logs
    assert "data: tokenized" not in logs[1 - built[0]]
    assert "  data        " in launched.stdout  # the run summary says how the tokens came

    one = run_cli([*common, f"--workdir={tmp_path / 'one'}"], devices=2)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "  data        train + validation from the token cache" in one.stdout
    want, got = train_losses(tmp_path / "one"), train_losses(two)
    assert sorted(got) == sorted(want) == [1, 2, 3]
    np.testing.assert_allclose([got[s] for s in (1, 2, 3)], [want[s] for s in (1, 2, 3)], rtol=1e-5)


# ---------------------------------------------------------------- hub sources


class _Recorder:
    """Stands in for datasets.load_dataset and, for streamed loads (load_dataset's own two
    steps, ``sources._load_dataset``), load_dataset_builder: records the arguments as one
    load_dataset call, returns tiny data."""

    def __init__(self, splits=("train",)):
        self.calls, self.splits = [], splits
        self.scan_options = None  # what the streamed builder's parquet config was given

    def install(self, monkeypatch):
        monkeypatch.setattr(datasets, "load_dataset", self)
        monkeypatch.setattr(datasets, "load_dataset_builder", self.builder)
        return self

    def __call__(self, path, name=None, **kwargs):
        self.calls.append(dict(path=path, name=name, **kwargs))
        ds = datasets.Dataset.from_dict({"text": [f"row {i} of {path}\n" for i in range(400)]})
        if kwargs.get("streaming"):
            return datasets.IterableDatasetDict({s: ds.to_iterable_dataset() for s in self.splits})
        return datasets.DatasetDict({s: ds for s in self.splits})

    def builder(self, path, name=None, **kwargs):
        recorder = self

        class Builder:
            config = types.SimpleNamespace(fragment_scan_options=None)  # a parquet config

            def as_streaming_dataset(self):
                recorder.scan_options = self.config.fragment_scan_options
                return recorder(path, name, streaming=True, **kwargs)

        return Builder()


def test_hub_revision_data_files_and_data_dir_reach_load_dataset(tmp_path, monkeypatch):
    rec = _Recorder().install(monkeypatch)
    cfg = make_cfg(
        tmp_path,
        dataset="Skylion007/openwebtext",
        revision="refs/convert/parquet",
        data_dir="plain_text",
        data_files="train=plain_text/train/*.parquet,train=more/*.parquet",
        streaming=True,
        validation_fraction=0.1,
        block_size=8,
    )
    blocks = load_splits(cfg)
    assert rec.calls == [
        dict(
            path="Skylion007/openwebtext",
            name=None,
            revision="refs/convert/parquet",
            data_dir="plain_text",
            data_files={"train": ["plain_text/train/*.parquet", "more/*.parquet"]},
            streaming=True,
        )
    ]  # one pass for both splits
    assert rec.scan_options.pre_buffer is False  # parquet row groups are not kept
    assert len(blocks["validation"].offsets) - 1 + len(blocks["train"].offsets) - 1 == 400
    # The revision is part of the cache key; streaming is not (the same bytes either way).
    spec = split_spec(cfg, "train")
    assert spec["revision"] == "refs/convert/parquet" and "streaming" not in spec
    cfg = dataclasses.replace(cfg, revision="main")
    assert token_cache.stem(cfg, split_spec(cfg, "train")) != token_cache.stem(cfg, spec)
    # A plain list of patterns is the train split.
    assert sources.hub_data_files("a/*.parquet, b/*.parquet") == ["a/*.parquet", "b/*.parquet"]


@pytest.mark.parametrize("arg", [None, "owt"])
def test_the_124m_recipes_load_their_hub_source(tmp_path, monkeypatch, arg):
    from gpt2_jax.config import base as config_lib

    rec = _Recorder().install(monkeypatch)
    cfg = config_lib.load_config_file(str(ROOT / "configs" / "gpt2_124m.py") + f":{arg or ''}")
    assert cfg.data.streaming is True and cfg.data.validation_fraction == 0.0005
    # 400 rows stand in for the corpus: hold out more of them than 0.05%
    config_lib.apply_overrides(
        cfg, {"data.cache_dir": str(tmp_path), "data.validation_fraction": "0.1"}
    )
    tokens, _ = load_token_stream(DataConfig.from_mapping(cfg.data), "train")
    assert len(tokens) > 0
    (call,) = rec.calls
    assert call["streaming"] is True
    if arg is None:  # llm.c's GPT-2 124M data
        assert (call["path"], call["name"]) == ("HuggingFaceFW/fineweb-edu", "sample-10BT")
    else:  # nanoGPT's OpenWebText, its parquet copy
        assert call["path"] == "Skylion007/openwebtext"
        assert call["revision"] == "refs/convert/parquet"


def test_a_dataset_with_a_loading_script_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    scripted = tmp_path / "owt_copy"
    scripted.mkdir()
    (scripted / "owt_copy.py").write_text("import datasets\n")
    argv = [
        "train",
        f"--config={TINY}",
        f"--workdir={tmp_path / 'run'}",
        f"--config.data.dataset={scripted}",
        f"--config.data.cache_dir={tmp_path / 'cache'}",
    ]
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("gpt2-jax train: error: data.dataset=")
    assert "owt_copy.py" in lines[0] and "data.train_files" in lines[0]
    assert not (tmp_path / "run").exists()

    # A hub dataset with a script: the parquet revision to use instead.
    def refuse(path, *args, **kwargs):
        raise RuntimeError("Dataset scripts are no longer supported, but found openwebtext.py")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    cfg = make_cfg(tmp_path, dataset="openwebtext")
    with pytest.raises(DataError) as e:
        load_splits(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "openwebtext.py" in msg
    assert "--config.data.revision=refs/convert/parquet" in msg


def test_streamed_hub_dataset_offline_is_fast_and_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = make_cfg(tmp_path, dataset="HuggingFaceFW/fineweb-edu", dataset_config="sample-10BT")
    cfg = dataclasses.replace(cfg, streaming=True)
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"cannot reach the Hugging Face Hub.*train_files"):
        load_splits(cfg)
    assert time.perf_counter() - start < 10


# ---------------------------------------------------------------- config, report, memory


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (dict(validation_fraction=1.0), r"data.validation_fraction must be in \[0, 1\)"),
        (dict(validation_fraction=0.1, validation_rows=5), "set one of them"),
        (dict(validation_rows=-1), "data.validation_rows must be >= 0"),
        (dict(num_proc=-2), "data.num_proc must be >= 0"),
        (dict(revision="refs/convert/parquet"), r"data.revision='refs/convert/parquet' selects"),
        (dict(data_dir="x"), "data.data_dir='x' selects"),
    ],
)
def test_bad_new_keys_name_the_key(tmp_path, overrides, needle):
    path = tmp_path / "t.txt"
    path.write_text("some text\n" * 10)
    with pytest.raises(DataError, match=needle):
        make_cfg(tmp_path, train_files=str(path), **overrides).validate()


@pytest.mark.parametrize(
    "name, content, column, needle",
    [
        ("d.jsonl", b'{"content": "hi", "n": 1}\n' * 50, "text", r"'text' is not a column.*'n'\]"),
        ("d.jsonl", b'{"content": "hi", "n": 1}\n' * 50, "n", "'n' holds int64, not text"),
        ("l.txt", b"fine\nna\xefve\n" * 40, "text", r"l.txt is not valid UTF-8 \(line 2, byte"),
    ],
)
def test_streamed_bad_input_is_the_same_one_error(tmp_path, name, content, column, needle):
    path = tmp_path / name
    path.write_bytes(content)
    cfg = make_cfg(tmp_path, train_files=str(path), streaming=True, text_column=column)
    cfg = dataclasses.replace(cfg, validation_fraction=0.5)
    with pytest.raises(DataError, match=needle):
        load_splits(cfg)
    leftovers = [p.name for p in (Path(cfg.cache_dir) / "tokens").iterdir()]
    assert all(n.endswith(".lock") for n in leftovers), leftovers  # nothing half-built


def test_too_many_validation_rows_and_mixed_data_files(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("".join(f"line {i}\n" for i in range(20)))
    cfg = make_cfg(tmp_path, train_files=str(path), validation_rows=20)
    with pytest.raises(DataError, match=r"data.validation_rows=20 leaves no train rows.*20"):
        load_splits(cfg)
    with pytest.raises(DataError, match="name the split of every entry"):
        sources.hub_data_files("train=a/*,b/*")


def test_progress_bar_and_the_run_summary_line(tmp_path, corpora, small_chunks, capfd, monkeypatch):
    cfg = make_cfg(tmp_path, train_files=str(corpora["parquet"]), streaming=True)
    cfg = dataclasses.replace(cfg, validation_fraction=0.1)
    blocks = load_splits(cfg)
    err = capfd.readouterr().err
    assert "tokenizing train + validation" in err and "tokens/s" in err and " rows" in err
    report = cache_report(blocks)
    assert report.startswith("tokenized train + validation in ") and "tokens/s" in report
    assert "1 process" in report and str(Path(cfg.cache_dir) / "tokens") in report
    # A known row count (Arrow) adds the time left: tqdm's "elapsed<remaining".
    monkeypatch.setattr(token_cache, "_PROGRESS_MIN_ROWS", 0)
    arrow = make_cfg(tmp_path, "arrow", train_files=str(corpora["parquet"]))
    load_splits(arrow)
    bar = capfd.readouterr().err.split("\r")[-1]
    assert re.search(r"345/345 \[\d\d:\d\d<\d\d:\d\d, .*tokens/s\]", bar), bar
    again = cache_report(load_splits(cfg))
    assert again.startswith("train + validation from the token cache (")
    text = summary.start_summary(
        dict(
            model=dict(n_layer=1, n_head=1, n_embd=8),
            train=dict(batch_size=2, log_every=1, eval_every=0, checkpoint_every=0),
            data=dict(block_size=4),
            optim=dict(learning_rate=1e-3, schedule="cosine", warmup_steps=0),
        ),
        params=10,
        device_count=1,
        process_count=1,
        platform="cpu",
        mesh_shape={"data": 1},
        start_step=0,
        total_steps=1,
        steps_per_epoch=1,
        blocks={"train": 1},
        weights="scratch",
        workdir="w",
        data=again,
    )
    assert f"  data        {again}" in text.splitlines()


def test_peak_memory_does_not_grow_with_the_corpus(tmp_path, monkeypatch):
    """Offsets and tokens go to disk chunk by chunk: 6x the rows, the same peak (Python and
    numpy allocations, as tracemalloc sees them; measured: equal within ~15 KB)."""
    monkeypatch.setattr(corpus, "CHUNK_BYTES", 16 << 10)
    peaks = []
    for n in (1000, 10_000, 60_000):  # the first one warms up imports and caches
        path = tmp_path / f"rows{n}.parquet"  # parquet: read a row group at a time
        pq.write_table(pa.table({"text": ["a b\n"] * n}), path, row_group_size=5000)
        cfg = make_cfg(tmp_path, f"c{n}", train_files=str(path), streaming=True)
        cfg = dataclasses.replace(cfg, validation_split_percentage=0)
        if n > 1000:
            tracemalloc.start()
        tokens, offsets = load_token_stream(cfg, "train")
        if n > 1000:
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
        assert len(offsets) == n + 1 and len(tokens) == 3 * n
    # 50k more rows: their offsets alone are 400 KB, their tokens 300 KB.
    assert peaks[1] - peaks[0] < 100 << 10, peaks


def test_a_streamed_parquet_file_does_not_keep_its_row_groups(tmp_path):
    """datasets reads a parquet file as one Arrow fragment; with Arrow's default
    ``pre_buffer=True`` every row group read stayed cached to the file's end, so a stream's
    resident memory grew with every row group read (to 952 MB for 1 GiB of text).
    Streamed through ``sources``, it stays flat once warm. In a fresh process: its RSS only."""
    rng = np.random.default_rng(0)
    rows = [rng.bytes(3000).hex() for _ in range(32_000)]  # 192 MB snappy cannot shrink
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": rows}), path, row_group_size=100)  # 320 row groups
    del rows
    assert path.stat().st_size > 160 << 20
    code = f"""
from gpt2_jax.data import sources
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) << 10
ds = sources.load_files("parquet", "train", [{str(path)!r}], "train_files", streaming=True)
source = sources.RowSource(ds["train"], "text", {{}}, None, "test")
n, warm, peak = 0, None, 0
for table in sources.tables(source, 0, batch_rows=256):
    n += len(table)
    if n >= 8000:  # a quarter in: buffers and pools have their working size
        warm = warm or rss()
        peak = max(peak, rss())
print(n, peak - warm)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    n, growth = (int(x) for x in r.stdout.split())
    assert n == 32_000
    # Measured over the last 144 MB: 0-26 MB with pre_buffer off, 124-170 MB with it on.
    assert growth < 64 << 20, f"RSS grew {growth / 2**20:.1f} MB over the last 144 MB read"
