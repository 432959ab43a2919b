"""VLN-QA: MVBench's "Egocentric Navigation" task (`OpenGVLab/MVBench
<https://huggingface.co/datasets/OpenGVLab/MVBench>`_, ``json/egocentric_navigation.json``):
multiple choice about how the camera wearer moves."""

from __future__ import annotations

import os
from pathlib import Path

from input_pipeline.annotations import video_path
from input_pipeline.egobench._fields import (
    PathLike,
    annotation_file,
    field_error,
    get_field,
    locate,
    read_json,
    record_list,
    seconds,
    text_options,
    window,
)
from input_pipeline.egobench.items import EvalItem


def load_vlnqa(
    root: PathLike,
    file: PathLike = "egobench/vlnqa/vlnqa.json",
    *,
    video_dir: str = "",
) -> list[EvalItem]:
    """VLN-QA in MVBench's task JSON (``egocentric_navigation.json``): MCQ over candidates.

    ``video`` is relative to ``video_dir`` (MVBench: the ``vlnqa/`` video folder; the world
    writes root-relative paths, so the default is the root). Items have no id in the file;
    the record index (``"00000"``, ...) is used.
    """
    root = Path(root)
    path = annotation_file(root, file, "file")
    items = []
    for i, rec in enumerate(record_list(read_json(path), path)):
        where = locate(i)
        opts = text_options(rec.get("candidates"), path, where, "candidates")
        answer = get_field(rec, "answer", path, where).strip()
        if answer not in opts:
            raise field_error(path, where, "answer", f"{answer!r} is not one of the candidates")
        rel = os.path.join(video_dir, get_field(rec, "video", path, where))
        start, end = window(
            seconds(rec, "start", path, where),
            seconds(rec, "end", path, where),
            path,
            where,
            "start/end",
        )
        items.append(
            EvalItem(
                task="vlnqa",
                item_id=f"{i:05d}",
                video=video_path(root, rel, file=path, where=where, field="video"),
                start=start,
                end=end,
                question=get_field(rec, "question", path, where).strip(),
                options=opts,
                answer_index=opts.index(answer),
                answer_text=answer,
            )
        )
    return items
