"""EgoSchema (`egoschema/EgoSchema <https://github.com/egoschema/EgoSchema>`_): 5-way
multiple choice about whole, three-minute videos."""

from __future__ import annotations

from pathlib import Path

from input_pipeline.annotations import AnnotationError
from input_pipeline.egobench._fields import (
    WORLD_VIDEO_DIR,
    PathLike,
    annotation_file,
    get_field,
    item_video,
    locate,
    option_index,
    read_json,
    record_list,
    unique_ids,
)
from input_pipeline.egobench.items import EvalItem


def load_egoschema(
    root: PathLike,
    questions: PathLike = "egobench/egoschema/questions.json",
    answers: PathLike | None = "egobench/egoschema/subset_answers.json",
    *,
    video_dir: str = WORLD_VIDEO_DIR,
    video_pattern: str = "{q_uid}.mp4",
    answered_only: bool = True,
) -> list[EvalItem]:
    """EgoSchema ``questions.json`` (+ ``subset_answers.json``): 5-way MCQ on whole videos.

    Args:
      answers: ``{q_uid: index}``; None: no ground truth (every ``answer_index`` is None).
      answered_only: keep only questions that have an answer (the public 500-question
        subset); False keeps all, unanswered ones with ``answer_index=None``.
    """
    root = Path(root)
    qfile = annotation_file(root, questions, "questions")
    gold: dict[str, int] = {}
    if answers is not None:
        afile = annotation_file(root, answers, "answers")
        raw = read_json(afile)
        if not isinstance(raw, dict):
            raise AnnotationError(f"{afile}: expected {{q_uid: answer index}}, got a list")
        for quid, idx in raw.items():
            gold[quid] = option_index(idx, 5, afile, locate(quid, "q_uid"), quid)
    items = []
    for i, rec in enumerate(record_list(read_json(qfile), qfile)):
        where = locate(i)
        quid = get_field(rec, "q_uid", qfile, where)
        where = locate(quid, "q_uid")
        if answered_only and answers is not None and quid not in gold:
            continue
        opts = tuple(get_field(rec, f"option {k}", qfile, where).strip() for k in range(5))
        items.append(
            EvalItem(
                task="egoschema",
                item_id=quid,
                video=item_video(root, rec, qfile, where, video_dir, video_pattern),
                question=get_field(rec, "question", qfile, where).strip(),
                options=opts,
                answer_index=gold.get(quid),
            )
        )
    return unique_ids(items, qfile)
