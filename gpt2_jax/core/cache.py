"""One bounded cache of compiled executables (least recently used goes first).

Generation and the harness compile one executable per shape bucket; a long-lived process
(a notebook, a server, a training run's eval hook) must not keep every one it ever made.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class LRU(Generic[V]):
    """``get(key, make)``: the cached value of ``key``, else ``make()`` stored under it;
    at most ``maxsize`` values are kept. Thread-safe; ``make`` runs outside the lock."""

    def __init__(self, maxsize: int):
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        self._items: collections.OrderedDict[Hashable, V] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, make: Callable[[], V]) -> tuple[V, bool]:
        """(value, hit): ``hit`` is False when ``make`` ran."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key], True
        value = make()
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)
        return value, False

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
