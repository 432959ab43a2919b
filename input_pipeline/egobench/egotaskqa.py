"""EgoTaskQA (`sites.google.com/view/egotaskqa <https://sites.google.com/view/egotaskqa>`_)
as 4-way multiple choice, split ``direct`` / ``indirect``. No public multiple-choice file
exists: the layout is the world's own (``docs/egobench.md``)."""

from __future__ import annotations

from pathlib import Path

from input_pipeline.annotations import video_path
from input_pipeline.egobench._fields import (
    PathLike,
    annotation_file,
    field_error,
    get_field,
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


def load_egotaskqa(
    root: PathLike,
    file: PathLike = "egobench/egotaskqa/egotaskqa_test.json",
) -> list[EvalItem]:
    """EgoTaskQA as 4-way MCQ (own JSON, see docs): groups ``direct`` / ``indirect``."""
    root = Path(root)
    path = annotation_file(root, file, "file")
    items = []
    for i, rec in enumerate(record_list(read_json(path), path)):
        qid = str(get_field(rec, "id", path, locate(i), (str, int)))
        where = locate(qid, "id")
        kind = get_field(rec, "type", path, where)
        if kind not in ("direct", "indirect"):
            raise field_error(path, where, "type", f"must be 'direct' or 'indirect', got {kind!r}")
        opts = text_options(rec.get("options"), path, where, "options")
        if rec.get("answer_idx") is not None:
            idx = option_index(rec["answer_idx"], len(opts), path, where, "answer_idx")
        else:
            answer = get_field(rec, "answer", path, where).strip()
            if answer not in opts:
                raise field_error(path, where, "answer_idx", "is missing (answer not in options)")
            idx = opts.index(answer)
        start, end = window(
            seconds(rec, "start", path, where),
            seconds(rec, "end", path, where),
            path,
            where,
            "start/end",
        )
        items.append(
            EvalItem(
                task="egotaskqa",
                item_id=qid,
                video=video_path(
                    root,
                    get_field(rec, "video", path, where),
                    file=path,
                    where=where,
                    field="video",
                ),
                start=start,
                end=end,
                question=get_field(rec, "question", path, where).strip(),
                options=opts,
                answer_index=idx,
                answer_text=opts[idx],
                group=kind,
                meta={"category": rec.get("category")},
            )
        )
    return unique_ids(items, path)
