"""Let TFDS's writer spill records to disk without TensorFlow, and earlier than 1 GB.

TFDS's writer (``tensorflow_datasets.core.shuffle.Shuffler``) keeps a split's serialized
records in memory until they pass ``MAX_MEM_BUFFER_SIZE`` (1 GB), then moves them to 1,000
bucket files, which it opens with ``tf.io.gfile``. Without TensorFlow installed (these
builders need none) a split larger than 1 GB, such as EgoClip's 3.85 M rows, therefore died
with ``ModuleNotFoundError: tensorflow`` after the whole split was read; and a smaller one
held all of its records in memory.

:func:`tf_free_spill` fixes both for the duration of a build: the bucket files are opened
through ``etils.epath`` (TensorFlow-free), and records spill once they pass ``limit`` bytes.
The records and their order are the same either way (buckets are hash ranges, each sorted).
TFDS offers no option for either, so this sets two module attributes of
``tensorflow_datasets.core.shuffle``, as TFDS's own tests do, and restores them afterwards.
"""

from __future__ import annotations

import contextlib
import errno
import types
from collections.abc import Iterator

from etils import epath
from tensorflow_datasets.core import shuffle

__all__ = ["SPILL_ABOVE", "tf_free_spill"]

#: Bytes of serialized records a split holds in memory before spilling to bucket files.
SPILL_ABOVE = 128 << 20


def _open(path, mode: str = "r"):
    """``tf.io.gfile.GFile`` for the bucket files (raising the open-files limit once)."""
    try:
        return epath.Path(path).open(mode)
    except OSError as e:
        if e.errno != errno.EMFILE:
            raise
        shuffle._increase_open_files_limit()  # what TFDS does on TensorFlow's error
        return epath.Path(path).open(mode)


class _NeverRaised(Exception):
    """Stands for ``tf.errors.ResourceExhaustedError`` (``_open`` handles that case)."""


_GFILE = types.SimpleNamespace(
    GFile=_open,
    exists=lambda path: epath.Path(path).exists(),
    remove=lambda path: epath.Path(path).unlink(),
)
_TF = types.SimpleNamespace(
    io=types.SimpleNamespace(gfile=_GFILE),
    errors=types.SimpleNamespace(ResourceExhaustedError=_NeverRaised),
)


@contextlib.contextmanager
def tf_free_spill(limit: int | None = None) -> Iterator[None]:
    """Within the block, TFDS's writer spills past ``limit`` bytes (default
    :data:`SPILL_ABOVE`) to bucket files it opens without TensorFlow."""
    saved = shuffle.tf, shuffle.MAX_MEM_BUFFER_SIZE
    shuffle.tf = _TF
    shuffle.MAX_MEM_BUFFER_SIZE = SPILL_ABOVE if limit is None else limit
    try:
        yield
    finally:
        shuffle.tf, shuffle.MAX_MEM_BUFFER_SIZE = saved
