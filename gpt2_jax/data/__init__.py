"""Text to token batches: tokenizer, sources (datasets I/O), resumable tokenizing, blocks, the
per-host loader. Yields numpy; never touches devices.

Modules, one job each: ``config`` (``DataConfig``, the typed ``data.*`` section and its
checks), ``splits`` (a split's spec and hold-out), ``pydoc`` (the builtin corpus),
``sources`` (``datasets`` I/O), ``rows`` (a split's rows), ``corpus`` (the resumable build),
``workers`` (tokenizer processes), ``token_cache`` (read or build, the summary line),
``blocks`` (``Blocks``, ``load_splits``), ``loader`` (``BatchLoader``), ``tokenizer``.

The layer's entry points are importable from here, lazily (``from gpt2_jax import data``
costs nothing until a name is used).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DataConfig": "config",
    "DataError": "sources",
    "load_splits": "blocks",
    "Blocks": "blocks",
    "BatchLoader": "loader",
    "load_token_stream": "token_cache",
    "cache_report": "token_cache",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
