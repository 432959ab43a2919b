"""Reading VideoLLaMA2 conversation JSON (``exo_captions.json``, ``egoit_instructions.json``).

A file is a list of ``{"id", "video", ["start", "end"], "conversations": [{"from", "value"}]}``
(VideoLLaMA2's ``LazySupervisedDataset`` format plus an optional clip window). A malformed
record is skipped and counted in the build report, not fatal.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from input_pipeline.annotations import AnnotationError, resolve_in_root
from input_pipeline.datasets.common import field, opt_time, read_json
from input_pipeline.datasets.report import BuildReport

__all__ = ["read_conversation_file"]

ROLES = ("human", "gpt")


def read_conversation_file(root: Path, rel: str, report: BuildReport) -> Iterator[dict]:
    """Validated records: ``id, video (relative, checked), start, end (NaN = video bound),
    conversations ([{"from", "value"}], alternating human/gpt), raw (the JSON record)``.

    The file is read (and must be a JSON list) when this is called; the records are then
    yielded one by one, each malformed one counted in ``report`` instead."""
    data = read_json(root, rel)
    if not isinstance(data, list):
        raise AnnotationError(f"{rel}: expected a JSON list of records")
    return _records(root, rel, data, report)


def _records(root: Path, rel: str, data: list, report: BuildReport) -> Iterator[dict]:
    for i, rec in enumerate(data):
        report.add_read()
        w = f"record {i}"
        try:
            sid = str(field(rec, "id", file=rel, where=w, default=f"{Path(rel).stem}_{i:06d}"))
            w = f"record {i} (id {sid!r})"
            video = field(rec, "video", file=rel, where=w)
        except AnnotationError as e:
            report.skip("malformed record", str(e))
            continue
        try:
            video = resolve_in_root(root, video, file=rel, where=w, field="video")
        except AnnotationError as e:
            report.skip("video path outside the data root", str(e))
            continue
        try:
            yield _record(rec, sid, video, rel, w)
        except AnnotationError as e:
            report.skip("malformed record", str(e))


def _record(rec: Any, sid: str, video: str, rel: str, w: str) -> dict:
    start = opt_time(rec, "start", file=rel, where=w)
    end = opt_time(rec, "end", file=rel, where=w)
    if math.isnan(start) != math.isnan(end):
        raise AnnotationError(f"{rel}: {w} has only one of 'start' / 'end'; give both")
    convs = field(rec, "conversations", file=rel, where=w, types=list)
    if not convs or len(convs) % 2:
        raise AnnotationError(
            f"{rel}: {w} field 'conversations' must hold human/gpt pairs, got {len(convs)} messages"
        )
    messages = []
    for j, m in enumerate(convs):
        wm = f"{w}.conversations[{j}]"
        role = field(m, "from", file=rel, where=wm, types=str)
        if role != ROLES[j % 2]:
            raise AnnotationError(
                f"{rel}: {wm} is from {role!r}, expected {ROLES[j % 2]!r} "
                "(messages alternate human/gpt)"
            )
        messages.append({"from": role, "value": field(m, "value", file=rel, where=wm, types=str)})
    return {
        "id": sid,
        "video": video,
        "start": start,
        "end": end,
        "conversations": messages,
        "raw": rec,
    }
