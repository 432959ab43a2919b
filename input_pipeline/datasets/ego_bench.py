"""``ego_bench``: the eight EgoBench task files, one record per item, one split per task.

Every task is brought to one schema so a single evaluation pipeline serves all of them:

* ``task`` (= the split name), ``item_id``, ``subtype`` (EgoTaskQA ``direct``/``indirect``,
  EgoMCQ ``inter``/``intra``, else ``""``);
* ``videos`` / ``starts`` / ``ends``: the item's clips (relative paths; NaN = video bound).
  One clip, except EgoMCQ (its 5 candidate clips);
* ``question``: what is asked (a generic "what is the camera wearer doing" for Charades-Ego,
  EPIC-MIR and EgoMCQ, whose candidates are texts / clips rather than answers);
* ``options``: candidate answers (MCQ options, VLN candidates, Charades class names; empty
  for EPIC-MIR, whose candidate sentences are in the dataset metadata, and EgoMCQ);
* ``answer_indices``: correct option(s) (Charades: all classes of the video; EgoMCQ: the
  correct clip; EPIC-MIR: the clip's own sentence); ``answer``: the answer text (EgoMCQ and
  EPIC-MIR: the query narration);
* ``relevancy``: EPIC-MIR's relevancy row over the sentences (``float32[S]``, else empty);
* ``extra``: JSON with the task-specific rest (Charades intervals, EgoPlan progress, ...).

Item counts equal ``world.json``'s ``counts.egobench`` (``charades_ego_videos`` and
``epic_mir_clips`` for those two).
"""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from input_pipeline.datasets.common import (
    AnnotationError,
    WorldBuilder,
    field,
    number,
    opt_time,
    read_csv,
    read_json,
    resolve_in_root,
    times_feature,
)
from input_pipeline.datasets.ego_clip import clean_narration

__all__ = ["TASKS", "EgoBench", "DESCRIBE_QUESTION"]

TASKS = (
    "egoschema",
    "qaego4d",
    "egotaskqa",
    "charades_ego",
    "epic_mir",
    "egoplan",
    "vlnqa",
    "egomcq",
)
DESCRIBE_QUESTION = "What is the camera wearer doing in this video?"
BENCH_VIDEO_RULE = "egobench/videos/{}.mp4"  # EPIC-MIR video_id / EgoMCQ video_uid


def _item(task, item_id, clips, question, options=(), answers=(), answer="", **kw) -> dict:
    return {
        "task": task,
        "item_id": str(item_id),
        "subtype": kw.pop("subtype", ""),
        "videos": [c[0] for c in clips],
        "starts": np.asarray([c[1] for c in clips], np.float64),
        "ends": np.asarray([c[2] for c in clips], np.float64),
        "question": question,
        "options": [str(o) for o in options],
        "answer_indices": [int(a) for a in answers],
        "answer": str(answer),
        "relevancy": np.asarray(kw.pop("relevancy", ()), np.float32),
        "extra": json.dumps(kw.pop("extra", {}), sort_keys=True),
    }


def _video(root, rec, rel, where, name="video"):
    return resolve_in_root(
        root, field(rec, name, file=rel, where=where), file=rel, field_name=f"{where}.{name}"
    )


def _list(rec, name, rel, where) -> list:
    return field(rec, name, file=rel, where=where, types=list)


def _index(rec, name, rel, where, n: int) -> int:
    i = field(rec, name, file=rel, where=where, types=int)
    if not 0 <= i < n:
        raise AnnotationError(f"{rel}: {where} field {name!r} = {i} is not in [0, {n})")
    return i


# ----------------------------------------------------------------------------- tasks


