"""EgoBench task loaders: official annotation files -> typed evaluation items.

One function per benchmark of method.md §6. Each reads the benchmark's public annotation
format (and the demo world's files in ``egobench/``, which use the same layouts plus a few
documented extensions; see ``docs/egobench.md``) and returns plain frozen dataclasses:

* :class:`EvalItem` for question answering, classification and EgoMCQ;
* :class:`RetrievalBenchmark` for EPIC-KITCHENS-100 multi-instance retrieval (clips,
  sentences and the relevancy matrix).

Every video path is resolved **inside** a data root: a path that escapes it (``..``, or an
absolute path elsewhere) is refused with an :class:`AnnotationError` naming the file, the
record and the field. A missing field, a value of the wrong type or an unknown value (class
id, answer letter, question type) raises the same error class with the same information.
Loaders never open videos; a missing video surfaces later, when it is decoded.

Defaults point at the demo world's layout, so ``load_task(name, world_root)`` works as is;
for the real datasets pass the annotation file names and ``video_dir`` / ``video_pattern``
(``docs/egobench.md`` lists them per benchmark).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

PathLike = str | os.PathLike

TASKS = (
    "egoschema",
    "qaego4d_close",
    "qaego4d_open",
    "egotaskqa",
    "charades_ego",
    "epic_mir",
    "egoplan",
    "vlnqa",
    "egomcq",
)
WORLD_VIDEO_DIR = "egobench/videos"
QAEGO4D_FPS = 30.0  # QaEgo4D's moment_*_frame fields count canonical Ego4D frames (30 fps)
EGOPLAN_FPS = {"Ego4D": 30.0, "EpicKitchens": 60.0, "synthetic": 8.0}
LETTERS = "ABCDEFGHIJ"


class AnnotationError(ValueError):
    """A malformed annotation file; the message names the file, the record and the field."""


@dataclasses.dataclass(frozen=True)
class Clip:
    """A video file and an optional window in seconds (None: from the start / to the end)."""

    path: Path
    start: float | None = None
    end: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "start": self.start, "end": self.end}


@dataclasses.dataclass(frozen=True)
class EvalItem:
    """One evaluation question (or clip).

    Attributes:
      task: task name, one of :data:`TASKS`.
      item_id: unique within the task; predictions files are keyed by it.
      video: the clip the model watches (None for EgoMCQ, whose options are clips).
      start, end: window of ``video`` in seconds (None: whole video).
      question: question text; for EgoMCQ the query narration, for retrieval the narration.
      options: answer options (MCQ), class names (Charades-Ego), or the options' narrations
        (EgoMCQ, informational).
      answer_index: index of the correct option, or None (no ground truth).
      answer_text: reference answer text (open-ended QA), if any.
      labels: positive class indices (Charades-Ego), sorted.
      group: sub-split for per-group metrics: ``direct`` / ``indirect`` (EgoTaskQA),
        ``inter`` / ``intra`` (EgoMCQ); None elsewhere.
      option_clips: EgoMCQ's candidate clips, one per option.
      meta: anything else worth keeping (evidence moment, raw type codes, ...).
    """

    task: str
    item_id: str
    video: Path | None
    question: str
    start: float | None = None
    end: float | None = None
    options: tuple[str, ...] = ()
    answer_index: int | None = None
    answer_text: str | None = None
    labels: tuple[int, ...] = ()
    group: str | None = None
    option_clips: tuple[Clip, ...] = ()
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    @property
    def clip(self) -> Clip | None:
        return None if self.video is None else Clip(self.video, self.start, self.end)

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable dict (paths as strings)."""
        out = dataclasses.asdict(self)
        out["video"] = None if self.video is None else str(self.video)
        out["option_clips"] = [c.to_json() for c in self.option_clips]
        out["options"], out["labels"] = list(self.options), list(self.labels)
        return out


