"""EPIC-KITCHENS-100 multi-instance retrieval (`epic-kitchens-100-annotations/
retrieval_annotations <https://github.com/epic-kitchens/epic-kitchens-100-annotations>`_):
clips, sentences and their relevancy matrix (never read from a pickle)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np

from input_pipeline.annotations import AnnotationError
from input_pipeline.egobench._fields import (
    WORLD_VIDEO_DIR,
    PathLike,
    annotation_file,
    field_error,
    item_video,
    read_csv,
    unique_ids,
    window,
)
from input_pipeline.egobench.items import EvalItem, RetrievalBenchmark

PKL_TO_NPY = (
    "python -c \"import pickle, numpy as np; np.save('caption_relevancy_EPIC_100_retrieval_"
    "test.npy', np.asarray(pickle.load(open('caption_relevancy_EPIC_100_retrieval_test.pkl', "
    "'rb')), np.float32))\""
)


def _hms(text: str, file: Path, where: str, field: str) -> float:
    """EPIC's ``HH:MM:SS.ff`` timestamp in seconds."""
    m = re.fullmatch(r"(\d+):(\d{1,2}):(\d{1,2}(?:\.\d+)?)", text.strip())
    if not m:
        raise field_error(file, where, field, f"must be HH:MM:SS.ff, got {text!r}")
    return int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))


def load_relevancy(path: PathLike) -> np.ndarray:
    """EPIC's caption relevancy matrix from ``.npy`` / ``.npz``; pickles are refused."""
    path = Path(path)
    if path.suffix == ".pkl":
        raise AnnotationError(
            f"{path}: pickles are never loaded (they can run code). Convert it once, offline, "
            f"in a trusted environment:\n  {PKL_TO_NPY}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"relevancy matrix not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise AnnotationError(f"{path}: not a plain numpy array file ({e})") from e
    if isinstance(data, np.lib.npyio.NpzFile):
        with data:
            keys = list(data.keys())
            key = "relevancy" if "relevancy" in keys else keys[0] if len(keys) == 1 else None
            if key is None:
                raise AnnotationError(f"{path}: has arrays {keys}; name the matrix 'relevancy'")
            data = data[key]
    rel = np.asarray(data, np.float32)
    if rel.ndim != 2 or not np.all(np.isfinite(rel)) or rel.min() < 0 or rel.max() > 1:
        raise AnnotationError(f"{path}: expected a finite [clips, sentences] matrix in [0, 1]")
    return rel


def load_epic_mir(
    root: PathLike,
    clips: PathLike = "egobench/epic_mir/EPIC_100_retrieval_test.csv",
    sentences: PathLike = "egobench/epic_mir/EPIC_100_retrieval_test_sentence.csv",
    relevancy: PathLike = "egobench/epic_mir/caption_relevancy_EPIC_100_retrieval_test.npy",
    *,
    video_dir: str = WORLD_VIDEO_DIR,
    video_pattern: str = "{video_id}.mp4",
) -> RetrievalBenchmark:
    """EPIC-KITCHENS-100 MIR test split: clip CSV, sentence CSV and relevancy matrix.

    Real EPIC videos: ``video_dir='EPIC-KITCHENS'``, ``video_pattern=
    '{participant_id}/videos/{video_id}.MP4'``.
    """
    root = Path(root)
    cpath = annotation_file(root, clips, "clips")
    required = ("narration_id", "video_id", "start_timestamp", "stop_timestamp", "narration")
    items = []
    for i, rec in enumerate(read_csv(cpath, required), start=2):
        where = f"line {i} (narration_id {rec['narration_id']!r})"
        for key in required:
            if not (rec.get(key) or "").strip():
                raise field_error(cpath, where, key, "is empty")
        start = _hms(rec["start_timestamp"], cpath, where, "start_timestamp")
        end = _hms(rec["stop_timestamp"], cpath, where, "stop_timestamp")
        window(start, end, cpath, where, "start_timestamp/stop_timestamp")
        items.append(
            EvalItem(
                task="epic_mir",
                item_id=rec["narration_id"],
                video=item_video(root, rec, cpath, where, video_dir, video_pattern),
                start=start,
                end=end,
                question=rec["narration"].strip(),
                answer_text=rec["narration"].strip(),
                meta={"verb_class": rec.get("verb_class"), "noun_class": rec.get("noun_class")},
            )
        )
    unique_ids(items, cpath)
    spath = annotation_file(root, sentences, "sentences")
    with open(spath, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or len(rows[0]) != 2:
        raise AnnotationError(f"{spath}: expected a 2-column header such as 'index,sentence'")
    ids, texts = [], []
    for n, row in enumerate(rows[1:], start=2):
        if len(row) != 2 or not row[1].strip():
            raise field_error(spath, f"line {n}", rows[0][1], f"missing or empty in row {row!r}")
        ids.append(row[0].strip())
        texts.append(row[1].strip())
    rel = load_relevancy(annotation_file(root, relevancy, "relevancy"))
    if rel.shape != (len(items), len(texts)):
        raise AnnotationError(
            f"{relevancy}: relevancy shape {rel.shape} does not match {len(items)} clips in "
            f"{cpath.name} x {len(texts)} sentences in {spath.name}"
        )
    return RetrievalBenchmark(tuple(items), tuple(ids), tuple(texts), rel)