def _egoschema(root: Path) -> list[dict]:
    rel, ans_rel = "egobench/egoschema/questions.json", "egobench/egoschema/subset_answers.json"
    answers = read_json(root, ans_rel)
    out = []
    for i, q in enumerate(read_json(root, rel)):
        w = f"question {i}"
        uid = field(q, "q_uid", file=rel, where=w, types=str)
        opts = [field(q, f"option {k}", file=rel, where=w, types=str) for k in range(5)]
        a = answers.get(uid)
        video = (
            _video(root, q, rel, w)
            if "video" in q
            else resolve_in_root(
                root, f"egobench/egoschema/videos/{uid}.mp4", file=rel, field_name=f"{w}.q_uid"
            )
        )
        out.append(
            _item(
                "egoschema",
                uid,
                [(video, math.nan, math.nan)],
                field(q, "question", file=rel, where=w, types=str),
                opts,
                [] if a is None else [a],
                "" if a is None else opts[a],
            )
        )
    return out


def _qaego4d(root: Path) -> list[dict]:
    rel, open_rel = (
        "egobench/qaego4d/qaego4d_test_close.json",
        "egobench/qaego4d/qaego4d_test_open.json",
    )
    open_ids = [
        field(r, "sample_id", file=open_rel, where=f"record {i}")
        for i, r in enumerate(read_json(root, open_rel))
    ]
    out = []
    for i, r in enumerate(read_json(root, rel)):
        w = f"record {i}"
        opts = _list(r, "options", rel, w)
        extra = {k: r[k] for k in ("video_id", "moment_start_sec", "moment_end_sec") if k in r}
        out.append(
            _item(
                "qaego4d",
                field(r, "sample_id", file=rel, where=w),
                [(_video(root, r, rel, w), math.nan, math.nan)],
                field(r, "question", file=rel, where=w, types=str),
                opts,
                [_index(r, "answer_idx", rel, w, len(opts))],
                field(r, "answer", file=rel, where=w, types=str),
                extra=extra,
            )
        )
    if sorted(open_ids) != sorted(o["item_id"] for o in out):
        raise AnnotationError(
            f"{open_rel}: its sample_ids differ from {rel}'s (the open- and close-ended files "
            "must hold the same questions)"
        )
    return out


def _egotaskqa(root: Path) -> list[dict]:
    rel = "egobench/egotaskqa/egotaskqa_test.json"
    out = []
    for i, r in enumerate(read_json(root, rel)):
        w = f"record {i}"
        opts = _list(r, "options", rel, w)
        out.append(
            _item(
                "egotaskqa",
                field(r, "id", file=rel, where=w),
                [
                    (
                        _video(root, r, rel, w),
                        opt_time(r, "start", file=rel, where=w),
                        opt_time(r, "end", file=rel, where=w),
                    )
                ],
                field(r, "question", file=rel, where=w, types=str),
                opts,
                [_index(r, "answer_idx", rel, w, len(opts))],
                field(r, "answer", file=rel, where=w, default=""),
                subtype=field(r, "type", file=rel, where=w, types=str),
                extra={"category": r.get("category")},
            )
        )
    return out


_CHARADES_ACTION = re.compile(r"^c(\d+) ([\d.]+) ([\d.]+)$")


def _charades(root: Path) -> list[dict]:
    rel = "egobench/charades_ego/CharadesEgo_v1_test_only1st.csv"
    cls_rel = "egobench/charades_ego/Charades_v1_classes.txt"
    if not (root / cls_rel).is_file():
        raise AnnotationError(f"{cls_rel}: annotation file not found under the data root {root}")
    classes = []
    for n, line in enumerate((root / cls_rel).read_text().splitlines()):
        if line.strip():
            code, _, name = line.strip().partition(" ")
            if code != f"c{len(classes):03d}" or not name:
                raise AnnotationError(f"{cls_rel}: line {n + 1} must be 'c{len(classes):03d} name'")
            classes.append(name)
    out = []
    for i, r in enumerate(read_csv(root, rel, required=("id", "actions"))):
        w = f"row {i + 2}"
        vid = field(r, "id", file=rel, where=w, types=str)
        video = (
            _video(root, r, rel, w)
            if r.get("video")
            else resolve_in_root(
                root, f"egobench/charades_ego/videos/{vid}.mp4", file=rel, field_name=f"{w}.id"
            )
        )
        intervals = []
        for a in filter(None, (s.strip() for s in r["actions"].split(";"))):
            m = _CHARADES_ACTION.match(a)
            if not m or int(m.group(1)) >= len(classes):
                raise AnnotationError(
                    f"{rel}: {w} field 'actions' has {a!r}; expected 'cNNN start end' with a "
                    f"class of {cls_rel}"
                )
            intervals.append([int(m.group(1)), float(m.group(2)), float(m.group(3))])
        labels = sorted({c for c, _, _ in intervals})
        out.append(
            _item(
                "charades_ego",
                vid,
                [(video, math.nan, math.nan)],
                DESCRIBE_QUESTION,
                classes,
                labels,
                "; ".join(classes[c] for c in labels),
                extra={"intervals": intervals},
            )
        )
    return out


