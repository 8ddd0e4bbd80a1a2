"""Data pipeline: run_clm parity of blocks and hold-out, cache, loader purity, errors, and the
typed data section (``DataConfig``)."""

import ast
import dataclasses
import hashlib
import json
import re
import time
from functools import partial
from pathlib import Path

import datasets
import numpy as np
import pytest

from gpt2_jax.config import base as config_lib
from gpt2_jax.data import pydoc, rows, token_cache, tokenizer
from gpt2_jax.data.blocks import Blocks, load_splits
from gpt2_jax.data.config import DataConfig
from gpt2_jax.data.loader import BatchLoader
from gpt2_jax.data.sources import DataError
from gpt2_jax.data.splits import split_spec
from gpt2_jax.data.token_cache import load_token_stream

from .helpers import ROOT, group_texts, wiki_lines


def make_cfg(tmp_path, **overrides):
    return DataConfig(cache_dir=str(tmp_path / "cache"), **overrides)


def write(path, text_or_bytes):
    path = Path(path)
    if isinstance(text_or_bytes, str):
        text_or_bytes = text_or_bytes.encode()
    path.write_bytes(text_or_bytes)
    return str(path)


@pytest.fixture(scope="module")
def wiki_slice(tmp_path_factory):
    """The shipped wikitext slice, one sentence a row: ~1300 rows (> 1000, so run_clm's
    per-chunk remainder drop matters) of real text in ~170 KB."""
    rows = [s.rstrip() + "\n" for line in wiki_lines() for s in re.split(r"(?<= \. )", line)]
    rows = [row for row in rows if row.strip()]
    assert len(rows) > 1000
    return write(tmp_path_factory.mktemp("wiki") / "wiki_slice.txt", "".join(rows))


def run_clm_blocks(path, split, block_size, cache_dir):
    """run_clm.py's pipeline: text builder, per-row tokenize, group_texts via map(batched)."""
    enc = tokenizer.get_tokenizer()
    raw = datasets.load_dataset(
        "text", data_files={"train": path}, split=split, keep_linebreaks=True, cache_dir=cache_dir
    )
    tokenized = raw.map(
        lambda b: {"input_ids": [enc.encode_ordinary(t) for t in b["text"]]},
        batched=True,
        remove_columns=["text"],
    )

    # default batch_size=1000
    grouped = tokenized.map(partial(group_texts, block_size=block_size), batched=True)
    return raw, np.array(grouped["input_ids"], dtype=np.int32).reshape(-1, block_size)


# ---------------------------------------------------------------- the data section


def test_data_config_is_the_config_layers_data_section():
    section = config_lib.base_config().data
    assert DataConfig.from_mapping(section) == DataConfig()
    assert sorted(section.to_dict()) == sorted(DataConfig().to_dict())
    cfg = DataConfig(train_files="a.txt", validation_fraction=0.1, streaming=True)
    assert DataConfig.from_mapping(json.loads(json.dumps(cfg.to_dict()))) == cfg
    # A hand-written mapping may give 0 for a float key, 64.0 for an int key: both come back typed.
    typed = DataConfig.from_mapping({"validation_fraction": 0, "block_size": 64.0})
    assert typed.validation_fraction == 0.0 and isinstance(typed.validation_fraction, float)
    assert typed.block_size == 64 and isinstance(typed.block_size, int)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.block_size = 8


def test_data_config_errors_name_the_key(tmp_path):
    with pytest.raises(DataError, match=r"data.block_sise is not a data key.*data.block_size\?"):
        DataConfig.from_mapping({"block_sise": 64})
    small = write(tmp_path / "small.txt", "some text\n")
    for key, value, needle in [
        ("block_size", "64", "data.block_size must be an integer, got '64'"),
        ("block_size", 64.5, "data.block_size must be an integer, got 64.5"),
        ("streaming", "yes", "data.streaming must be true or false"),
        ("validation_fraction", True, "data.validation_fraction must be a number"),
        ("text_column", 3, "data.text_column must be a string"),
        ("validation_split_percentage", 2.5, "must be an integer in \\[0, 100\\), got 2.5"),
    ]:
        with pytest.raises(DataError, match=needle):
            make_cfg(tmp_path, train_files=small, **{key: value}).validate()


def test_token_cache_root_is_the_one_cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_JAX_CACHE", str(tmp_path / "env"))
    spec = split_spec(DataConfig(dataset="pydoc_topics"), "train")
    assert token_cache.stem(DataConfig(), spec).parent == tmp_path / "env" / "tokens"
    mine = DataConfig(cache_dir=str(tmp_path / "mine"))
    assert token_cache.stem(mine, spec).parent == tmp_path / "mine" / "tokens"


