"""Supervised fine-tuning data: one example a row, loss on the completion only.

The ``prompt_completion`` and ``messages`` formats (``data.format``) read rows through the
same sources and hold-outs as the text format (``rows``, ``splits``), and tokenize each row
into one example: token ids, and which of them are targets.

- **prompt_completion**: TRL 1.16's ``SFTTrainer`` for non-conversational data.
  ``<|endoftext|>`` is appended to the completion unless it ends with it;
  ``prompt_ids = encode(prompt)``, ``ids = encode(prompt + completion)``; the completion
  starts where the two stop agreeing (their common prefix), so a token that merges the
  prompt's end with the completion's start is a target.
- **messages**: rendered by ``data.chat_template`` (``chat``); a token is a target when it
  overlaps an assistant span, as transformers' assistant mask counts it.

An example longer than ``data.block_size`` keeps its first ``block_size`` tokens (counted:
``truncated``). An example left with no target token whose prediction is in the row is
skipped (counted: ``skipped``); a split where every example is skipped is an error.

``Examples`` serves rows of ``block_size`` tokens: one example a row, right-padded, or with
``data.packing`` several a row, best-fit decreasing, each with its own ``segment_ids`` and
``positions`` from 0 (``best_fit_decreasing``). ``examples[idx]`` is a dict of [len(idx), block_size]
arrays: ``input_ids``, ``loss_mask`` (token t is a target: the prediction made at t - 1
counts; never the first token of an example, never padding) and, packed, ``positions`` and
``segment_ids`` (padding: segment 0).
"""

from __future__ import annotations

import bisect
import dataclasses
import time

import numpy as np

from gpt2_jax.data import chat, corpus, rows, sources, splits, tokenizer
from gpt2_jax.data.config import DataConfig
from gpt2_jax.data.sources import DataError, say

EOS = "<|endoftext|>"


@dataclasses.dataclass
class ExampleStats:
    """What tokenizing a split found (the run summary's data line)."""

    rows: int = 0  # rows read
    truncated: int = 0  # examples cut to block_size
    skipped: int = 0  # examples without a target token in their row
    seconds: float = 0.0


# ---------------------------------------------------------------- one example


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """The length of the longest common prefix of two id arrays."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def _encode_text(enc, text: str) -> np.ndarray:
    # Hugging Face's tokenizer reads "<|endoftext|>" in text as the special token: so here.
    return np.asarray(enc.encode(text, allowed_special={EOS}), np.int32)


def prompt_completion(enc, prompt: str, completion: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [n], target bool [n]) of one row, as TRL 1.16 tokenizes it."""
    if not completion.endswith(EOS):
        completion += EOS
    prompt_ids, ids = _encode_text(enc, prompt), _encode_text(enc, prompt + completion)
    target = np.zeros(len(ids), bool)
    target[common_prefix(prompt_ids, ids) :] = True
    return ids, target


def conversation(enc, template, messages: list) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [n], target bool [n]) of one chat row: targets overlap assistant spans."""
    text, spans = chat.render(template, messages)
    ids = enc.encode(text, allowed_special={EOS})
    _, starts = enc.decode_with_offsets(ids)
    starts = np.asarray(starts + [len(text)], np.int64)
    target = np.zeros(len(ids), bool)
    for a, b in spans:
        target |= (starts[:-1] < b) & (starts[1:] > a)
    return np.asarray(ids, np.int32), target


# ---------------------------------------------------------------- rows -> examples


def _bad_row(index: int, message: str) -> DataError:
    return DataError(f"row {index}: {message}")


def _check_text(value, index: int, key: str) -> str:
    if not isinstance(value, str):
        raise _bad_row(index, f"data.{key} holds {type(value).__name__} {value!r:.60}, not text")
    if chat.OPEN in value or chat.CLOSE in value:
        raise _bad_row(index, f"data.{key} holds U+E000/U+E001, which the chat renderer uses")
    return value


def _check_messages(value, index: int, key: str) -> list:
    if not isinstance(value, list) or not value:
        raise _bad_row(index, f"data.{key}: must be a non-empty list of {{role, content}}")
    for turn in value:
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise _bad_row(index, f"data.{key}: each turn needs 'role' and 'content': {turn!r:.80}")
        _check_text(turn["role"], index, f"{key}[].role")
        _check_text(turn["content"], index, f"{key}[].content")
    return value


def _encoder(data_cfg: DataConfig):
    """row dict -> (ids, target) for the configured format."""
    enc = tokenizer.get_tokenizer()
    if data_cfg.format == "messages":
        template = chat.compile_template(chat.template_source(data_cfg.chat_template))
        key = data_cfg.messages_column
        return lambda row, i: conversation(
            enc, template, _check_messages(row[key], i, "messages_column")
        )
    p, c = data_cfg.prompt_column, data_cfg.completion_column
    return lambda row, i: prompt_completion(
        enc, _check_text(row[p], i, "prompt_column"), _check_text(row[c], i, "completion_column")
    )


def _json_kind(feature) -> str:
    """'value' for datasets' ``Json`` feature, 'items' for a ``List(Json)``, else ''."""
    if type(feature).__name__ == "Json":
        return "value"
    if type(getattr(feature, "feature", None)).__name__ == "Json":
        return "items"
    return ""


