"""The training corpora's annotation files, in the real datasets' layouts.

* ``pairs`` takes -> Ego-Exo4D: ``takes.json``, ``annotations/atomic_descriptions_train.json``
  and ``annotations/splits.json``;
* ``ego`` takes -> EgoClip: ``egoclip/egoclip.csv``;
* ``exo`` takes -> web-style captions: ``exo_web/exo_captions.json`` (VideoLLaMA2 JSON);
* ``pairs`` + ``ego`` takes -> EgoIT instructions: ``egoit/egoit_instructions.json``.

Each builder returns ``{path relative to the world root: file bytes}``; random choices come
from ``default_rng([seed, 10x])``, one stream per file. See ``docs/data.md`` for the fields.
"""

from __future__ import annotations

import numpy as np

from input_pipeline.synthetic.file_formats import (
    FORMAT_VERSION,
    annotation_time,
    clip_window,
    conversation,
    json_bytes,
    tsv_bytes,
)
from input_pipeline.synthetic.language import (
    CAPTION_PROMPTS,
    EGOIT_TEMPLATES,
    NUMBER_WORDS,
    egoclip_text,
    exo_caption,
    narration,
    nav_answer,
    phrase,
    verb_noun_tags,
)
from input_pipeline.synthetic.takes import EGO_CAMERA, EGO_STREAM, Step, TakeSpec, random_uuid
from input_pipeline.synthetic.vocabulary import region, verb_form

__all__ = ["egoexo_files", "egoclip_row", "egoclip_file", "exo_caption_file", "egoit_file"]

# ----------------------------------------------------------------------------- Ego-Exo4D


def egoexo_files(takes: list[TakeSpec], seed: int) -> dict[str, bytes]:
    """Ego-Exo4D layout: takes.json, annotations/atomic_descriptions_train.json, splits.json."""
    rng = np.random.default_rng([seed, 101])
    entries, annotations = [], {}
    for k, tk in enumerate(takes):
        entries.append(_take_entry(tk, k, rng))
        annotations[tk.uid] = [_atomic_annotation(tk, rng)]
    splits = {
        "take_uid_to_split": {tk.uid: "train" for tk in takes},
        "split_to_take_uids": {"train": [tk.uid for tk in takes], "val": [], "test": []},
    }
    return {
        "takes.json": json_bytes(entries),
        "annotations/atomic_descriptions_train.json": json_bytes(
            {"ds_version": f"synthetic-{FORMAT_VERSION}", "annotations": annotations}
        ),
        "annotations/splits.json": json_bytes(splits),
    }


def _take_entry(tk: TakeSpec, k: int, rng) -> dict:
    """The ``takes.json`` record of the ``k``-th pair take."""
    fav, cameras = _frame_aligned_videos(tk, rng)
    capture = f"synth_capture_{k:04d}"
    return {
        "root_dir": f"takes/{tk.name}",
        "take_name": tk.name,
        "take_uid": tk.uid,
        "capture_uid": random_uuid(rng),
        "participant_uid": 1000 + k % 7,
        "is_dropped": False,
        "objects": [],
        "task_id": 9001,
        "task_name": "Tabletop procedure",
        "parent_task_id": 9000,
        "parent_task_name": "Tabletop",
        "take_idx": 0,
        "duration_sec": annotation_time(tk.duration),
        "is_narrated": False,
        "physical_setting_uid": 0,
        "timesync_start_idx": 0,
        "timesync_end_idx": tk.num_frames - 1,
        "validated": True,
        "university_name": "synthetic",
        "frame_aligned_videos": fav,
        "capture": {
            "capture_name": capture,
            "root_dir": f"captures/{capture}",
            "cameras": cameras,
        },
    }


def _frame_aligned_videos(tk: TakeSpec, rng) -> tuple[dict, list[dict]]:
    """A take's ``frame_aligned_videos`` (one stream and clip uid per camera) and its
    capture's ``cameras``: the Aria glasses' rgb stream, GoPro (hero10) exo cameras."""
    fav, cameras = {}, []
    for cam, rel in tk.videos.items():
        ego = cam == EGO_CAMERA
        stream = "rgb" if ego else "0"
        fav[cam] = {
            stream: {
                "cam_id": cam,
                "stream_id": EGO_STREAM if ego else "0",
                "readable_stream_id": stream,
                "clip_uid": random_uuid(rng),
                "relative_path": rel.split(f"takes/{tk.name}/", 1)[1],
            }
        }
        cameras.append(
            {
                "cam_id": cam,
                "is_ego": ego,
                "device_type": "aria" if ego else "hero10",
                "relative_path": f"videos/{cam}.vrs" if ego else f"videos/{cam}.mp4",
            }
        )
    return fav, cameras