@dataclasses.dataclass(frozen=True)
class RetrievalBenchmark:
    """EPIC-KITCHENS-100 MIR: clips (video windows), sentences and their relevancy.

    Attributes:
      clips: one item per clip, in CSV order; ``question`` holds the clip's narration.
      sentence_ids: the sentence file's first column (EPIC: narration id of the first clip
        with that narration).
      sentences: the unique narrations, in sentence-file order.
      relevancy: ``float32[num_clips, num_sentences]``, rows in clip order, columns in
        sentence order (EPIC's ``caption_relevancy_*`` matrix).
    """

    clips: tuple[EvalItem, ...]
    sentence_ids: tuple[str, ...]
    sentences: tuple[str, ...]
    relevancy: np.ndarray

    def subset(self, max_clips: int | None) -> RetrievalBenchmark:
        """The benchmark restricted to the first ``max_clips`` clips and their narrations.

        The sentence set is rebuilt as EPIC builds it: the unique narrations of the kept
        clips (columns whose sentence equals a kept clip's narration), so the sub-benchmark
        is a smaller instance of the same task. Scoring cost is O(clips x sentences).
        """
        if max_clips is None or max_clips >= len(self.clips):
            return self
        if max_clips < 1:
            raise ValueError(f"max_clips must be >= 1, got {max_clips}")
        clips = self.clips[:max_clips]
        kept = {c.question for c in clips}
        cols = [j for j, s in enumerate(self.sentences) if s in kept]
        return RetrievalBenchmark(
            clips=clips,
            sentence_ids=tuple(self.sentence_ids[j] for j in cols),
            sentences=tuple(self.sentences[j] for j in cols),
            relevancy=self.relevancy[:max_clips][:, cols],
        )


# ----------------------------------------------------------------------------- helpers


def _where(index: int | str, key: str = "record") -> str:
    return f"{key} {index}" if isinstance(index, int) else f"{key} {index!r}"


def _error(file: PathLike, where: str, field: str, problem: str) -> AnnotationError:
    return AnnotationError(f"{os.fspath(file)}: {where}: field {field!r} {problem}")


def _annotation_path(root: Path, name: PathLike, argument: str) -> Path:
    path = Path(name) if Path(name).is_absolute() else root / name
    if not path.is_file():
        raise FileNotFoundError(
            f"annotation file not found: {path} (pass the loader's {argument!r} argument, "
            "relative to the data root or absolute)"
        )
    return path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from e


def _read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in required if c not in header]
        if missing:
            raise AnnotationError(
                f"{path}: header has no column {missing[0]!r} (header: {', '.join(header)})"
            )
        return list(reader)


