"""EgoMCQ (`showlab/EgoVLP <https://github.com/showlab/EgoVLP>`_, ``egomcq.json``): pick
the clip of a narration among five clips, inter- or intra-video."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from input_pipeline.annotations import AnnotationError, video_path
from input_pipeline.egobench._fields import (
    WORLD_VIDEO_DIR,
    PathLike,
    annotation_file,
    field_error,
    get_field,
    locate,
    number,
    option_index,
    read_json,
    unique_ids,
    window,
)
from input_pipeline.egobench.items import Clip, EvalItem

EGOMCQ_CHUNK_SEC = 600.0  # EgoVLP stores Ego4D videos as 600 s chunks


def clean_narration(text: str) -> str:
    """EgoClip narration without its ``#C`` / ``#O`` / ``#Unsure`` markers."""
    text = re.sub(r"#\s*(?:C|O|unsure|Unsure)\b\s*", "", text)
    return re.sub(r"\s+", " ", text).strip()


def _egomcq_clip(
    root: Path, row: Any, path: Path, where: str, video_dir: str, chunked: bool
) -> tuple[Clip, str, str]:
    """An EgoClip row as (its clip, its video uid, its narration without markers)."""
    uid = get_field(row, "video_uid", path, where)
    text = clean_narration(get_field(row, "clip_text", path, where))
    start = number(
        get_field(row, "clip_start", path, where, (int, float, str)), path, where, "clip_start"
    )
    end = number(
        get_field(row, "clip_end", path, where, (int, float, str)), path, where, "clip_end"
    )
    start, end = window(max(start, 0.0), max(end, 0.0), path, where, "clip_start/clip_end")
    if chunked:  # EgoVLP: <video_uid>/<chunk>.mp4, times relative to the chunk's start
        chunk = int(start // EGOMCQ_CHUNK_SEC)
        offset = chunk * EGOMCQ_CHUNK_SEC
        rel = os.path.join(video_dir, uid, f"{chunk}.mp4")
        start, end = start - offset, min(end - offset, EGOMCQ_CHUNK_SEC)
    else:
        rel = os.path.join(video_dir, f"{uid}.mp4")
    clip = Clip(video_path(root, rel, file=path, where=where, field="video_uid"), start, end)
    return clip, uid, text


def load_egomcq(
    root: PathLike,
    file: PathLike = "egobench/egomcq/egomcq.json",
    *,
    video_dir: str = WORLD_VIDEO_DIR,
    chunked: bool = False,
) -> list[EvalItem]:
    """EgoMCQ (EgoVLP's ``egomcq.json``): pick the clip of a narration among 5 clips.

    The group is read off the clips: ``intra`` when all five choices come from the query's
    video, ``inter`` otherwise. (EgoVLP's loader comments ``types`` 1 = inter, 2 = intra,
    while its metric code names sorted types ("Intra-video", "Inter-video"); deriving the
    group from the data avoids that ambiguity. The raw code stays in ``meta['types']``.)

    Args:
      chunked: videos stored as EgoVLP's 600 s chunks ``video_dir/<uid>/<k>.mp4`` instead of
        one file ``video_dir/<uid>.mp4`` per video.
    """
    root = Path(root)
    path = annotation_file(root, file, "file")
    data = read_json(path)
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: expected {{'0': {{query, choices, answer, types}}}}")
    items = []
    for key, rec in data.items():
        where = locate(key, "item")
        query = get_field(rec, "query", path, where, dict)
        _, quid, qtext = _egomcq_clip(root, query, path, f"{where} query", video_dir, chunked)
        choices = get_field(rec, "choices", path, where, dict)
        if len(choices) < 2:
            raise field_error(path, where, "choices", f"must hold >= 2 clips, got {len(choices)}")
        clips, uids, texts = [], [], []
        for k in sorted(choices, key=lambda c: int(c) if str(c).isdigit() else c):
            clip, uid, text = _egomcq_clip(
                root, choices[k], path, f"{where} choice {k}", video_dir, chunked
            )
            clips.append(clip)
            uids.append(uid)
            texts.append(text)
        idx = option_index(rec.get("answer"), len(clips), path, where, "answer")
        items.append(
            EvalItem(
                task="egomcq",
                item_id=str(key),
                video=None,
                question=qtext,
                options=tuple(texts),
                answer_index=idx,
                group="intra" if all(u == quid for u in uids) else "inter",
                option_clips=tuple(clips),
                meta={"types": rec.get("types"), "video_uid": quid},
            )
        )
    return unique_ids(items, path)