def _atomic_annotation(tk: TakeSpec, rng) -> dict:
    """One annotator's timestamped atomic descriptions of a take, each with its best exo."""
    exo = [c for c in tk.cameras if c != EGO_CAMERA]
    descs = []
    for s in tk.steps:
        best = _best_exo(tk, s, exo)
        descs.append(
            {
                "text": narration(tk, s),
                "timestamp": s.timestamp,
                "subject": "C",
                "ego_visible": True,
                "unsure": False,
                "best_exo": {"cam_id": best, "raw_cam_id": best[-1]},
            }
        )
    return {
        "annotation_uid": random_uuid(rng),
        "annotator_id": "synthetic",
        "take_uid": tk.uid,
        "take_name": tk.name,
        "rejected": False,
        "reject_reason": None,
        "descriptions": descs,
    }


def _best_exo(tk: TakeSpec, s: Step, exo: list[str]) -> str:
    """The exo camera nearest the acted-on object (the first one for head motions)."""
    best = exo[0]
    if s.obj is not None and len(exo) > 1:
        p = np.array([tk.objects[s.obj].x, tk.objects[s.obj].y, 0.0])
        best = min(exo, key=lambda c: np.linalg.norm(p - tk.cameras[c]["position"]))
    return best


# ----------------------------------------------------------------------------- EgoClip, exo


_EGOCLIP_HEADER = [
    "clip_idx",
    "video_uid",
    "video_dur",
    "narration_source",
    "narration_ind",
    "narration_time",
    "clip_start",
    "clip_end",
    "clip_text",
    "tag_verb",
    "tag_noun",
]


def egoclip_row(take: TakeSpec, k: int, s: Step) -> dict:
    """EgoClip fields of the ``k``-th step of a take (all but ``clip_idx``)."""
    start, end = clip_window(take, s)
    verbs, nouns = verb_noun_tags(take, s)
    return {
        "video_uid": take.uid,
        "video_dur": annotation_time(take.duration),
        "narration_source": "narration_pass_1",
        "narration_ind": k,
        "narration_time": s.timestamp,
        "clip_start": start,
        "clip_end": end,
        "clip_text": egoclip_text(take, s),
        "tag_verb": str(verbs),
        "tag_noun": str(nouns),
    }


def egoclip_file(takes: list[TakeSpec]) -> dict[str, bytes]:
    """EgoClip layout: egoclip/egoclip.csv, one tab-separated row per step."""
    rows = []
    for tk in takes:
        for k, s in enumerate(tk.steps):
            r = egoclip_row(tk, k, s)
            rows.append([len(rows)] + [r[h] for h in _EGOCLIP_HEADER[1:]])
    return {"egoclip/egoclip.csv": tsv_bytes(_EGOCLIP_HEADER, rows)}


def exo_caption_file(takes: list[TakeSpec], seed: int) -> dict[str, bytes]:
    """exo_web/exo_captions.json: a caption per step and one of the whole video."""
    rng = np.random.default_rng([seed, 102])
    out = []
    for tk in takes:
        video = next(iter(tk.videos.values()))
        caps = []
        for s in tk.steps:
            cap = exo_caption(tk, s, rng)
            caps.append(cap)
            start, end = clip_window(tk, s)
            out.append(
                conversation(
                    f"exo_{len(out):06d}",
                    video,
                    start,
                    end,
                    [(str(rng.choice(CAPTION_PROMPTS)), cap)],
                )
            )
        # one caption of the whole video, as web videos often have
        summary = " Then ".join([caps[0]] + [c[0].lower() + c[1:] for c in caps[1:]])
        out.append(
            conversation(
                f"exo_{len(out):06d}",
                video,
                0.0,
                annotation_time(tk.duration),
                [(str(rng.choice(CAPTION_PROMPTS)), summary)],
            )
        )
    return {"exo_web/exo_captions.json": json_bytes(out)}


