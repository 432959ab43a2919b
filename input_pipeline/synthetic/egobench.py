"""The EgoBench files of the held-out takes, in each benchmark's own layout under
``egobench/``: EgoSchema, QaEgo4D, EgoTaskQA, Charades-Ego, EPIC-KITCHENS-100 multi-instance
retrieval, EgoPlan, VLN-QA and EgoMCQ (see ``docs/egobench.md``). The validation takes of
the study regime get the same files under ``egobench_val/``; :func:`loader_kwargs` tells the
EgoBench reader where a directory's files are.

The question-answering records come from :mod:`input_pipeline.synthetic.egobench_qa`; the
classification and retrieval files are built here.
"""

from __future__ import annotations

import io

import numpy as np

from input_pipeline.synthetic.egobench_qa import (
    egomcq,
    egoplan,
    egoschema,
    egotaskqa,
    qaego4d,
    vlnqa,
)
from input_pipeline.synthetic.file_formats import json_bytes, tsv_bytes
from input_pipeline.synthetic.language import action_class, imperative, narration, step_nouns
from input_pipeline.synthetic.takes import EGO_CAMERA, Step, TakeSpec
from input_pipeline.synthetic.vocabulary import ACTION_CLASSES, SHAPES, VERBS

__all__ = ["egobench_files", "loader_kwargs", "TASK_FILES", "VIDEO_DIR_TASKS"]

# Each task's annotation files: loader argument -> path inside the EgoBench directory (the
# EgoBench reader's defaults are these under ``egobench/``).
TASK_FILES: dict[str, dict[str, str]] = {
    "egoschema": {
        "questions": "egoschema/questions.json",
        "answers": "egoschema/subset_answers.json",
    },
    "qaego4d_close": {"file": "qaego4d/qaego4d_test_close.json"},
    "qaego4d_open": {"file": "qaego4d/qaego4d_test_open.json"},
    "egotaskqa": {"file": "egotaskqa/egotaskqa_test.json"},
    "charades_ego": {
        "file": "charades_ego/CharadesEgo_v1_test_only1st.csv",
        "classes": "charades_ego/Charades_v1_classes.txt",
    },
    "epic_mir": {
        "clips": "epic_mir/EPIC_100_retrieval_test.csv",
        "sentences": "epic_mir/EPIC_100_retrieval_test_sentence.csv",
        "relevancy": "epic_mir/caption_relevancy_EPIC_100_retrieval_test.npy",
    },
    "egoplan": {"file": "egoplan/EgoPlan_validation.json"},
    "vlnqa": {"file": "vlnqa/vlnqa.json"},
    "egomcq": {"file": "egomcq/egomcq.json"},
}
# Tasks whose loader finds (some) videos by id in ``video_dir`` (the others read the
# records' root-relative ``video`` paths).
VIDEO_DIR_TASKS = (
    "egoschema",
    "qaego4d_close",
    "qaego4d_open",
    "charades_ego",
    "epic_mir",
    "egoplan",
    "egomcq",
)


def loader_kwargs(prefix: str = "egobench") -> dict[str, dict[str, str]]:
    """Keyword arguments of ``input_pipeline.egobench.load_task`` per task for the EgoBench
    files under ``prefix`` (``egobench``: the reader's defaults; ``egobench_val``: the
    validation takes), e.g. as ``config.eval.loader_kwargs``."""
    out = {}
    for task, names in TASK_FILES.items():
        out[task] = {arg: f"{prefix}/{rel}" for arg, rel in names.items()}
        if task in VIDEO_DIR_TASKS:
            out[task]["video_dir"] = f"{prefix}/videos"
    return out


def egobench_files(
    takes: list[TakeSpec], seed: int, *, prefix: str = "egobench", stream: int = 200
) -> tuple[dict[str, bytes], dict]:
    """Every EgoBench file of the held-out ``takes`` ({path: bytes}) and the record count
    of each task (for ``world.json``).

    The files go under ``prefix``; task ``k`` draws from ``default_rng([seed, stream + k])``
    (the validation files use another ``stream``, so their ids never repeat the test's).
    """
    rng = lambda k: np.random.default_rng([seed, stream + k])  # noqa: E731
    path = lambda task, arg: f"{prefix}/{TASK_FILES[task][arg]}"  # noqa: E731
    files: dict[str, bytes] = {}
    questions, answers = egoschema(takes, rng(1))
    files[path("egoschema", "questions")] = json_bytes(questions)
    files[path("egoschema", "answers")] = json_bytes(answers)
    qa = qaego4d(takes, rng(2))
    files[path("qaego4d_close", "file")] = json_bytes(qa)
    files[path("qaego4d_open", "file")] = json_bytes(
        [{k: v for k, v in r.items() if k not in ("options", "answer_idx")} for r in qa]
    )
    tqa = egotaskqa(takes, rng(3))
    files[path("egotaskqa", "file")] = json_bytes(tqa)
    ch_csv, ch_cls = _charades(takes)
    files[path("charades_ego", "file")] = ch_csv
    files[path("charades_ego", "classes")] = ch_cls
    files.update(_epic_mir(takes, {a: path("epic_mir", a) for a in TASK_FILES["epic_mir"]}))
    plan = egoplan(takes, rng(4))
    files[path("egoplan", "file")] = json_bytes(plan)
    vln = vlnqa(takes, rng(5))
    files[path("vlnqa", "file")] = json_bytes(vln)
    mcq = egomcq(takes, rng(6))
    files[path("egomcq", "file")] = json_bytes(mcq)
    counts = {
        "egoschema": len(questions),
        "qaego4d": len(qa),
        "egotaskqa": len(tqa),
        "egotaskqa_direct": sum(r["type"] == "direct" for r in tqa),
        "egotaskqa_indirect": sum(r["type"] == "indirect" for r in tqa),
        "charades_ego_videos": len(takes),
        "charades_ego_classes": len(ACTION_CLASSES),
        "epic_mir_clips": sum(len(t.steps) for t in takes),
        "epic_mir_sentences": len({imperative(t, s) for t in takes for s in t.steps}),
        "egoplan": len(plan),
        "vlnqa": len(vln),
        "egomcq": len(mcq),
        "egomcq_inter": sum(v["types"] == 1 for v in mcq.values()),
        "egomcq_intra": sum(v["types"] == 2 for v in mcq.values()),
    }
    return files, counts


