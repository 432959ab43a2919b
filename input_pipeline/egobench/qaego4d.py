"""QAEgo4D (`lbaermann/qaego4d <https://github.com/lbaermann/qaego4d>`_; close-ended:
GroundVQA's ``annotations.QaEgo4D_test_close.json``): questions about what the camera wearer
did, open-ended or as 4-way multiple choice."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from input_pipeline.egobench._fields import (
    WORLD_VIDEO_DIR,
    PathLike,
    annotation_file,
    field_error,
    get_field,
    item_video,
    locate,
    option_index,
    read_json,
    record_list,
    seconds,
    text_options,
    unique_ids,
    window,
)
from input_pipeline.egobench.items import EvalItem

QAEGO4D_FPS = 30.0  # QaEgo4D's moment_*_frame fields count canonical Ego4D frames (30 fps)


def _moment(rec: Mapping, file: Path, where: str) -> tuple[float, float] | None:
    """Evidence window in seconds: ``moment_*_sec`` (world) or ``moment_*_frame`` / 30."""
    for suffix, scale in (("sec", 1.0), ("frame", 1.0 / QAEGO4D_FPS)):
        a, b = f"moment_start_{suffix}", f"moment_end_{suffix}"
        s, e = seconds(rec, a, file, where), seconds(rec, b, file, where)
        if s is not None and e is not None:
            window(s, e, file, where, f"{a}/{b}")
            return s * scale, e * scale
    return None


def _stable_permutation(key: str, n: int) -> list[int]:
    """A permutation of ``range(n)`` fixed by ``key`` (same on every machine and run)."""
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).permutation(n).tolist()


def load_qaego4d(
    root: PathLike,
    file: PathLike | None = None,
    *,
    mode: str = "close",
    video_dir: str = WORLD_VIDEO_DIR,
    video_pattern: str = "{video_id}.mp4",
    use_moment: bool = False,
) -> list[EvalItem]:
    """QAEgo4D: open-ended (``answer``) or close-ended (4-way MCQ) questions on whole clips.

    Close-ended records give either ``options`` + ``answer_idx`` (the world) or
    ``wrong_answers`` (3 distractors, GroundVQA's ``annotations.QaEgo4D_test_close.json``);
    the latter are shuffled with a permutation fixed by ``sample_id``, so every run asks the
    same question. The evidence moment is kept in ``meta['moment']``; ``use_moment`` makes
    it the clip window instead of the whole video (the task asks about the whole video).

    Args:
      file: default ``egobench/qaego4d/qaego4d_test_{mode}.json``.
      mode: ``close`` or ``open``.
    """
    if mode not in ("close", "open"):
        raise ValueError(f"mode must be 'close' or 'open', got {mode!r}")
    root = Path(root)
    path = annotation_file(root, file or f"egobench/qaego4d/qaego4d_test_{mode}.json", "file")
    items = []
    for i, rec in enumerate(record_list(read_json(path), path)):
        sid = str(get_field(rec, "sample_id", path, locate(i), (str, int)))
        where = locate(sid, "sample_id")
        answer = get_field(rec, "answer", path, where).strip()
        moment = _moment(rec, path, where)
        start, end = moment if (use_moment and moment) else (None, None)
        opts: tuple[str, ...] = ()
        idx = None
        if mode == "close":
            if rec.get("options") is not None:
                opts = text_options(rec["options"], path, where, "options")
                if rec.get("answer_idx") is not None:
                    idx = option_index(rec["answer_idx"], len(opts), path, where, "answer_idx")
                elif answer in opts:
                    idx = opts.index(answer)
                else:
                    raise field_error(
                        path, where, "answer_idx", "is missing (answer not in options)"
                    )
            elif rec.get("wrong_answers") is not None:
                wrong = text_options(rec["wrong_answers"] + [answer], path, where, "wrong_answers")
                pool = (answer, *wrong[:-1])
                order = _stable_permutation(sid, len(pool))
                opts = tuple(pool[j] for j in order)
                idx = order.index(0)
            else:
                raise field_error(path, where, "options", "is missing (or give 'wrong_answers')")
        items.append(
            EvalItem(
                task=f"qaego4d_{mode}",
                item_id=sid,
                video=item_video(root, rec, path, where, video_dir, video_pattern),
                start=start,
                end=end,
                question=get_field(rec, "question", path, where).strip(),
                options=opts,
                answer_index=idx,
                answer_text=answer,
                meta={"moment": moment, "video_id": rec.get("video_id")},
            )
        )
    return unique_ids(items, path)
