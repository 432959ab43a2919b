"""Field access shared by the EgoBench loaders: every problem becomes an
:class:`~input_pipeline.annotations.AnnotationError` of the form
``FILE: record 3: field 'answer_idx' must be ...``; a missing annotation file is a
``FileNotFoundError`` naming the loader argument to set."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from input_pipeline.annotations import AnnotationError, video_path
from input_pipeline.egobench.items import EvalItem

PathLike = str | os.PathLike
WORLD_VIDEO_DIR = "egobench/videos"  # where the demo world puts the EgoBench videos


def locate(index: int | str, key: str = "record") -> str:
    """How errors name a record: ``record 3`` (a position) or ``q_uid 'ab12'`` (an id)."""
    return f"{key} {index}" if isinstance(index, int) else f"{key} {index!r}"


def field_error(file: PathLike, where: str, field: str, problem: str) -> AnnotationError:
    """``FILE: WHERE: field 'FIELD' PROBLEM``."""
    return AnnotationError(f"{os.fspath(file)}: {where}: field {field!r} {problem}")


def annotation_file(root: Path, name: PathLike, argument: str) -> Path:
    """The loader argument ``argument`` = ``name`` (relative to ``root`` or absolute), which
    must be an existing file."""
    path = Path(name) if Path(name).is_absolute() else root / name
    if not path.is_file():
        raise FileNotFoundError(
            f"annotation file not found: {path} (pass the loader's {argument!r} argument, "
            "relative to the data root or absolute)"
        )
    return path


def read_json(path: Path) -> Any:
    """The parsed JSON file; invalid JSON is an :class:`AnnotationError` with its line."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from e


def read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a comma-separated file with a header holding the ``required`` columns."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in required if c not in header]
        if missing:
            raise AnnotationError(
                f"{path}: header has no column {missing[0]!r} (header: {', '.join(header)})"
            )
        return list(reader)


def get_field(rec: Mapping, key: str, file: Path, where: str, kind: type | tuple = str) -> Any:
    """``rec[key]``, checked to be of ``kind`` (bool is never accepted as a number)."""
    if not isinstance(rec, Mapping):
        raise AnnotationError(f"{file}: {where}: expected a JSON object, got {type(rec).__name__}")
    if key not in rec or rec[key] is None:
        raise field_error(file, where, key, "is missing")
    value = rec[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        names = "/".join(k.__name__ for k in kinds)
        raise field_error(file, where, key, f"must be {names}, got {value!r}")
    if isinstance(value, str) and not value.strip():
        raise field_error(file, where, key, "is empty")
    return value


def seconds(rec: Mapping, key: str, file: Path, where: str) -> float | None:
    """An optional time field in seconds (None when absent), finite and >= 0."""
    if rec.get(key) is None:
        return None
    value = get_field(rec, key, file, where, (int, float))
    if not np.isfinite(value) or value < 0:
        raise field_error(file, where, key, f"must be a finite time >= 0 s, got {value!r}")
    return float(value)


def window(
    start: float | None, end: float | None, file: Path, where: str, fields: str
) -> tuple[float | None, float | None]:
    """``(start, end)``, checked not to end before it starts."""
    if start is not None and end is not None and end < start:
        raise field_error(file, where, fields, f"ends before it starts ({start} > {end})")
    return start, end


def item_video(
    root: Path,
    rec: Mapping,
    file: Path,
    where: str,
    video_dir: str,
    video_pattern: str,
) -> Path:
    """The record's ``video`` field (world extension), else ``video_dir/video_pattern``."""
    if rec.get("video") is not None:
        return video_path(root, rec["video"], file=file, where=where, field="video")
    try:
        name = video_pattern.format(**rec)
    except KeyError as e:
        raise field_error(
            file, where, e.args[0], f"is missing (needed by video_pattern {video_pattern!r})"
        ) from None
    rel = os.path.join(video_dir, name)
    return video_path(root, rel, file=file, where=where, field="video_pattern")


def text_options(values: Any, file: Path, where: str, field: str) -> tuple[str, ...]:
    """A list of >= 2 non-empty strings, stripped."""
    if not isinstance(values, list) or len(values) < 2:
        raise field_error(file, where, field, f"must be a list of >= 2 strings, got {values!r}")
    for v in values:
        if not isinstance(v, str) or not v.strip():
            raise field_error(file, where, field, f"holds a non-string or empty option: {v!r}")
    return tuple(v.strip() for v in values)


def option_index(value: Any, n: int, file: Path, where: str, field: str) -> int:
    """An index into ``n`` options (an int, or a string of digits)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
        raise field_error(file, where, field, f"must be an option index in [0, {n}), got {value!r}")
    return value


def unique_ids(items: list[EvalItem], file: Path) -> list[EvalItem]:
    """``items``, or an error naming the first id that appears twice."""
    seen: set[str] = set()
    for it in items:
        if it.item_id in seen:
            raise AnnotationError(f"{file}: item id {it.item_id!r} appears twice")
        seen.add(it.item_id)
    return items


def record_list(data: Any, file: Path) -> list:
    """``data``, checked to be a JSON list (of records)."""
    if not isinstance(data, list):
        raise AnnotationError(f"{file}: expected a JSON list of records, got {type(data).__name__}")
    return data


def number(value: Any, file: Path, where: str, field: str) -> float:
    """A finite number, from a JSON number or a numeric string."""
    try:
        out = float(value)
    except ValueError:
        raise field_error(file, where, field, f"must be a number, got {value!r}") from None
    if not np.isfinite(out):
        raise field_error(file, where, field, f"must be finite, got {value!r}")
    return out