def _column_values(table, column: str, json_kind: str) -> list:
    """A column's values as Python objects. datasets reads a json column of mixed types
    (strings and numbers; chat turns with other keys) as its ``Json`` feature, stored as
    JSON text (``json_kind``, or an Arrow json extension type): decoded here, so a number is
    a number (and refused by name), not its text."""
    import json

    import pyarrow as pa

    col = table.column(column)
    if isinstance(col.type, pa.ExtensionType):
        json_kind = json_kind or ("value" if "json" in str(col.type.extension_name) else "")
        chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
        raw = [v for c in chunks for v in c.storage.to_pylist()]
    else:
        raw = col.to_pylist()

    def load(v):
        return None if v is None else json.loads(v)

    if json_kind == "items":
        return [v if not isinstance(v, list) else [load(x) for x in v] for v in raw]
    return [load(v) for v in raw] if json_kind else raw


def _check_columns(data_cfg: DataConfig, names, what: str) -> None:
    keys = {"messages": ("messages_column",)}.get(data_cfg.format)
    keys = keys or ("prompt_column", "completion_column")
    for key in keys:
        if getattr(data_cfg, key) not in names:
            raise DataError(
                f"data.{key}={getattr(data_cfg, key)!r} is not a column of {what}; its columns: "
                f"{list(names)} (data.format={data_cfg.format!r})"
            )


def load_examples(data_cfg: DataConfig, split: str) -> Examples:
    """Reads, checks and tokenizes ``split`` of an SFT format into ``Examples``."""
    t0 = time.perf_counter()
    spec = splits.split_spec(data_cfg, split)
    source = rows.load_rows(data_cfg, spec)
    selection = source.selections[spec["split"]]
    encode = _encoder(data_cfg)
    columns = list(splits.example_columns(data_cfg))
    features = getattr(source.rows, "features", None) or {}
    json_columns = {c: _json_kind(features.get(c)) for c in columns}
    block, stats = data_cfg.block_size, ExampleStats()
    ids_list, target_list = [], []
    row = 0
    for table in sources.tables(source, 0, corpus.READ_ROWS):
        if row == 0:
            _check_columns(data_cfg, table.column_names, source.what)
        n = len(table)
        keys = lambda row=row, n=n: corpus.holdout_keys(selection.seed, row, n)  # noqa: E731
        take = selection.mask(row, n, keys)
        values = {c: _column_values(table, c, json_columns[c]) for c in columns}
        for j in np.flatnonzero(take):
            if data_cfg.max_rows and stats.rows >= data_cfg.max_rows:
                break
            stats.rows += 1
            ids, target = encode({c: values[c][j] for c in columns}, row + int(j))
            if len(ids) > block:
                stats.truncated += 1
                ids, target = ids[:block], target[:block]
            if not target[1:].any():  # the first token's prediction is not in the row
                stats.skipped += 1
                continue
            ids_list.append(ids)
            target_list.append(target)
        row += n
        if selection.exhausted(row) or (data_cfg.max_rows and stats.rows >= data_cfg.max_rows):
            break
    if not ids_list:
        raise DataError(
            f"split {split!r} of {source.what} has no example with a completion token within "
            f"data.block_size={block} ({stats.rows} rows read, {stats.skipped} skipped)"
        )
    stats.seconds = time.perf_counter() - t0
    examples = Examples(ids_list, target_list, block, data_cfg.packing, stats)
    if stats.truncated or stats.skipped:
        say(f"{split}: {stats.truncated} examples cut to data.block_size={block}, "
            f"{stats.skipped} without a completion token in their row skipped")  # fmt: skip
    return examples