def _hms(value: str, rel: str, where: str) -> float:
    try:
        h, m, s = value.split(":")
        return int(h) * 3600 + int(m) * 60 + float(s)
    except (AttributeError, ValueError):
        raise AnnotationError(f"{rel}: {where} time {value!r} is not HH:MM:SS.ff") from None


def _epic_mir(root: Path) -> tuple[list[dict], list[str]]:
    rel = "egobench/epic_mir/EPIC_100_retrieval_test.csv"
    sent_rel = "egobench/epic_mir/EPIC_100_retrieval_test_sentence.csv"
    rel_npy = "egobench/epic_mir/caption_relevancy_EPIC_100_retrieval_test.npy"
    cols = ("narration_id", "video_id", "start_timestamp", "stop_timestamp", "narration")
    rows = read_csv(root, rel, required=cols)
    sentences = [r["sentence"] for r in read_csv(root, sent_rel, required=("index", "sentence"))]
    if not (root / rel_npy).is_file():
        raise AnnotationError(f"{rel_npy}: annotation file not found under the data root {root}")
    relevancy = np.load(io.BytesIO((root / rel_npy).read_bytes()), allow_pickle=False)
    if relevancy.shape != (len(rows), len(sentences)):
        raise AnnotationError(
            f"{rel_npy}: shape {relevancy.shape}, expected (clips, sentences) = "
            f"({len(rows)}, {len(sentences)}) from {rel} and {sent_rel}"
        )
    index = {s: j for j, s in enumerate(sentences)}
    out = []
    for i, r in enumerate(rows):
        w = f"row {i + 2}"
        vid = field(r, "video_id", file=rel, where=w, types=str)
        video = resolve_in_root(
            root, BENCH_VIDEO_RULE.format(vid), file=rel, field_name=f"{w}.video_id"
        )
        text = r["narration"]
        extra = {k: r.get(k) for k in ("verb", "verb_class", "noun", "noun_class", "all_nouns")}
        out.append(
            _item(
                "epic_mir",
                r["narration_id"],
                [(video, _hms(r["start_timestamp"], rel, w), _hms(r["stop_timestamp"], rel, w))],
                DESCRIBE_QUESTION,
                (),
                [index[text]] if text in index else [],
                text,
                relevancy=relevancy[i],
                extra=extra,
            )
        )
    return out, sentences


def _egoplan(root: Path) -> list[dict]:
    rel = "egobench/egoplan/EgoPlan_validation.json"
    out = []
    for i, r in enumerate(read_json(root, rel)):
        w = f"record {i}"
        opts = [field(r, f"choice_{c}", file=rel, where=w, types=str) for c in "abcd"]
        gold = field(r, "golden_choice_idx", file=rel, where=w, types=str)
        if gold not in "ABCD" or len(gold) != 1:
            raise AnnotationError(f"{rel}: {w} field 'golden_choice_idx' must be A-D, got {gold!r}")
        extra = {
            k: r.get(k)
            for k in (
                "task_goal",
                "task_start_frame",
                "current_observation_frame",
                "task_progress_metadata",
            )
        }
        out.append(
            _item(
                "egoplan",
                field(r, "sample_id", file=rel, where=w),
                [
                    (
                        _video(root, r, rel, w),
                        opt_time(r, "start", file=rel, where=w),
                        opt_time(r, "end", file=rel, where=w),
                    )
                ],
                field(r, "question", file=rel, where=w, types=str),
                opts,
                ["ABCD".index(gold)],
                opts["ABCD".index(gold)],
                extra=extra,
            )
        )
    return out