def _charades(takes) -> tuple[bytes, bytes]:
    """Charades-Ego: one CSV row per video (its actions as ``cNNN start end``) and the
    class list."""
    header = [
        "id",
        "subject",
        "scene",
        "quality",
        "relevance",
        "verified",
        "script",
        "objects",
        "descriptions",
        "actions",
        "length",
        "video",
    ]
    rows = []
    for tk in takes:
        acts = ";".join(f"c{action_class(tk, s):03d} {s.t0:.2f} {s.t1:.2f}" for s in tk.steps)
        objs = ";".join(o.name for o in tk.objects)
        desc = " ".join(narration(tk, s) for s in tk.steps)
        rows.append(
            [
                tk.uid,
                "C",
                "Tabletop",
                7,
                7,
                "Yes",
                desc,
                objs,
                desc,
                acts,
                f"{tk.duration:.2f}",
                tk.videos[EGO_CAMERA],
            ]
        )
    classes = "".join(f"c{i:03d} {n}\n" for i, n in enumerate(ACTION_CLASSES))
    return tsv_bytes(header, rows, ","), classes.encode()


def _hms(t: float, digits: int) -> str:
    """``t`` seconds as ``HH:MM:SS.ff`` with ``digits`` decimals (EPIC timestamps)."""
    h, rem = divmod(t, 3600)
    m, sec = divmod(rem, 60)
    return f"{int(h):02d}:{int(m):02d}:{sec:0{3 + digits}.{digits}f}"


_EPIC_HEADER = [
    "uid",
    "narration_id",
    "participant_id",
    "video_id",
    "narration_timestamp",
    "start_timestamp",
    "stop_timestamp",
    "start_frame",
    "stop_frame",
    "narration",
    "verb",
    "verb_class",
    "noun",
    "noun_class",
    "all_nouns",
    "all_noun_classes",
]


def _epic_mir(takes, paths: dict[str, str]) -> dict[str, bytes]:
    """EPIC-KITCHENS-100 multi-instance retrieval: clips, unique sentences and the
    clip x sentence relevance matrix, at ``paths`` (``clips``, ``sentences``,
    ``relevancy``)."""
    rows, clips = [], []
    for tk in takes:
        for k, s in enumerate(tk.steps):
            nouns = step_nouns(tk, s) or [s.direction]
            rows.append(_epic_row(tk, k, s, nouns, uid=len(rows)))
            clips.append((f"{tk.uid}_{k}", imperative(tk, s), VERBS.index(s.verb), set(nouns)))
    sent_rows, rel = _epic_sentences(clips)
    buf = io.BytesIO()
    np.save(buf, rel, allow_pickle=False)
    return {
        paths["clips"]: tsv_bytes(_EPIC_HEADER, rows, ","),
        paths["sentences"]: tsv_bytes(["index", "sentence"], sent_rows, ","),
        paths["relevancy"]: buf.getvalue(),
    }


def _epic_row(tk: TakeSpec, k: int, s: Step, nouns: list[str], uid: int) -> list:
    """The retrieval-test CSV row of step ``k`` of a take; ``nouns`` are the objects it
    involves (its direction for a head motion)."""
    shapes = [n.split()[-1] for n in nouns]
    noun_cls = [SHAPES.index(n) if n in SHAPES else len(SHAPES) for n in shapes]
    return [
        uid,
        f"{tk.uid}_{k}",
        "P01",
        tk.uid,
        _hms(s.timestamp, 3),
        _hms(s.t0, 2),
        _hms(min(s.t1, tk.duration), 2),
        int(round(s.t0 * tk.fps)),
        int(round(min(s.t1, tk.duration) * tk.fps)),
        imperative(tk, s),
        s.verb.replace(" ", "-"),
        VERBS.index(s.verb),
        nouns[0],
        noun_cls[0],
        str(nouns),
        str(noun_cls),
    ]


def _epic_sentences(clips: list[tuple[str, str, int, set]]) -> tuple[list[list], np.ndarray]:
    """From ``(narration_id, text, verb class, nouns)`` per clip: the sentence CSV rows (the
    unique narrations, each indexed by the first clip that has it, as EPIC) and the relevance
    ``float32[clips, sentences]``, half verb match and half noun IoU."""
    sentences: dict[str, tuple[str, int, set]] = {}
    for nid, text, verb, nouns in clips:
        sentences.setdefault(text, (nid, verb, nouns))
    sent_rows = [[nid, text] for text, (nid, _, _) in sentences.items()]
    rel = np.zeros((len(clips), len(sentences)), np.float32)
    for i, (_, _, v, nouns) in enumerate(clips):
        for j, (_, sv, snouns) in enumerate(sentences.values()):
            union = nouns | snouns
            iou = len(nouns & snouns) / len(union) if union else 1.0
            rel[i, j] = 0.5 * (v == sv) + 0.5 * iou
    return sent_rows, rel
