"""The builtin offline corpus, ``data.dataset=pydoc_topics``: Python's bundled help topics,
their reStructuredText layout normalised into mostly words (``make demo`` trains on it).
"""

from __future__ import annotations

import functools
import hashlib
import re
from io import StringIO


@functools.lru_cache(maxsize=1)
def pydoc_rows() -> tuple[str, ...]:
    """Python's bundled help topics, sorted by key, laid out by ``normalize_layout`` and
    split into lines like the Text builder."""
    from pydoc_data.topics import topics

    return tuple(
        line for k in sorted(topics) for line in StringIO(normalize_layout(topics[k])).readlines()
    )


# Heading underlines ("*****", "=====") and table borders ("+-----+----+"): no words.
_RULE = re.compile(r"^[ *=\-~^+|]*[*=\-~^+|]{3}[ *=\-~^+|]*$")
_INNER_SPACES = re.compile(r"(?<=\S) {2,}")
# A grid table's border ("+-----+----+", "|=====|====|"), which fixes its column edges.
_GRID_BORDER = re.compile(r"^ *[+|][-=]+[+|]([-=]+[+|])* *$")
MAX_INDENT = 4


def _grid_table_rows(lines: list[str]) -> list[str] | None:
    """A grid table's rows, one line each (``first cell: next cell; ...``), or None.

    Cells wrap over several lines between borders ("| "'<'" | Forces the field to be |" then
    "|  | space (this is ... |"); kept as drawn, a model learns runs of ``| |``. The column
    edges are the ``+`` of the first border; each row's cell text is joined across lines.
    """
    if not _GRID_BORDER.match(lines[0]) or not lines[0].lstrip().startswith("+"):
        return None
    edges = [i for i, ch in enumerate(lines[0]) if ch == "+"]
    rows: list[str] = []
    cells: list[list[str]] = [[] for _ in edges[1:]]

    def flush():
        texts = [" ".join(c) for c in cells]
        if any(texts):
            head, rest = texts[0], "; ".join(t for t in texts[1:] if t)
            rows.append(f"{head}: {rest}" if head and rest else head or rest)
        for c in cells:
            c.clear()

    for ln in lines[1:]:
        if _GRID_BORDER.match(ln):
            flush()
            continue
        for c, lo, hi in zip(cells, edges[:-1], edges[1:], strict=True):
            if part := ln[lo + 1 : hi].strip():
                c.append(part)
    flush()
    return rows


def normalize_layout(text: str) -> str:
    """The builtin corpus's layout, made mostly words (``make demo`` samples it).

    The help text is rendered reStructuredText: paragraphs indented by 3-8 spaces, grammar
    rules aligned with runs of 16+ spaces, heading underlines of ``*`` and table borders.
    Whitespace runs and line breaks are separate GPT-2 tokens, so a small model trained on
    the raw text mostly learns to emit spaces and newlines. So: rules are dropped; a prose
    paragraph (every line at column 0) becomes one line, as the hard wrap at 70 columns
    carries no meaning; any other paragraph (code, grammar, lists, notes) is dedented, its
    remaining indentation capped at ``MAX_INDENT`` spaces (code stays visibly nested); a grid
    table becomes a line a row (``_grid_table_rows``); runs
    of inner spaces (alignment, two spaces after a full stop) become one; paragraphs are
    separated by one line break, not a blank line (each newline is one more token).
    """
    out: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        lines = [ln.rstrip() for ln in para.split("\n")]
        lines = [ln for ln in lines if ln]
        if lines and (table := _grid_table_rows(lines)) is not None:
            out.extend(_INNER_SPACES.sub(" ", row) for row in table)
            continue
        lines = [ln for ln in lines if not _RULE.match(ln)]
        if not lines:
            continue
        indents = [len(ln) - len(ln.lstrip(" ")) for ln in lines]
        if max(indents) == 0:  # prose
            lines = [" ".join(lines)]
        base = min(indents)
        for ln in lines:
            body = ln[base:]
            indent = min(len(body) - len(body.lstrip(" ")), MAX_INDENT)
            out.append(" " * indent + _INNER_SPACES.sub(" ", body.lstrip(" ")))
    return "".join(line + "\n" for line in out)


def pydoc_sha() -> str:
    """sha256 of the rows as normalised: a token cache key that changes with the layout."""
    return hashlib.sha256("".join(pydoc_rows()).encode()).hexdigest()
