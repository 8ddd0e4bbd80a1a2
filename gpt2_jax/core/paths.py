"""Where gpt2_jax keeps what it can rebuild: one cache root for every command.

``$GPT2_JAX_CACHE``, else ``~/.cache/gpt2_jax``. Token caches (``data.cache_dir`` overrides
their root), and later the compile cache, live under it. Nothing under it is ever
unpickled or executed: a cache directory may be shared, and whoever can write there must
not be able to run code in this process.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "GPT2_JAX_CACHE"
DEFAULT = "~/.cache/gpt2_jax"


def cache_root(override: str = "") -> Path:
    """The cache root: ``override`` if given, else ``$GPT2_JAX_CACHE``, else the default
    (absolute, ``~`` expanded; not created here)."""
    root = override or os.environ.get(ENV) or DEFAULT
    return Path(os.path.expanduser(root)).resolve()