def _get(rec: Mapping, key: str, file: Path, where: str, kind: type | tuple = str) -> Any:
    """``rec[key]``, checked to be of ``kind`` (bool is never accepted as a number)."""
    if not isinstance(rec, Mapping):
        raise AnnotationError(f"{file}: {where}: expected a JSON object, got {type(rec).__name__}")
    if key not in rec or rec[key] is None:
        raise _error(file, where, key, "is missing")
    value = rec[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        names = "/".join(k.__name__ for k in kinds)
        raise _error(file, where, key, f"must be {names}, got {value!r}")
    if isinstance(value, str) and not value.strip():
        raise _error(file, where, key, "is empty")
    return value


def _seconds(rec: Mapping, key: str, file: Path, where: str) -> float | None:
    if rec.get(key) is None:
        return None
    value = _get(rec, key, file, where, (int, float))
    if not np.isfinite(value) or value < 0:
        raise _error(file, where, key, f"must be a finite time >= 0 s, got {value!r}")
    return float(value)


def _window(
    start: float | None, end: float | None, file: Path, where: str, fields: str
) -> tuple[float | None, float | None]:
    if start is not None and end is not None and end < start:
        raise _error(file, where, fields, f"ends before it starts ({start} > {end})")
    return start, end


def resolve_video(root: PathLike, rel: Any, file: PathLike, where: str, field: str) -> Path:
    """``root / rel`` normalised, refused unless it stays inside ``root``.

    The check is lexical (``..`` and absolute paths), so a dataset directory symlinked into
    the root still works. Returns an absolute path; the file need not exist yet.
    """
    if not isinstance(rel, str) or not rel.strip():
        raise _error(file, where, field, f"must be a non-empty path string, got {rel!r}")
    base = Path(os.path.abspath(root))
    path = Path(os.path.normpath(base / rel))
    if base not in path.parents:  # the root itself is no video either
        raise _error(
            file,
            where,
            field,
            f"= {rel!r} resolves to {path}, outside the data root {base}; video paths must "
            "stay inside the root",
        )
    return path


def _video(
    root: Path,
    rec: Mapping,
    file: Path,
    where: str,
    video_dir: str,
    video_pattern: str,
) -> Path:
    """The record's ``video`` field (world extension), else ``video_dir/video_pattern``."""
    if rec.get("video") is not None:
        return resolve_video(root, rec["video"], file, where, "video")
    try:
        name = video_pattern.format(**rec)
    except KeyError as e:
        raise _error(
            file, where, e.args[0], f"is missing (needed by video_pattern {video_pattern!r})"
        ) from None
    return resolve_video(root, os.path.join(video_dir, name), file, where, "video_pattern")


def _options(values: Any, file: Path, where: str, field: str) -> tuple[str, ...]:
    if not isinstance(values, list) or len(values) < 2:
        raise _error(file, where, field, f"must be a list of >= 2 strings, got {values!r}")
    for v in values:
        if not isinstance(v, str) or not v.strip():
            raise _error(file, where, field, f"holds a non-string or empty option: {v!r}")
    return tuple(v.strip() for v in values)


def _answer_index(value: Any, n: int, file: Path, where: str, field: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
        raise _error(file, where, field, f"must be an option index in [0, {n}), got {value!r}")
    return value


def _unique(items: list[EvalItem], file: Path) -> list[EvalItem]:
    seen: set[str] = set()
    for it in items:
        if it.item_id in seen:
            raise AnnotationError(f"{file}: item id {it.item_id!r} appears twice")
        seen.add(it.item_id)
    return items


def _list(data: Any, file: Path) -> list:
    if not isinstance(data, list):
        raise AnnotationError(f"{file}: expected a JSON list of records, got {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------- EgoSchema


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
    qfile = _annotation_path(root, questions, "questions")
    gold: dict[str, int] = {}
    if answers is not None:
        afile = _annotation_path(root, answers, "answers")
        raw = _read_json(afile)
        if not isinstance(raw, dict):
            raise AnnotationError(f"{afile}: expected {{q_uid: answer index}}, got a list")
        for quid, idx in raw.items():
            gold[quid] = _answer_index(idx, 5, afile, _where(quid, "q_uid"), quid)
    items = []
    for i, rec in enumerate(_list(_read_json(qfile), qfile)):
        where = _where(i)
        quid = _get(rec, "q_uid", qfile, where)
        where = _where(quid, "q_uid")
        if answered_only and answers is not None and quid not in gold:
            continue
        opts = tuple(_get(rec, f"option {k}", qfile, where).strip() for k in range(5))
        items.append(
            EvalItem(
                task="egoschema",
                item_id=quid,
                video=_video(root, rec, qfile, where, video_dir, video_pattern),
                question=_get(rec, "question", qfile, where).strip(),
                options=opts,
                answer_index=gold.get(quid),
            )
        )
    return _unique(items, qfile)


# ----------------------------------------------------------------------------- QAEgo4D


def _moment(rec: Mapping, file: Path, where: str) -> tuple[float, float] | None:
    """Evidence window in seconds: ``moment_*_sec`` (world) or ``moment_*_frame`` / 30."""
    for suffix, scale in (("sec", 1.0), ("frame", 1.0 / QAEGO4D_FPS)):
        a, b = f"moment_start_{suffix}", f"moment_end_{suffix}"
        s, e = _seconds(rec, a, file, where), _seconds(rec, b, file, where)
        if s is not None and e is not None:
            _window(s, e, file, where, f"{a}/{b}")
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
    path = _annotation_path(root, file or f"egobench/qaego4d/qaego4d_test_{mode}.json", "file")
    items = []
    for i, rec in enumerate(_list(_read_json(path), path)):
        sid = str(_get(rec, "sample_id", path, _where(i), (str, int)))
        where = _where(sid, "sample_id")
        answer = _get(rec, "answer", path, where).strip()
        moment = _moment(rec, path, where)
        start, end = moment if (use_moment and moment) else (None, None)
        opts: tuple[str, ...] = ()
        idx = None
        if mode == "close":
            if rec.get("options") is not None:
                opts = _options(rec["options"], path, where, "options")
                if rec.get("answer_idx") is not None:
                    idx = _answer_index(rec["answer_idx"], len(opts), path, where, "answer_idx")
                elif answer in opts:
                    idx = opts.index(answer)
                else:
                    raise _error(path, where, "answer_idx", "is missing (answer not in options)")
            elif rec.get("wrong_answers") is not None:
                wrong = _options(rec["wrong_answers"] + [answer], path, where, "wrong_answers")
                pool = (answer, *wrong[:-1])
                order = _stable_permutation(sid, len(pool))
                opts = tuple(pool[j] for j in order)
                idx = order.index(0)
            else:
                raise _error(path, where, "options", "is missing (or give 'wrong_answers')")
        items.append(
            EvalItem(
                task=f"qaego4d_{mode}",
                item_id=sid,
                video=_video(root, rec, path, where, video_dir, video_pattern),
                start=start,
                end=end,
                question=_get(rec, "question", path, where).strip(),
                options=opts,
                answer_index=idx,
                answer_text=answer,
                meta={"moment": moment, "video_id": rec.get("video_id")},
            )
        )
    return _unique(items, path)


# ----------------------------------------------------------------------------- EgoTaskQA


def load_egotaskqa(
    root: PathLike,
    file: PathLike = "egobench/egotaskqa/egotaskqa_test.json",
) -> list[EvalItem]:
    """EgoTaskQA as 4-way MCQ (own JSON, see docs): groups ``direct`` / ``indirect``."""
    root = Path(root)
    path = _annotation_path(root, file, "file")
    items = []
    for i, rec in enumerate(_list(_read_json(path), path)):
        qid = str(_get(rec, "id", path, _where(i), (str, int)))
        where = _where(qid, "id")
        kind = _get(rec, "type", path, where)
        if kind not in ("direct", "indirect"):
            raise _error(path, where, "type", f"must be 'direct' or 'indirect', got {kind!r}")
        opts = _options(rec.get("options"), path, where, "options")
        if rec.get("answer_idx") is not None:
            idx = _answer_index(rec["answer_idx"], len(opts), path, where, "answer_idx")
        else:
            answer = _get(rec, "answer", path, where).strip()
            if answer not in opts:
                raise _error(path, where, "answer_idx", "is missing (answer not in options)")
            idx = opts.index(answer)
        start, end = _window(
            _seconds(rec, "start", path, where),
            _seconds(rec, "end", path, where),
            path,
            where,
            "start/end",
        )
        items.append(
            EvalItem(
                task="egotaskqa",
                item_id=qid,
                video=resolve_video(root, _get(rec, "video", path, where), path, where, "video"),
                start=start,
                end=end,
                question=_get(rec, "question", path, where).strip(),
                options=opts,
                answer_index=idx,
                answer_text=opts[idx],
                group=kind,
                meta={"category": rec.get("category")},
            )
        )
    return _unique(items, path)


# ----------------------------------------------------------------------------- Charades-Ego

_CLASS_RE = re.compile(r"^c(\d{3})\s+(\S.*)$")


def load_charades_classes(path: PathLike) -> tuple[str, ...]:
    """``Charades_v1_classes.txt``: lines ``c000 Holding some clothes``, ids contiguous."""
    path = Path(path)
    names = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        m = _CLASS_RE.match(line.strip())
        if not m:
            raise AnnotationError(f"{path}: line {n}: expected 'cNNN class name', got {line!r}")
        if int(m.group(1)) != len(names):
            raise AnnotationError(
                f"{path}: line {n}: class id c{m.group(1)} out of order (expected "
                f"c{len(names):03d})"
            )
        names.append(m.group(2).strip())
    if not names:
        raise AnnotationError(f"{path}: no classes")
    return tuple(names)


def load_charades_ego(
    root: PathLike,
    file: PathLike = "egobench/charades_ego/CharadesEgo_v1_test_only1st.csv",
    classes: PathLike = "egobench/charades_ego/Charades_v1_classes.txt",
    *,
    video_dir: str = WORLD_VIDEO_DIR,
    video_pattern: str = "{id}.mp4",
) -> list[EvalItem]:
    """Charades-Ego first-person test videos: multi-label classification over the classes.

    Each item's ``options`` are the class names and ``labels`` the classes of its
    ``actions`` intervals (``meta['actions']`` keeps ``(class, start, end)``).
    """
    root = Path(root)
    path = _annotation_path(root, file, "file")
    names = load_charades_classes(_annotation_path(root, classes, "classes"))
    items = []
    for i, rec in enumerate(_read_csv(path, ("id", "actions")), start=2):  # line numbers
        where = f"line {i} (id {rec['id']!r})"
        if not rec["id"].strip():
            raise _error(path, f"line {i}", "id", "is empty")
        actions = []
        for part in filter(None, (p.strip() for p in rec["actions"].split(";"))):
            fields = part.split()
            if len(fields) != 3 or not re.fullmatch(r"c\d{3}", fields[0]):
                raise _error(path, where, "actions", f"has a malformed entry {part!r}")
            cls = int(fields[0][1:])
            if cls >= len(names):
                raise _error(path, where, "actions", f"names unknown class {fields[0]}")
            t0 = _number(fields[1], path, where, "actions")
            t1 = _number(fields[2], path, where, "actions")
            actions.append((cls, t0, t1))
        rec = {k: v for k, v in rec.items() if v not in (None, "")}
        items.append(
            EvalItem(
                task="charades_ego",
                item_id=rec["id"],
                video=_video(root, rec, path, where, video_dir, video_pattern),
                question="",
                options=names,
                labels=tuple(sorted({a[0] for a in actions})),
                meta={"actions": actions},
            )
        )
    return _unique(items, path)


# ----------------------------------------------------------------------------- EPIC MIR

PKL_TO_NPY = (
    "python -c \"import pickle, numpy as np; np.save('caption_relevancy_EPIC_100_retrieval_"
    "test.npy', np.asarray(pickle.load(open('caption_relevancy_EPIC_100_retrieval_test.pkl', "
    "'rb')), np.float32))\""
)


def _hms(text: str, file: Path, where: str, field: str) -> float:
    m = re.fullmatch(r"(\d+):(\d{1,2}):(\d{1,2}(?:\.\d+)?)", text.strip())
    if not m:
        raise _error(file, where, field, f"must be HH:MM:SS.ff, got {text!r}")
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
    cpath = _annotation_path(root, clips, "clips")
    required = ("narration_id", "video_id", "start_timestamp", "stop_timestamp", "narration")
    items = []
    for i, rec in enumerate(_read_csv(cpath, required), start=2):
        where = f"line {i} (narration_id {rec['narration_id']!r})"
        for key in required:
            if not (rec.get(key) or "").strip():
                raise _error(cpath, where, key, "is empty")
        start = _hms(rec["start_timestamp"], cpath, where, "start_timestamp")
        end = _hms(rec["stop_timestamp"], cpath, where, "stop_timestamp")
        _window(start, end, cpath, where, "start_timestamp/stop_timestamp")
        items.append(
            EvalItem(
                task="epic_mir",
                item_id=rec["narration_id"],
                video=_video(root, rec, cpath, where, video_dir, video_pattern),
                start=start,
                end=end,
                question=rec["narration"].strip(),
                answer_text=rec["narration"].strip(),
                meta={"verb_class": rec.get("verb_class"), "noun_class": rec.get("noun_class")},
            )
        )
    _unique(items, cpath)
    spath = _annotation_path(root, sentences, "sentences")
    with open(spath, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or len(rows[0]) != 2:
        raise AnnotationError(f"{spath}: expected a 2-column header such as 'index,sentence'")
    ids, texts = [], []
    for n, row in enumerate(rows[1:], start=2):
        if len(row) != 2 or not row[1].strip():
            raise _error(spath, f"line {n}", rows[0][1], f"missing or empty in row {row!r}")
        ids.append(row[0].strip())
        texts.append(row[1].strip())
    rel = load_relevancy(_annotation_path(root, relevancy, "relevancy"))
    if rel.shape != (len(items), len(texts)):
        raise AnnotationError(
            f"{relevancy}: relevancy shape {rel.shape} does not match {len(items)} clips in "
            f"{cpath.name} x {len(texts)} sentences in {spath.name}"
        )
    return RetrievalBenchmark(tuple(items), tuple(ids), tuple(texts), rel)


# ----------------------------------------------------------------------------- EgoPlan-Bench


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
    path = _annotation_path(root, file, "file")
    items = []
    for i, rec in enumerate(_list(_read_json(path), path)):
        sid = str(_get(rec, "sample_id", path, _where(i), (str, int)))
        where = _where(sid, "sample_id")
        opts = tuple(_get(rec, f"choice_{c}", path, where).strip() for c in "abcd")
        letter = _get(rec, "golden_choice_idx", path, where).strip().upper()
        if letter not in "ABCD" or len(letter) != 1:
            raise _error(path, where, "golden_choice_idx", f"must be A-D, got {letter!r}")
        idx = "ABCD".index(letter)
        answer = rec.get("answer")
        if isinstance(answer, str) and answer.strip() != opts[idx]:
            raise _error(path, where, "answer", f"{answer!r} is not choice {letter} {opts[idx]!r}")
        start, end = _seconds(rec, "start", path, where), _seconds(rec, "end", path, where)
        if start is None or end is None:
            start, end = _egoplan_window(rec, path, where, fps)
        _window(start, end, path, where, "start/end")
        items.append(
            EvalItem(
                task="egoplan",
                item_id=sid,
                video=_video(root, rec, path, where, video_dir, video_pattern),
                start=start,
                end=end,
                question=_get(rec, "question", path, where).strip(),
                options=opts,
                answer_index=idx,
                answer_text=opts[idx],
                meta={"task_goal": rec.get("task_goal"), "video_source": rec.get("video_source")},
            )
        )
    return _unique(items, path)


def _egoplan_window(
    rec: Mapping, path: Path, where: str, fps: float | Mapping[str, float]
) -> tuple[float, float]:
    if isinstance(fps, Mapping):
        source = _get(rec, "video_source", path, where)
        if source not in fps:
            raise _error(
                path, where, "video_source", f"{source!r} has no frame rate; pass fps={{...}}"
            )
        rate = float(fps[source])
    else:
        rate = float(fps)
    end = _get(rec, "current_observation_frame", path, where, int)
    first = rec.get("task_start_frame")
    if first is None:
        progress = rec.get("task_progress_metadata") or []
        first = progress[0].get("start_frame", 0) if progress else 0
    if isinstance(first, bool) or not isinstance(first, int) or first < 0:
        raise _error(path, where, "task_start_frame", f"must be a frame index, got {first!r}")
    return first / rate, end / rate


# ----------------------------------------------------------------------------- VLN-QA


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
    path = _annotation_path(root, file, "file")
    items = []
    for i, rec in enumerate(_list(_read_json(path), path)):
        where = _where(i)
        opts = _options(rec.get("candidates"), path, where, "candidates")
        answer = _get(rec, "answer", path, where).strip()
        if answer not in opts:
            raise _error(path, where, "answer", f"{answer!r} is not one of the candidates")
        rel = os.path.join(video_dir, _get(rec, "video", path, where))
        start, end = _window(
            _seconds(rec, "start", path, where),
            _seconds(rec, "end", path, where),
            path,
            where,
            "start/end",
        )
        items.append(
            EvalItem(
                task="vlnqa",
                item_id=f"{i:05d}",
                video=resolve_video(root, rel, path, where, "video"),
                start=start,
                end=end,
                question=_get(rec, "question", path, where).strip(),
                options=opts,
                answer_index=opts.index(answer),
                answer_text=answer,
            )
        )
    return items


# ----------------------------------------------------------------------------- EgoMCQ

EGOMCQ_CHUNK_SEC = 600.0  # EgoVLP stores Ego4D videos as 600 s chunks


def clean_narration(text: str) -> str:
    """EgoClip narration without its ``#C`` / ``#O`` / ``#Unsure`` markers."""
    text = re.sub(r"#\s*(?:C|O|unsure|Unsure)\b\s*", "", text)
    return re.sub(r"\s+", " ", text).strip()


def _number(value: Any, file: Path, where: str, field: str) -> float:
    try:
        out = float(value)
    except ValueError:
        raise _error(file, where, field, f"must be a number, got {value!r}") from None
    if not np.isfinite(out):
        raise _error(file, where, field, f"must be finite, got {value!r}")
    return out


def _egomcq_clip(
    root: Path, row: Any, path: Path, where: str, video_dir: str, chunked: bool
) -> tuple[Clip, str, str]:
    uid = _get(row, "video_uid", path, where)
    text = clean_narration(_get(row, "clip_text", path, where))
    start = _number(
        _get(row, "clip_start", path, where, (int, float, str)), path, where, "clip_start"
    )
    end = _number(_get(row, "clip_end", path, where, (int, float, str)), path, where, "clip_end")
    start, end = _window(max(start, 0.0), max(end, 0.0), path, where, "clip_start/clip_end")
    if chunked:  # EgoVLP: <video_uid>/<chunk>.mp4, times relative to the chunk's start
        chunk = int(start // EGOMCQ_CHUNK_SEC)
        offset = chunk * EGOMCQ_CHUNK_SEC
        rel = os.path.join(video_dir, uid, f"{chunk}.mp4")
        start, end = start - offset, min(end - offset, EGOMCQ_CHUNK_SEC)
    else:
        rel = os.path.join(video_dir, f"{uid}.mp4")
    return Clip(resolve_video(root, rel, path, where, "video_uid"), start, end), uid, text


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
    path = _annotation_path(root, file, "file")
    data = _read_json(path)
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: expected {{'0': {{query, choices, answer, types}}}}")
    items = []
    for key, rec in data.items():
        where = _where(key, "item")
        query = _get(rec, "query", path, where, dict)
        _, quid, qtext = _egomcq_clip(root, query, path, f"{where} query", video_dir, chunked)
        choices = _get(rec, "choices", path, where, dict)
        if len(choices) < 2:
            raise _error(path, where, "choices", f"must hold >= 2 clips, got {len(choices)}")
        clips, uids, texts = [], [], []
        for k in sorted(choices, key=lambda c: int(c) if str(c).isdigit() else c):
            clip, uid, text = _egomcq_clip(
                root, choices[k], path, f"{where} choice {k}", video_dir, chunked
            )
            clips.append(clip)
            uids.append(uid)
            texts.append(text)
        idx = _answer_index(rec.get("answer"), len(clips), path, where, "answer")
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
    return _unique(items, path)


# ----------------------------------------------------------------------------- registry

LOADERS: dict[str, Callable[..., Any]] = {
    "egoschema": load_egoschema,
    "qaego4d_close": lambda root, **kw: load_qaego4d(root, mode="close", **kw),
    "qaego4d_open": lambda root, **kw: load_qaego4d(root, mode="open", **kw),
    "egotaskqa": load_egotaskqa,
    "charades_ego": load_charades_ego,
    "epic_mir": load_epic_mir,
    "egoplan": load_egoplan,
    "vlnqa": load_vlnqa,
    "egomcq": load_egomcq,
}


def load_task(name: str, root: PathLike, **kwargs: Any) -> list[EvalItem] | RetrievalBenchmark:
    """Load one task by name (:data:`TASKS`); ``kwargs`` go to its loader."""
    if name not in LOADERS:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
    return LOADERS[name](root, **kwargs)