def _vlnqa(root: Path) -> list[dict]:
    rel = "egobench/vlnqa/vlnqa.json"
    out = []
    for i, r in enumerate(read_json(root, rel)):
        w = f"record {i}"
        cands = _list(r, "candidates", rel, w)
        ans = field(r, "answer", file=rel, where=w, types=str)
        if ans not in cands:
            raise AnnotationError(f"{rel}: {w} answer {ans!r} is not one of its candidates")
        out.append(
            _item(
                "vlnqa",
                f"vlnqa_{i:06d}",
                [
                    (
                        _video(root, r, rel, w),
                        opt_time(r, "start", file=rel, where=w),
                        opt_time(r, "end", file=rel, where=w),
                    )
                ],
                field(r, "question", file=rel, where=w, types=str),
                cands,
                [cands.index(ans)],
                ans,
            )
        )
    return out


def _egomcq(root: Path) -> list[dict]:
    rel = "egobench/egomcq/egomcq.json"
    data = read_json(root, rel)
    if not isinstance(data, dict):
        raise AnnotationError(f"{rel}: expected a JSON object {{index: item}}")
    out = []
    for key, r in data.items():
        w = f"item {key!r}"
        query = field(r, "query", file=rel, where=w, types=dict)
        choices = field(r, "choices", file=rel, where=w, types=dict)
        clips = []
        for c in range(len(choices)):
            wc = f"{w}.choices[{c!r}]"
            row = field(choices, str(c), file=rel, where=f"{w}.choices")
            uid = field(row, "video_uid", file=rel, where=wc, types=str)
            clips.append(
                (
                    resolve_in_root(
                        root, BENCH_VIDEO_RULE.format(uid), file=rel, field_name=f"{wc}.video_uid"
                    ),
                    number(row, "clip_start", file=rel, where=wc),
                    number(row, "clip_end", file=rel, where=wc),
                )
            )
        types = field(r, "types", file=rel, where=w, types=int)
        text = clean_narration(field(query, "clip_text", file=rel, where=f"{w}.query", types=str))
        out.append(
            _item(
                "egomcq",
                key,
                clips,
                DESCRIBE_QUESTION,
                (),
                [_index(r, "answer", rel, w, len(clips))],
                text,
                subtype={1: "inter", 2: "intra"}.get(types, str(types)),
                extra={"query": query},
            )
        )
    return out


_PARSERS = {
    "egoschema": _egoschema,
    "qaego4d": _qaego4d,
    "egotaskqa": _egotaskqa,
    "charades_ego": _charades,
    "egoplan": _egoplan,
    "vlnqa": _vlnqa,
    "egomcq": _egomcq,
}


class EgoBench(WorldBuilder):
    """Evaluation items of the eight EgoBench task families (zero-shot, held-out videos)."""

    DESCRIPTION = __doc__

    def _features(self) -> dict:
        text = tfds.features.Text
        return {
            "task": text(),
            "item_id": text(),
            "subtype": text(),
            "videos": tfds.features.Sequence(text()),
            "starts": times_feature(),
            "ends": times_feature(),
            "question": text(),
            "options": tfds.features.Sequence(text()),
            "answer_indices": tfds.features.Sequence(np.int64),
            "answer": text(),
            "relevancy": tfds.features.Tensor(shape=(None,), dtype=np.float32),
            "extra": text(),
        }

    def _parse(self, root: Path) -> dict[str, list[tuple[str, dict]]]:
        splits = {}
        for task in TASKS:
            if task == "epic_mir":
                items, self._sentences = _epic_mir(root)
            else:
                items = _PARSERS[task](root)
            keys = [it["item_id"] for it in items]
            if len(set(keys)) != len(keys):
                raise AnnotationError(f"{task}: item ids are not unique")
            splits[task] = list(zip(keys, items, strict=True))
        return splits

    def _extra_metadata(self, root: Path) -> dict:
        return {"epic_mir_sentences": self._sentences, "tasks": list(TASKS)}
