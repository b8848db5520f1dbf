"""Process-wide model cache shared by generation and safety models.

Each Airflow task runs in its own process, so an entry lives for one task (or one CLI run, or one
notebook): its value is that several operators/checkers in one process load a model once.
"""

from __future__ import annotations

import gc
import threading
from typing import Any, Callable, Hashable


class ModelCache:
    def __init__(self):
        self._lock = threading.Lock()
        self._entries: dict[Hashable, Any] = {}
        self._key_locks: dict[Hashable, threading.Lock] = {}

    def get(self, key: Hashable, load: Callable[[], Any]) -> Any:
        """The cached value for ``key``, loading it once even when threads ask at the same time."""
        with self._lock:
            if key in self._entries:
                return self._entries[key]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._entries:
                    return self._entries[key]
            value = load()
            with self._lock:
                self._entries[key] = value
            return value

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def evict(self, key: Hashable) -> bool:
        with self._lock:
            value = self._entries.pop(key, None)
            self._key_locks.pop(key, None)
        if value is None:
            return False
        del value
        free_memory()
        return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._key_locks.clear()
        free_memory()


def free_memory() -> None:
    gc.collect()
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def in_memory(fn, *args) -> bool:
    """``fn(*args)``; False when CUDA ran out of memory. The error ends here, before anything is freed or
    retried: while it is handled, its traceback holds the failed call's frames and their tensors."""
    import torch

    try:
        fn(*args)
    except torch.OutOfMemoryError:
        return False
    return True


MODEL_CACHE = ModelCache()