def test_the_data_layer_never_imports_the_configdict():
    for path in sorted((ROOT / "gpt2_jax" / "data").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] == "ml_collections" for n in names), path.name


# ---------------------------------------------------------------- run_clm parity


@pytest.mark.parametrize("pct", [0, 5])
def test_blocks_equal_run_clm_group_texts(tmp_path, wiki_slice, pct):
    # Odd, and one where each 1000-row chunk's remainder drop costs a whole block (asserted
    # below), so a global grouping would fail this test.
    block_size = 89
    cfg = make_cfg(
        tmp_path, train_files=wiki_slice, block_size=block_size, validation_split_percentage=pct
    )
    splits = ("train", "validation") if pct else ("train",)
    got = load_splits(cfg, splits)
    ref_split = {"train": f"train[{pct}%:]", "validation": f"train[:{pct}%]"}
    for split in splits:
        raw, want = run_clm_blocks(wiki_slice, ref_split[split], block_size, str(tmp_path / "hf"))
        blocks = got[split]
        assert len(blocks.offsets) - 1 == len(raw)
        assert len(blocks) == len(want) and blocks.num_tokens == want.size
        np.testing.assert_array_equal(blocks[np.arange(len(blocks))], want)
    # The per-chunk drop really matters here (else the test would not tell them apart).
    assert len(got["train"]) < (len(got["train"].tokens) // block_size)


def test_group_rows_zero_is_global_grouping(tmp_path, wiki_slice):
    cfg = make_cfg(
        tmp_path, train_files=wiki_slice, block_size=97, group_rows=0, validation_split_percentage=0
    )
    blocks = load_splits(cfg, ("train",))["train"]
    stream = np.asarray(blocks.tokens, dtype=np.int32)
    want = stream[: len(stream) // 97 * 97].reshape(-1, 97)
    np.testing.assert_array_equal(blocks[np.arange(len(blocks))], want)
    assert blocks[3].shape == (97,) and blocks[[3]].dtype == np.int32


def test_holdout_matches_datasets_percent_slicing(tmp_path):
    path = write(tmp_path / "rows.txt", "".join(f"row {i} text\n" for i in range(101)))
    cfg = make_cfg(tmp_path, train_files=path, validation_split_percentage=7)
    enc = tokenizer.get_tokenizer()
    for split, spec in (("validation", "train[:7%]"), ("train", "train[7%:]")):
        rows = datasets.load_dataset(
            "text", data_files=path, split=spec, keep_linebreaks=True, cache_dir=str(tmp_path / "h")
        )["text"]
        tokens, offsets = load_token_stream(cfg, split)
        assert len(offsets) - 1 == len(rows)
        want = [t for row in rows for t in enc.encode_ordinary(row)]
        np.testing.assert_array_equal(tokens, want)
    # Explicit validation files replace the hold-out: train keeps every row.
    val = write(tmp_path / "val.txt", "validation text\n")
    cfg = dataclasses.replace(cfg, validation_files=val)
    assert len(load_token_stream(cfg, "train")[1]) - 1 == 101
    cfg = dataclasses.replace(cfg, max_rows=3)
    tokens, offsets = load_token_stream(cfg, "train")
    np.testing.assert_array_equal(
        tokens, enc.encode_ordinary("row 0 text\nrow 1 text\nrow 2 text\n")
    )


def test_append_eos_and_literal_endoftext(tmp_path):
    path = write(tmp_path / "eot.txt", "before <|endoftext|> after\nsecond line\n")
    cfg = make_cfg(tmp_path, train_files=path, validation_split_percentage=0)
    tokens, offsets = load_token_stream(cfg, "train")
    assert tokenizer.EOT_ID not in tokens  # literal text, not the special token
    assert tokenizer.get_tokenizer().decode(tokens.tolist()) == (
        "before <|endoftext|> after\nsecond line\n"
    )
    cfg = dataclasses.replace(cfg, append_eos=True)
    eos_tokens, eos_offsets = load_token_stream(cfg, "train")
    assert len(eos_tokens) == len(tokens) + 2
    assert list(eos_tokens[eos_offsets[1:] - 1]) == [tokenizer.EOT_ID] * 2


def test_pydoc_topics_offline(tmp_path):
    cfg = make_cfg(tmp_path, dataset="pydoc_topics", block_size=256)
    splits = load_splits(cfg)
    assert len(splits["train"].tokens) > 50_000
    assert 0 < len(splits["validation"]) < len(splits["train"])


def test_pydoc_layout_is_normalised():
    text = (
        'Title\n*****\n\n   for_stmt ::= "for" target\n                ["else"]\n\n\n\n'
        "   x = 1      # note\n       y\n"
    )
    assert pydoc.normalize_layout(text) == (
        'Title\nfor_stmt ::= "for" target\n    ["else"]\nx = 1 # note\n    y\n'
    )
    prose = "A first line\nwrapped at 70 columns.\n\nNext  paragraph.\n"
    assert pydoc.normalize_layout(prose) == "A first line wrapped at 70 columns.\nNext paragraph.\n"
    # A grid table: a line a row, each cell's wrapped text joined, no borders left.
    table = (
        "   +--------+---------------------+\n"
        "   | Option | Meaning             |\n"
        "   |========|=====================|\n"
        "   | \"'<'\"  | Left-aligned within |\n"
        "   |        | the space.          |\n"
        "   +--------+---------------------+\n"
        "   |        | A note  only.       |\n"
        "   +--------+---------------------+\n"
        "\nAfter.\n"
    )
    assert pydoc.normalize_layout(table) == (
        "Option: Meaning\n\"'<'\": Left-aligned within the space.\nA note only.\nAfter.\n"
    )
    rows = pydoc.pydoc_rows()
    assert not any(r.startswith(" " * (pydoc.MAX_INDENT + 1)) for r in rows)
    assert not any("| |" in r or r.startswith("+--") for r in rows)  # no table drawing left
    assert "\n" not in rows  # no blank lines
    # The token cache key covers the layout: it hashes the rows as normalised.
    cfg = DataConfig(dataset="pydoc_topics")
    spec = split_spec(cfg, "train")
    assert spec["topics_sha"] == hashlib.sha256("".join(rows).encode()).hexdigest()


def test_json_lines_with_text_column(tmp_path):
    rows = '{"content": "hello world", "n": 1}\n{"content": "again", "n": 2}\n'
    cfg = make_cfg(tmp_path, train_files=write(tmp_path / "docs.jsonl", rows))
    cfg = dataclasses.replace(cfg, validation_split_percentage=0)
    with pytest.raises(DataError, match=r"data.text_column='text'.*\['content', 'n'\]"):
        load_token_stream(cfg, "train")
    cfg = dataclasses.replace(cfg, text_column="n")
    with pytest.raises(DataError, match=r"data.text_column='n' holds .*int64.*not text"):
        load_token_stream(cfg, "train")
    cfg = dataclasses.replace(cfg, text_column="content")
    tokens, offsets = load_token_stream(cfg, "train")
    assert tokenizer.get_tokenizer().decode(tokens.tolist()) == "hello worldagain"


# ---------------------------------------------------------------- cache


def test_cache_hit_truncation_and_key(tmp_path, monkeypatch, wiki_slice):
    cfg = make_cfg(tmp_path, train_files=wiki_slice, block_size=64)
    first = load_splits(cfg)
    want = {k: v[np.arange(len(v))] for k, v in first.items()}

    def boom(*args, **kwargs):
        raise AssertionError("cache miss: tokenized or loaded again")

    with monkeypatch.context() as m:
        m.setattr(rows, "load_rows", boom)
        m.setattr(tokenizer, "get_tokenizer", boom)
        again = load_splits(cfg)
        for k in want:
            np.testing.assert_array_equal(again[k][np.arange(len(again[k]))], want[k])
        # The cache holds the stream, not blocks: a new block_size reuses it.
        cfg = dataclasses.replace(cfg, block_size=50)
        assert len(load_splits(cfg)["train"]) > len(want["train"])
        cfg = dataclasses.replace(cfg, block_size=64)

    # A truncated token file is detected and rebuilt, with the same result.
    (tok_file,) = (tmp_path / "cache" / "tokens").glob("train-*.tokens")
    tok_file.write_bytes(tok_file.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="truncated or corrupt"):
        rebuilt = load_splits(cfg, ("train",))["train"]
    np.testing.assert_array_equal(rebuilt[np.arange(len(rebuilt))], want["train"])

    # append_eos changes the stream, so it retokenizes.
    calls = []
    real = token_cache.tokenize_to
    monkeypatch.setattr(token_cache, "tokenize_to", lambda *a: calls.append(1) or real(*a))
    cfg = dataclasses.replace(cfg, append_eos=True)
    load_splits(cfg, ("train",))
    assert calls == [1]
    assert not list((tmp_path / "cache" / "tokens").glob("*.tmp-*"))  # no leftovers


# ---------------------------------------------------------------- loader


def test_loader_is_pure_function_of_seed_and_step():
    n, batch = 103, 8  # 12 steps per epoch, 7 examples dropped each epoch
    a, b = BatchLoader(n, batch, seed=3), BatchLoader(n, batch, seed=3)
    assert a.steps_per_epoch == 12
    steps = [0, 5, 11, 12, 13, 30, 2]  # across epoch boundaries, out of order
    for s in steps:
        np.testing.assert_array_equal(a.indices(s), BatchLoader(n, batch, 3).indices(s))
    epoch0 = np.concatenate([b.indices(s) for s in range(12)])
    epoch1 = np.concatenate([b.indices(s) for s in range(12, 24)])
    assert len(set(epoch0)) == len(epoch0) == 96 and set(epoch0) <= set(range(n))
    assert len(set(epoch1)) == 96 and not np.array_equal(epoch0, epoch1)
    assert b.epoch(11) == 0 and b.epoch(12) == 1
    assert not np.array_equal(BatchLoader(n, batch, seed=4).indices(0), b.indices(0))
    parts = [BatchLoader(n, batch, 3, p, 4).indices(13) for p in range(4)]
    assert all(len(p) == 2 for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), a.global_indices(13))
    np.testing.assert_array_equal(BatchLoader(n, batch, 3, shuffle=False).indices(1), range(8, 16))


def test_loader_batch_and_errors(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    blocks = Blocks(tokens, np.array([0, 1000]), block_size=10)
    loader = BatchLoader(len(blocks), 4, seed=0, process_index=1, process_count=2)
    got = loader.batch(blocks, 7)
    assert got.shape == (2, 10) and got.dtype == np.int32
    np.testing.assert_array_equal(got[:, 0], loader.indices(7) * 10)
    with pytest.raises(DataError, match="100 blocks of 10 tokens < global batch 128"):
        BatchLoader(len(blocks), 128, seed=0, block_size=10)
    with pytest.raises(DataError, match="multiple of the process count 3"):
        BatchLoader(len(blocks), 4, seed=0, process_count=3)


# ---------------------------------------------------------------- errors


def test_errors_name_the_key_or_path(tmp_path):
    with pytest.raises(DataError, match="no data source"):
        load_splits(make_cfg(tmp_path))
    missing = str(tmp_path / "missing.txt")
    with pytest.raises(DataError, match=r"data.train_files: no such file: .*missing.txt"):
        load_splits(make_cfg(tmp_path, train_files=missing))
    with pytest.raises(DataError, match=r"glob .*\*.nothing.* matches no file"):
        load_splits(make_cfg(tmp_path, train_files=str(tmp_path / "*.nothing")))
    empty = write(tmp_path / "empty.txt", "")
    with pytest.raises(DataError, match=r"empty.txt is empty"):
        load_splits(make_cfg(tmp_path, train_files=empty))
    small = write(tmp_path / "small.txt", "just a few words\n" * 3)
    with pytest.raises(DataError, match="data.block_size must be > 1"):
        load_splits(make_cfg(tmp_path, train_files=small, block_size=1))
    cfg = make_cfg(tmp_path, train_files=small, validation_split_percentage=0)
    with pytest.raises(DataError, match=r"has 15 tokens.*block_size=1024.*smaller"):
        load_splits(cfg, ("train",))
    with pytest.raises(DataError, match="no validation data"):
        load_splits(cfg)
    cfg = dataclasses.replace(cfg, text_column="body")
    with pytest.raises(DataError, match=r"data.text_column='body'.*\['text'\]"):
        load_splits(cfg, ("train",))


def test_non_utf8_strict_and_replace(tmp_path):
    path = write(tmp_path / "latin1.txt", b"fine line\nna\xefve caf\xe9\nmore\n" * 40)
    cfg = make_cfg(tmp_path, train_files=path, block_size=8, validation_split_percentage=0)
    with pytest.raises(DataError) as err:
        load_splits(cfg, ("train",))
    msg = str(err.value)
    assert "latin1.txt" in msg and "line 2" in msg and "byte offset 12" in msg
    assert "--config.data.encoding_errors=replace" in msg
    cfg = dataclasses.replace(cfg, encoding_errors="replace")
    tokens, _ = load_token_stream(cfg, "train")
    assert "na\ufffdve caf\ufffd" in tokenizer.get_tokenizer().decode(tokens[:40].tolist())


def test_hub_dataset_offline_is_fast_and_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = make_cfg(tmp_path, dataset="wikitext", dataset_config="wikitext-2-raw-v1")
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"cannot reach the Hugging Face Hub.*train_files"):
        load_splits(cfg)
    assert time.perf_counter() - start < 10
