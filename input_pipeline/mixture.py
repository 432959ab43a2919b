"""One input stream read from several prepared datasets (``"ego_clip+ego_exo_clip"``).

A stream's dataset may name several datasets joined by ``+``: their records are
concatenated *before* shuffling (so a shuffled epoch interleaves them and visits every record
of every part once), and each record is turned into an example by its own dataset's example
function. The study's ego-only baseline uses it to caption every ego clip Exo2Ego sees: the
EgoClip corpus and the ego halves of the Ego-ExoClip pairs with their narrations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["SEPARATOR", "dataset_parts", "ConcatSource", "PartExampleFn"]

SEPARATOR = "+"


def dataset_parts(dataset: str) -> tuple[str, ...]:
    """The datasets a stream's ``dataset`` names (``"a+b"`` -> ``("a", "b")``), in order;
    an empty part or a repeated one is an error (a repeat would double its weight silently)."""
    parts = tuple(p.strip() for p in dataset.split(SEPARATOR))
    if any(not p for p in parts):
        raise ValueError(f"dataset {dataset!r}: empty name between {SEPARATOR!r} separators")
    if len(set(parts)) != len(parts):
        raise ValueError(f"dataset {dataset!r} names a dataset twice")
    return parts


class ConcatSource:
    """Random access over ``sources`` one after the other: index -> ``(part, record)``."""

    def __init__(self, sources: Sequence[Any]):
        self._sources = list(sources)
        self._offsets = np.cumsum([0] + [len(s) for s in self._sources])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, index: int) -> tuple[int, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        part = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return part, self._sources[part][index - int(self._offsets[part])]


class PartExampleFn:
    """``(part, record)`` -> the example of ``record`` by its part's example function.

    Picklable when the part functions are (the pipeline's are: they run in worker
    processes)."""

    def __init__(self, fns: Sequence[Callable[..., Any]]):
        self.fns = list(fns)

    def __call__(self, item: tuple[int, Any], rng: np.random.Generator | None = None) -> Any:
        part, record = item
        return self.fns[part](record, rng)
