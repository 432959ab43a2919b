"""Charades-Ego (`prior.allenai.org/projects/charades-ego
<https://prior.allenai.org/projects/charades-ego>`_): multi-label action classification of
first-person videos over the Charades classes."""

from __future__ import annotations

import re
from pathlib import Path

from input_pipeline.annotations import AnnotationError
from input_pipeline.egobench._fields import (
    WORLD_VIDEO_DIR,
    PathLike,
    annotation_file,
    field_error,
    item_video,
    number,
    read_csv,
    unique_ids,
)
from input_pipeline.egobench.items import EvalItem

_CLASS_RE = re.compile(r"^c(\d{3})\s+(\S.*)$")


def load_charades_classes(path: PathLike) -> tuple[str, ...]:
    """``Charades_v1_classes.txt``: lines ``c000 Holding some clothes``, ids contiguous."""
    path = Path(path)
    names = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        m = _CLASS_RE.match(line.strip())
        if not m:
            raise AnnotationError(f"{path}: line {n}: expected 'cNNN class name', got {line!r}")
        if int(m.group(1)) != len(names):
            raise AnnotationError(
                f"{path}: line {n}: class id c{m.group(1)} out of order (expected "
                f"c{len(names):03d})"
            )
        names.append(m.group(2).strip())
    if not names:
        raise AnnotationError(f"{path}: no classes")
    return tuple(names)


def load_charades_ego(
    root: PathLike,
    file: PathLike = "egobench/charades_ego/CharadesEgo_v1_test_only1st.csv",
    classes: PathLike = "egobench/charades_ego/Charades_v1_classes.txt",
    *,
    video_dir: str = WORLD_VIDEO_DIR,
    video_pattern: str = "{id}.mp4",
) -> list[EvalItem]:
    """Charades-Ego first-person test videos: multi-label classification over the classes.

    Each item's ``options`` are the class names and ``labels`` the classes of its
    ``actions`` intervals (``meta['actions']`` keeps ``(class, start, end)``).
    """
    root = Path(root)
    path = annotation_file(root, file, "file")
    names = load_charades_classes(annotation_file(root, classes, "classes"))
    items = []
    for i, rec in enumerate(read_csv(path, ("id", "actions")), start=2):  # line numbers
        where = f"line {i} (id {rec['id']!r})"
        if not rec["id"].strip():
            raise field_error(path, f"line {i}", "id", "is empty")
        actions = []
        for part in filter(None, (p.strip() for p in rec["actions"].split(";"))):
            fields = part.split()
            if len(fields) != 3 or not re.fullmatch(r"c\d{3}", fields[0]):
                raise field_error(path, where, "actions", f"has a malformed entry {part!r}")
            cls = int(fields[0][1:])
            if cls >= len(names):
                raise field_error(path, where, "actions", f"names unknown class {fields[0]}")
            t0 = number(fields[1], path, where, "actions")
            t1 = number(fields[2], path, where, "actions")
            actions.append((cls, t0, t1))
        rec = {k: v for k, v in rec.items() if v not in (None, "")}
        items.append(
            EvalItem(
                task="charades_ego",
                item_id=rec["id"],
                video=item_video(root, rec, path, where, video_dir, video_pattern),
                question="",
                options=names,
                labels=tuple(sorted({a[0] for a in actions})),
                meta={"actions": actions},
            )
        )
    return unique_ids(items, path)
