"""A bounded, process-wide in-memory cache of decoded clips.

Decoding is the input pipeline's main cost on a small model: on the demo (4 frames at
64 px, 2 CPU cores) it takes 60-80 ms of CPU per batch of 8, about as much as the train step
itself, and it runs beside the step on the same cores. A clip's frames are a pure function of
the file and the window (``video.load_clip`` samples no random frames), so every epoch after
the first can reuse them bit for bit. The demo's ~3,900 distinct training clips take ~190 MB
as ``uint8``; at paper size (16 x 336 px, 5.4 MB a clip) a cache holds few clips, so it is
off unless ``PipelineOptions.clip_cache_mb`` (``config.data.clip_cache_mb``) asks for it.

One cache per process, shared by every pipeline in it (the demo's stages run in one process
and read many of the same clips); each ``mp_prefetch`` worker process has its own. Least
recently used clips go first once the budget is full. Cached arrays are read-only.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable, Hashable

import numpy as np

__all__ = ["ClipCache", "current_cache", "file_key", "process_cache"]


class ClipCache:
    """``key -> uint8[T, S, S, 3]`` with a byte budget (least recently used evicted first).

    Thread-safe (Grain's read threads decode concurrently): a clip that several threads ask
    for at once is decoded by one of them while the others wait for it.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.hits = self.misses = self.evictions = 0
        self._bytes = 0
        self._items: collections.OrderedDict[Hashable, np.ndarray] = collections.OrderedDict()
        self._loading: dict[Hashable, threading.Event] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, load: Callable[[], np.ndarray]) -> np.ndarray:
        """The cached array for ``key``, or ``load()``'s result (cached if it fits)."""
        while True:
            with self._lock:
                found = self._items.get(key)
                if found is not None:
                    self._items.move_to_end(key)
                    self.hits += 1
                    return found
                loading = self._loading.get(key)
                if loading is None:  # this thread decodes it
                    loading = self._loading[key] = threading.Event()
                    self.misses += 1
                    break
            loading.wait()  # another thread is decoding it: then look again
        try:
            value = load()
            if value.nbytes <= self.max_bytes:
                value.flags.writeable = False  # shared between batches: read-only
                self._insert(key, value)
            return value
        finally:
            with self._lock:
                del self._loading[key]
            loading.set()

    def _insert(self, key: Hashable, value: np.ndarray) -> None:
        with self._lock:
            self._items[key] = value
            self._bytes += value.nbytes
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes
                self.evictions += 1

    def stats(self) -> dict[str, int]:
        """Hits, misses, evictions, clips held and bytes held, for logs and benchmarks."""
        with self._lock:
            return dict(
                hits=self.hits,
                misses=self.misses,
                evictions=self.evictions,
                clips=len(self._items),
                bytes=self._bytes,
            )


_PROCESS_CACHE: ClipCache | None = None
_PROCESS_LOCK = threading.Lock()


def process_cache(max_mb: float) -> ClipCache | None:
    """This process's clip cache with a budget of at least ``max_mb`` MiB (None if
    ``max_mb <= 0``). The first caller creates it; a larger request raises the budget."""
    global _PROCESS_CACHE
    if max_mb <= 0:
        return None
    max_bytes = int(max_mb * 2**20)
    with _PROCESS_LOCK:
        if _PROCESS_CACHE is None:
            _PROCESS_CACHE = ClipCache(max_bytes)
        elif _PROCESS_CACHE.max_bytes < max_bytes:
            _PROCESS_CACHE.max_bytes = max_bytes
        return _PROCESS_CACHE


def current_cache() -> ClipCache | None:
    """This process's clip cache if a pipeline made one (for reports), else None."""
    return _PROCESS_CACHE


def file_key(path: str | os.PathLike) -> tuple[str, int, int] | None:
    """Path, size and modification time (a file rewritten in place is a new key); None when
    the file cannot be stat'ed (the decoder then reports it)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return os.fspath(path), st.st_size, st.st_mtime_ns
