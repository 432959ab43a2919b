"""Write files and directories so that a crash never leaves half of one behind.

A file is written beside its target under a temporary name and renamed over it
(``os.replace`` is atomic on one file system). A directory is built in a staging directory
beside its target and swapped in at the end: the old one is renamed aside, the new one
renamed into place, the old one removed, so the target path only ever names a complete
directory. Used by everything that writes outputs (datasets, tokenizer, the demo world,
stand-in checkpoints, evaluation tables, study results).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    return write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes ``data`` to ``path`` atomically (temporary file + rename); returns the path."""
    with staged_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


@contextlib.contextmanager
def staged_file(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``target`` to write; when the block ends without an error it
    replaces ``target`` (``os.replace``), otherwise it is removed."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{secrets.token_hex(4)}")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def swap_dir_into_place(new: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Renames the finished directory ``new`` to ``target``, replacing an old one there."""
    new, target = Path(new), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        old = target.parent / f".old-{target.name}-{secrets.token_hex(4)}"
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(target)
    return target


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike) -> Iterator[Path]:
    """A fresh staging directory beside ``target``; when the block ends without an error it
    becomes ``target`` (:func:`swap_dir_into_place`), otherwise it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = target.parent / f".tmp-{target.name}-{secrets.token_hex(4)}"
    stage.mkdir()
    try:
        yield stage
        swap_dir_into_place(stage, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
