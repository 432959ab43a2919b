"""What every annotation reader shares: the error it raises and the rule for the paths it reads.

Every reader of annotation files (the dataset builders of :mod:`input_pipeline.datasets`
and the EgoBench reader :mod:`input_pipeline.egobench`) raises :class:`AnnotationError` for a
malformed file and resolves every path an annotation names with :func:`resolve_in_root`, so
no annotation can point outside its data root. Stays free of TensorFlow Datasets and JAX:
evaluation imports it.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import Any

__all__ = ["AnnotationError", "resolve_in_root", "video_path"]


class AnnotationError(ValueError):
    """An annotation file is malformed: a field is missing, has the wrong type or an unknown
    value, or a path escapes the data root. The message names the file, the record and the
    field."""


def resolve_in_root(root: str | os.PathLike, rel: Any, *, file: Any, where: str, field: str) -> str:
    """The data-root-relative form of the annotation path ``rel``, refused unless inside ``root``.

    ``rel`` is relative to ``root`` (or absolute, if it lies inside ``root``); backslashes
    count as separators. The check is lexical (``..`` and absolute paths), so a dataset
    directory symlinked into the root still works. The file need not exist yet.

    Args:
      root: the data root.
      rel: the path as the annotation gives it.
      file, where, field: the annotation file, the record (``"record 3"``) and the field the
        path comes from; every error names them.

    Returns:
      The normalised POSIX path relative to ``root`` (e.g. ``"takes/t0/cam01.mp4"``).

    Raises:
      AnnotationError: ``rel`` is not a non-empty string, or resolves outside ``root`` (or to
        ``root`` itself).
    """
    at = f"{os.fspath(file)}: {where}: field {field!r}"
    if not isinstance(rel, str) or not rel.strip() or "\x00" in rel:
        raise AnnotationError(f"{at} must be a non-empty path string, got {rel!r}")
    base = os.path.abspath(root)
    posix = rel.replace("\\", "/")
    if len(posix) > 1 and posix[1] == ":":  # a Windows drive is never inside a POSIX root
        posix = "/" + posix
    path = posixpath.normpath(posixpath.join(base, posix))
    if posixpath.commonpath([base, path]) != base:
        if posixpath.isabs(posix):
            problem = f"is an absolute path outside the data root {base}"
        else:
            problem = f"resolves to {path}, which escapes the data root {base}"
        raise AnnotationError(
            f"{at} = {rel!r} {problem}; annotation paths must be relative to the root and "
            "stay inside it"
        )
    if path == base:
        raise AnnotationError(f"{at} = {rel!r} names the data root {base} itself, not a file")
    return posixpath.relpath(path, base)


def video_path(
    root: str | os.PathLike,
    rel: Any,
    *,
    file: Any = "<prepared dataset>",
    where: str = "record",
    field: str = "video",
) -> Path:
    """Absolute path of the video ``rel`` names (:func:`resolve_in_root`, joined to the root).

    The defaults name a stored record of a prepared dataset, whose relative paths are
    checked again when read (a dataset may have been edited since it was built).
    """
    return Path(os.path.abspath(root)) / resolve_in_root(
        root, rel, file=file, where=where, field=field
    )
