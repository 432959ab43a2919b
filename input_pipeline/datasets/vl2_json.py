"""Reading VideoLLaMA2 conversation JSON (``exo_captions.json``, ``egoit_instructions.json``).

A file is a list of ``{"id", "video", ["start", "end"], "conversations": [{"from", "value"}]}``
(VideoLLaMA2's ``LazySupervisedDataset`` format plus an optional clip window).
"""

from __future__ import annotations

import math
from pathlib import Path

from input_pipeline.annotations import AnnotationError, resolve_in_root
from input_pipeline.datasets.common import field, opt_time, read_json

__all__ = ["read_conversation_file"]

ROLES = ("human", "gpt")


def read_conversation_file(root: Path, rel: str) -> list[dict]:
    """Validated records: ``id, video (relative, checked), start, end (NaN = video bound),
    conversations ([{"from", "value"}], alternating human/gpt), raw (the JSON record)``."""
    data = read_json(root, rel)
    if not isinstance(data, list):
        raise AnnotationError(f"{rel}: expected a JSON list of records")
    out, seen = [], set()
    for i, rec in enumerate(data):
        w = f"record {i}"
        sid = str(field(rec, "id", file=rel, where=w, default=f"{Path(rel).stem}_{i:06d}"))
        w = f"record {i} (id {sid!r})"
        if sid in seen:
            raise AnnotationError(f"{rel}: {w} repeats an id; ids must be unique")
        seen.add(sid)
        video = resolve_in_root(
            root, field(rec, "video", file=rel, where=w), file=rel, where=w, field="video"
        )
        start = opt_time(rec, "start", file=rel, where=w)
        end = opt_time(rec, "end", file=rel, where=w)
        if math.isnan(start) != math.isnan(end):
            raise AnnotationError(f"{rel}: {w} has only one of 'start' / 'end'; give both")
        convs = field(rec, "conversations", file=rel, where=w, types=list)
        if not convs or len(convs) % 2:
            raise AnnotationError(
                f"{rel}: {w} field 'conversations' must hold human/gpt pairs, "
                f"got {len(convs)} messages"
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
            messages.append(
                {"from": role, "value": field(m, "value", file=rel, where=wm, types=str)}
            )
        out.append(
            {
                "id": sid,
                "video": video,
                "start": start,
                "end": end,
                "conversations": messages,
                "raw": rec,
            }
        )
    return out