# ---------------------------------------------------------------- packing


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit decreasing: example indices per row, each row's lengths summing to at most
    ``capacity``. Longest first (ties by index); each goes to the row with the least room
    that fits it, else a new row. Deterministic; O(n log n + n * distinct room sizes)."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    bins: list[list[int]] = []
    room_of: dict[int, list[int]] = {}  # room left -> rows with that much room
    rooms: list[int] = []  # the distinct room sizes that have a row, sorted
    for i in order.tolist():
        n = int(lengths[i])
        k = bisect.bisect_left(rooms, n)
        if k < len(rooms):
            room = rooms[k]
            b = room_of[room].pop()
            if not room_of[room]:
                del room_of[room]
                rooms.pop(k)
        else:
            b, room = len(bins), capacity
            bins.append([])
        bins[b].append(i)
        left = room - n
        if left > 0:
            if left not in room_of:
                bisect.insort(rooms, left)
                room_of[left] = []
            room_of[left].append(b)
    return bins


class Examples:
    """Rows of ``block_size`` tokens over tokenized examples (see the module docstring)."""

    def __init__(self, ids: list, targets: list, block_size: int, packing: bool, stats=None):
        self.block_size, self.packing = int(block_size), bool(packing)
        self.lengths = np.array([len(x) for x in ids], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self.tokens = np.concatenate(ids).astype(np.int32)
        self.targets = np.concatenate(targets).astype(bool)
        self.stats = stats or ExampleStats(rows=len(ids))
        self.rows = (
            best_fit_decreasing(self.lengths, self.block_size)
            if packing
            else [[i] for i in range(len(ids))]
        )
        self.cache = None  # token_cache.cache_report reads it: not cached

    def __len__(self) -> int:
        return len(self.rows)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, target) of example ``i``, as tokenized (after truncation)."""
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.tokens[lo:hi], self.targets[lo:hi]

    @property
    def num_targets(self) -> int:
        """Target tokens whose prediction is in a row (an example's first token never is)."""
        firsts = self.targets[self.offsets[:-1]]
        return int(self.targets.sum() - firsts.sum())

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def __getitem__(self, idx) -> dict[str, np.ndarray]:
        idx = np.atleast_1d(np.asarray(idx))
        T, n = self.block_size, len(idx)
        out = {
            "input_ids": np.full((n, T), tokenizer.EOT_ID, np.int32),  # TRL pads with EOS
            "loss_mask": np.zeros((n, T), bool),
        }
        if self.packing:
            out["positions"] = np.zeros((n, T), np.int32)
            out["segment_ids"] = np.zeros((n, T), np.int32)
        for r, row in enumerate(idx.tolist()):
            at = 0
            for seg, i in enumerate(self.rows[row], start=1):
                ids, target = self.example(i)
                end = at + len(ids)
                out["input_ids"][r, at:end] = ids
                out["loss_mask"][r, at + 1 : end] = target[1:]
                if self.packing:
                    out["positions"][r, at:end] = np.arange(len(ids))
                    out["segment_ids"][r, at:end] = seg
                at = end
        return out

    def report(self) -> str:
        """The run summary's words on this split."""
        s = self.stats
        used = self.lengths.sum()
        fill = used / (len(self) * self.block_size)
        text = (
            f"{len(self.lengths):,} examples in {len(self):,} rows"
            f"{' (packed)' if self.packing else ''}, {fill:.0%} of their tokens used, "
            f"{self.num_targets:,} target tokens"
        )
        if s.truncated:
            text += f", {s.truncated:,} cut to {self.block_size} tokens"
        if s.skipped:
            text += f", {s.skipped:,} without a completion token skipped"
        return text
