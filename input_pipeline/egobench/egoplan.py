"""EgoPlan-Bench validation (`ChenYi99/EgoPlan <https://github.com/ChenYi99/EgoPlan>`_):
4-way next-step multiple choice on the video of the task's progress so far."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from input_pipeline.egobench._fields import (
    WORLD_VIDEO_DIR,
    PathLike,
    annotation_file,
    field_error,
    get_field,
    item_video,
    locate,
    read_json,
    record_list,
    seconds,
    unique_ids,
    window,
)
from input_pipeline.egobench.items import EvalItem

EGOPLAN_FPS = {"Ego4D": 30.0, "EpicKitchens": 60.0, "synthetic": 8.0}


def load_egoplan(
    root: PathLike,
    file: PathLike = "egobench/egoplan/EgoPlan_validation.json",
    *,
    video_dir: str = WORLD_VIDEO_DIR,
    video_pattern: str = "{video_id}.mp4",
    fps: float | Mapping[str, float] = EGOPLAN_FPS,
) -> list[EvalItem]:
    """EgoPlan-Bench validation: 4-way next-step MCQ on the task-progress video.

    The window is ``start``/``end`` seconds when given (world extension), else frames:
    ``task_start_frame`` (or the first progress step's ``start_frame``, or 0) to
    ``current_observation_frame``, divided by ``fps`` (per ``video_source`` when a mapping).
    """
    root = Path(root)
    path = annotation_file(root, file, "file")
    items = []
    for i, rec in enumerate(record_list(read_json(path), path)):
        sid = str(get_field(rec, "sample_id", path, locate(i), (str, int)))
        where = locate(sid, "sample_id")
        opts = tuple(get_field(rec, f"choice_{c}", path, where).strip() for c in "abcd")
        letter = get_field(rec, "golden_choice_idx", path, where).strip().upper()
        if letter not in "ABCD" or len(letter) != 1:
            raise field_error(path, where, "golden_choice_idx", f"must be A-D, got {letter!r}")
        idx = "ABCD".index(letter)
        answer = rec.get("answer")
        if isinstance(answer, str) and answer.strip() != opts[idx]:
            raise field_error(
                path, where, "answer", f"{answer!r} is not choice {letter} {opts[idx]!r}"
            )
        start, end = seconds(rec, "start", path, where), seconds(rec, "end", path, where)
        if start is None or end is None:
            start, end = _egoplan_window(rec, path, where, fps)
        window(start, end, path, where, "start/end")
        items.append(
            EvalItem(
                task="egoplan",
                item_id=sid,
                video=item_video(root, rec, path, where, video_dir, video_pattern),
                start=start,
                end=end,
                question=get_field(rec, "question", path, where).strip(),
                options=opts,
                answer_index=idx,
                answer_text=opts[idx],
                meta={"task_goal": rec.get("task_goal"), "video_source": rec.get("video_source")},
            )
        )
    return unique_ids(items, path)


def _egoplan_window(
    rec: Mapping, path: Path, where: str, fps: float | Mapping[str, float]
) -> tuple[float, float]:
    """The window in seconds from the record's frame numbers (no future frame)."""
    if isinstance(fps, Mapping):
        source = get_field(rec, "video_source", path, where)
        if source not in fps:
            raise field_error(
                path, where, "video_source", f"{source!r} has no frame rate; pass fps={{...}}"
            )
        rate = float(fps[source])
    else:
        rate = float(fps)
    end = get_field(rec, "current_observation_frame", path, where, int)
    first = rec.get("task_start_frame")
    if first is None:
        progress = rec.get("task_progress_metadata") or []
        first = progress[0].get("start_frame", 0) if progress else 0
    if isinstance(first, bool) or not isinstance(first, int) or first < 0:
        raise field_error(path, where, "task_start_frame", f"must be a frame index, got {first!r}")
    return first / rate, end / rate