# ----------------------------------------------------------------------------- EgoIT


def egoit_file(takes: list[TakeSpec], seed: int) -> dict[str, bytes]:
    """EgoIT-style instructions (VideoLLaMA2 JSON) on the ego clips of training takes."""
    ins = _Instructions(np.random.default_rng([seed, 103]))
    for tk in takes:
        for k in range(len(tk.steps)):
            _ask_about_step(ins, tk, k)
        _ask_count(ins, tk)
    return {"egoit/egoit_instructions.json": json_bytes(ins.records)}


class _Instructions:
    """EgoIT records collected so far; each question's template is drawn from ``rng``."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.records: list[dict] = []

    def ask(self, tk, kind, fmt, answer, t0, t1, extra=None) -> None:
        """Add a ``kind`` question about ``tk``'s ego video from ``t0`` to ``t1`` (clamped)
        answered by ``answer``; ``extra`` is an optional follow-up (question, answer)."""
        q = str(self.rng.choice(EGOIT_TEMPLATES[kind])).format(**fmt)
        turns = [(q, answer)]
        if extra is not None:
            turns.append(extra)
        video = tk.videos[EGO_CAMERA]
        self.records.append(
            conversation(
                f"egoit_{len(self.records):06d}",
                video,
                annotation_time(t0),
                annotation_time(min(t1, tk.duration)),
                turns,
            )
        )
        self.records[-1]["kind"] = kind


def _ask_about_step(ins: _Instructions, tk: TakeSpec, k: int) -> None:
    """The questions about step ``k``: what C does, with what, where to, before / after."""
    rng, steps, s = ins.rng, tk.steps, tk.steps[k]
    if s.is_nav:
        ins.ask(tk, "nav", {}, nav_answer(s).capitalize() + ".", s.t0, s.t1)
        return
    ob = tk.objects[s.obj]
    follow = (str(rng.choice(EGOIT_TEMPLATES["object"])), f"The {ob.name}.")
    ins.ask(
        tk, "doing", {}, f"C {phrase(tk, s)}.", s.t0, s.t1, follow if rng.random() < 0.3 else None
    )
    if rng.random() < 0.5:
        ins.ask(tk, "object", {}, f"The {ob.name}.", s.t0, s.t1)
    else:
        fmt = {"s": ob.shape, "p": verb_form(s.verb, "past")}
        ins.ask(tk, "color", fmt, ob.color.capitalize() + ".", s.t0, s.t1)
    if s.verb == "push":
        where = f"To the {s.direction}." if s.direction != "forward" else "Forward, away from me."
        ins.ask(tk, "direction", {"x": ob.name}, where, s.t0, s.t1)
    if s.verb in ("put down", "put in"):
        where = (
            f"In the {tk.objects[s.target].name}."
            if s.verb == "put in"
            else f"On the {region(s.dest[0])} side of the table.".replace(
                "the middle side of the table", "the middle of the table"
            )
        )
        ins.ask(tk, "where", {"x": ob.name}, where, s.t0 - 1.0, s.t1)
    if k + 1 < len(steps):
        nxt = steps[k + 1]
        before = {"v": phrase(tk, nxt, "ing")}
        ins.ask(tk, "before", before, f"C {phrase(tk, s)}.", s.t0, nxt.t1)
        ins.ask(tk, "after", {"v": phrase(tk, s, "ing")}, f"C {phrase(tk, nxt)}.", s.t0, nxt.t1)


def _ask_count(ins: _Instructions, tk: TakeSpec) -> None:
    """Counting over a window of 2-4 consecutive object actions (no head motion inside)."""
    steps = tk.steps
    n = int(ins.rng.integers(2, 5))
    wins = [a for a in range(len(steps) - n + 1) if not any(x.is_nav for x in steps[a : a + n])]
    if wins:
        a = int(ins.rng.choice(wins))
        ins.ask(
            tk,
            "count",
            {},
            f"{NUMBER_WORDS[n].capitalize()}.",
            steps[a].t0 - 0.1,
            steps[a + n - 1].t1 + 0.1,
        )
