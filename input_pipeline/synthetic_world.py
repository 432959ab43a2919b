"""Synthetic tabletop demo world: procedures, rendering to mp4 and real-format annotations.

A *take* is a camera wearer "C" doing a short procedure (4-8 atomic actions on a table with a
few coloured objects, plus an occasional head turn or step) recorded by a head-mounted
fisheye **ego** camera (``aria01``) and fixed pinhole **exo** cameras (``cam01``..``cam03``),
time-synchronised. Takes are split into disjoint groups that mirror the paper's data regime:

* ``pairs``     synchronized ego+exo takes with timestamped atomic narrations (Ego-Exo4D
                layout: ``takes.json`` + ``annotations/atomic_descriptions_train.json``);
* ``ego``       ego-only takes with narrations (EgoClip ``egoclip/egoclip.csv``; scarce);
* ``exo``       exo-only takes with third-person captions (stand-in for web video-text;
                ``exo_web/exo_captions.json``, VideoLLaMA2 JSON with start/end; plentiful);
* ``heldout``   ego-only takes used only by the EgoBench-style task files in ``egobench/``.

EgoIT-style instructions (``egoit/egoit_instructions.json``) are built on the ego videos of
the ``pairs`` and ``ego`` takes. See ``docs/data.md`` for every file's layout.

CLI: ``python -m input_pipeline.synthetic_world --out DIR --seed S [--takes N]``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import io
import json
import math
import multiprocessing
import os
import secrets
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from input_pipeline import render

__all__ = [
    "COLORS",
    "SHAPES",
    "VERBS",
    "ACTION_CLASSES",
    "TakeSpec",
    "sample_take_spec",
    "simulate",
    "render_take",
    "object_screen_positions",
    "write_mp4",
    "generate_world",
    "main",
]

FORMAT_VERSION = 1
DEFAULT_FPS = 8
DEFAULT_SIZE = 128
DEFAULT_CRF = 14
DEFAULT_PIX_FMT = "yuv444p"
DEFAULT_SPLIT_FRACTIONS = {"pairs": 0.25, "ego": 0.10, "exo": 0.50, "heldout": 0.15}
DEFAULT_NUM_TAKES = 64

# ----------------------------------------------------------------------------- vocabulary

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.12),
    "green": (0.15, 0.68, 0.22),
    "blue": (0.15, 0.32, 0.90),
    "yellow": (0.95, 0.82, 0.12),
    "purple": (0.58, 0.22, 0.72),
}
SHAPES: tuple[str, ...] = ("cup", "bowl", "box", "bottle", "knife")
# Verb classes (EgoClip ``tag_verb`` / EPIC ``verb_class`` index into this tuple).
VERBS: tuple[str, ...] = (
    "pick up",
    "put down",
    "put in",
    "push",
    "pull",
    "pour",
    "shake",
    "touch",
    "turn",
    "step",
)
NAV_VERBS = ("turn", "step")
# Verb forms: third person (narrations), base (imperative), gerund, past.
_FORMS = {
    "pick up": ("picks up", "pick up", "picking up", "picked up"),
    "put down": ("puts down", "put down", "putting down", "put down"),
    "put in": ("puts", "put", "putting", "put"),
    "push": ("pushes", "push", "pushing", "pushed"),
    "pull": ("pulls", "pull", "pulling", "pulled"),
    "pour": ("pours", "pour", "pouring", "poured"),
    "shake": ("shakes", "shake", "shaking", "shook"),
    "touch": ("touches", "touch", "touching", "touched"),
    "turn": ("turns", "turn", "turning", "turned"),
    "step": ("steps", "step", "stepping", "stepped"),
}
_FORM_INDEX = {"3rd": 0, "base": 1, "ing": 2, "past": 3}
POURABLE = ("cup", "bottle")
SHAKEABLE = ("cup", "box", "bottle")
PUSH_DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "forward": (0.0, 1.0)}
NAV_MOTIONS = ("turn left", "turn right", "move forward", "move backward")


def _action_classes() -> tuple[str, ...]:
    out = [f"pick up {s}" for s in SHAPES] + [f"put down {s}" for s in SHAPES]
    out += [f"put {s} in bowl" for s in SHAPES if s != "bowl"]
    out += [f"push {s}" for s in SHAPES] + [f"pull {s}" for s in SHAPES]
    out += [f"pour {s}" for s in POURABLE] + [f"shake {s}" for s in SHAKEABLE]
    out += [f"touch {s}" for s in SHAPES] + list(NAV_MOTIONS)
    return tuple(out)


# Fixed class list of the action-recognition task (Charades-Ego style ``cNNN`` ids).
ACTION_CLASSES: tuple[str, ...] = _action_classes()

_SHIRTS = [(0.18, 0.22, 0.38), (0.26, 0.26, 0.28), (0.12, 0.34, 0.36), (0.36, 0.40, 0.48)]
_PANTS = [(0.16, 0.18, 0.26), (0.22, 0.22, 0.24), (0.28, 0.24, 0.20)]

# Actor and body layout (metres, world frame; see render.py for axes).
ACTOR_Y = -0.30
_REST = np.array([[-0.17, -0.05, 0.09], [0.17, -0.05, 0.09]], np.float32)
_HOLD = np.array([[-0.13, 0.10, 0.20], [0.13, 0.10, 0.20]], np.float32)
_TABLE_X = (-0.42, 0.42)
_TABLE_Y = (0.12, 0.62)
_PUSH_DIST = 0.18
_BASE_DURATION = {
    "pick up": 1.3,
    "put down": 1.3,
    "put in": 1.5,
    "push": 1.4,
    "pull": 1.4,
    "pour": 1.9,
    "shake": 1.4,
    "touch": 1.1,
    "turn": 1.6,
    "step": 1.6,
}
# Exo camera rigs: (position, look-at target, horizontal field of view in degrees).
EXO_RIGS = {
    "cam01": ((-0.95, 1.25, 0.78), (0.0, 0.15, 0.10), 50.0),
    "cam02": ((1.45, -0.05, 0.62), (0.0, 0.18, 0.10), 52.0),
    "cam03": ((0.95, 1.45, 0.95), (0.0, 0.18, 0.08), 52.0),
}
EGO_CAMERA = "aria01"
EGO_STREAM = "214-1"
EGO_FOV_DEG = 62.0


# ----------------------------------------------------------------------------- take specs


@dataclass
class ObjectSpec:
    """An object: colour and shape name, initial base position (x, y) and yaw (radians)."""

    color: str
    shape: str
    x: float
    y: float
    yaw: float

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass
class Step:
    """One atomic action (or head motion) of C, from ``t0`` to ``t1`` seconds."""

    verb: str
    obj: int | None = None  # acted-on object index
    target: int | None = None  # bowl index for "put in" / "pour"
    direction: str | None = None  # push: left/right/forward; turn: left/right; step: fwd/back
    dest: tuple[float, float] | None = None  # where "put down" / "push" / "pull" leave obj
    subtask: int | None = None  # index into TakeSpec.subtasks (None for head motions)
    t0: float = 0.0
    t1: float = 0.0

    @property
    def is_nav(self) -> bool:
        return self.verb in NAV_VERBS

    @property
    def timestamp(self) -> float:
        """Narration time (middle of the action), seconds."""
        return round(0.5 * (self.t0 + self.t1), 4)


@dataclass
class Subtask:
    """A goal-directed group of consecutive steps ("put the red cup in the blue bowl")."""

    kind: str
    goal: str
    steps: list[int] = field(default_factory=list)


@dataclass
class TakeSpec:
    """Everything needed to simulate, render and annotate one take (deterministic)."""

    uid: str
    name: str
    split: str
    index: int
    seed: int
    fps: int
    size: int
    num_frames: int
    objects: list[ObjectSpec]
    steps: list[Step]
    subtasks: list[Subtask]
    cameras: dict[str, dict]  # camera name -> rig (kind, position, target, fov, model)
    videos: dict[str, str]  # camera name -> video path relative to the world root
    shirt: tuple[float, float, float]
    pants: tuple[float, float, float]

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps

    def object_steps(self) -> list[Step]:
        return [s for s in self.steps if not s.is_nav]


def _uuid(rng: np.random.Generator) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def _footprint(shape: str) -> float:
    r, _ = render.object_size(shape)
    return {"cup": r + 0.02, "knife": 0.12}.get(shape, r)


def _free(pos: tuple[float, float], shape: str, others: list[tuple[float, float, str]]) -> bool:
    x, y = pos
    if not (_TABLE_X[0] <= x <= _TABLE_X[1] and _TABLE_Y[0] - 0.04 <= y <= _TABLE_Y[1] + 0.04):
        return False
    return all(
        np.hypot(x - ox, y - oy) >= _footprint(shape) + _footprint(os_) + 0.04
        for ox, oy, os_ in others
    )


def _sample_free(rng, shape, others, tries: int = 200) -> tuple[float, float] | None:
    for _ in range(tries):
        p = (float(rng.uniform(*_TABLE_X)), float(rng.uniform(*_TABLE_Y)))
        if _free(p, shape, others):
            return round(p[0], 4), round(p[1], 4)
    return None


def _region(x: float) -> str:
    return "left" if x < -0.14 else ("right" if x > 0.14 else "middle")


def _sample_objects(rng: np.random.Generator) -> list[ObjectSpec]:
    n = int(rng.integers(3, 6))
    shapes = ["bowl"] if rng.random() < 0.85 else []
    while len(shapes) < n:
        s = str(rng.choice(SHAPES))
        if s == "bowl" and shapes.count("bowl") >= 2:
            continue
        shapes.append(s)
    rng.shuffle(shapes)
    used: set[tuple[str, str]] = set()
    objs: list[ObjectSpec] = []
    placed: list[tuple[float, float, str]] = []
    for s in shapes:
        colors = [c for c in COLORS if (c, s) not in used]
        c = str(rng.choice(colors))
        pos = _sample_free(rng, s, placed)
        if pos is None:
            continue
        used.add((c, s))
        placed.append((*pos, s))
        objs.append(ObjectSpec(c, s, pos[0], pos[1], round(float(rng.uniform(-np.pi, np.pi)), 4)))
    return objs


class _PlanState:
    """Where objects are while a procedure is being planned."""

    def __init__(self, objs: list[ObjectSpec]):
        self.objs = objs
        self.pos = {i: (o.x, o.y) for i, o in enumerate(objs)}
        self.inside: dict[int, int] = {}  # object -> bowl it was put in

    def others(self, skip: int) -> list[tuple[float, float, str]]:
        return [
            (*self.pos[j], self.objs[j].shape)
            for j in self.pos
            if j != skip and j not in self.inside
        ]

    def movable(self) -> list[int]:
        full = set(self.inside.values())
        return [i for i in self.pos if i not in self.inside and i not in full]

    def bowls(self, skip: int) -> list[int]:
        return [
            i
            for i, o in enumerate(self.objs)
            if o.shape == "bowl" and i != skip and i not in self.inside
        ]


def _plan_subtask(rng, st: _PlanState, budget: int) -> Subtask | None:
    """Pick one feasible goal-directed subtask of at most ``budget`` steps (mutates ``st``)."""
    kinds = ["put_in", "pour", "push", "pull", "check", "touch"]
    weights = np.array([3.0, 2.0, 2.5, 1.5, 1.5, 0.5])
    order = rng.choice(len(kinds), size=len(kinds), replace=False, p=weights / weights.sum())
    movable = st.movable()
    for k in order:
        kind = kinds[int(k)]
        cand = list(rng.permutation(movable)) if movable else []
        for i in (int(c) for c in cand):
            ob = st.objs[i]
            n = ob.name
            if kind == "put_in" and budget >= 2 and ob.shape != "bowl" and st.bowls(i):
                b = int(rng.choice(st.bowls(i)))
                st.inside[i] = b
                st.pos[i] = st.pos[b]
                goal = f"put the {n} in the {st.objs[b].name}"
                return Subtask(
                    kind,
                    goal,
                    [("pick up", i, None, None, None), ("put in", i, b, None, st.pos[b])],
                )
            if kind == "pour" and budget >= 3 and ob.shape in POURABLE and st.bowls(i):
                b = int(rng.choice(st.bowls(i)))
                goal = f"pour the {n} into the {st.objs[b].name}"
                back = st.pos[i]
                return Subtask(
                    kind,
                    goal,
                    [
                        ("pick up", i, None, None, None),
                        ("pour", i, b, None, None),
                        ("put down", i, None, None, back),
                    ],
                )
            if kind in ("push", "pull"):
                dirs = ["left", "right", "forward"] if kind == "push" else ["closer"]
                for dname in rng.permutation(dirs):
                    v = PUSH_DIRECTIONS.get(str(dname), (0.0, -1.0))
                    dest = (
                        round(st.pos[i][0] + _PUSH_DIST * v[0], 4),
                        round(st.pos[i][1] + _PUSH_DIST * v[1], 4),
                    )
                    if _free(dest, ob.shape, st.others(i)):
                        st.pos[i] = dest
                        if kind == "push":
                            where = {
                                "left": "to the left",
                                "right": "to the right",
                                "forward": "away",
                            }[str(dname)]
                            goal = f"move the {n} {where}"
                        else:
                            goal = f"bring the {n} closer"
                        return Subtask(kind, goal, [(kind, i, None, str(dname), dest)])
            if kind == "check" and budget >= 4 and ob.shape in SHAKEABLE:
                old = _region(st.pos[i][0])
                dest = None
                for _ in range(20):
                    cand_pos = _sample_free(rng, ob.shape, st.others(i), tries=30)
                    if cand_pos is not None and _region(cand_pos[0]) != old:
                        dest = cand_pos
                        break
                if dest is None:
                    continue
                st.pos[i] = dest
                goal = f"check the {n} and set it aside"
                return Subtask(
                    kind,
                    goal,
                    [
                        ("touch", i, None, None, None),
                        ("pick up", i, None, None, None),
                        ("shake", i, None, None, None),
                        ("put down", i, None, None, dest),
                    ],
                )
            if kind == "touch":
                return Subtask(kind, f"touch the {n}", [("touch", i, None, None, None)])
    return None


def _plan_procedure(rng, objs: list[ObjectSpec], target: int) -> tuple[list[Subtask], list]:
    """Subtasks (with raw step tuples) totalling up to ``target`` steps."""
    st = _PlanState(objs)
    subtasks: list[Subtask] = []
    raw_steps: list[tuple] = []
    for _ in range(12):
        if len(raw_steps) >= target:
            break
        sub = _plan_subtask(rng, st, target - len(raw_steps))
        if sub is None:
            break
        sub_steps = sub.steps
        sub.steps = list(range(len(raw_steps), len(raw_steps) + len(sub_steps)))
        raw_steps.extend((*x, len(subtasks)) for x in sub_steps)
        subtasks.append(sub)
    return subtasks, raw_steps


def sample_take_spec(
    seed: int,
    split: str = "pairs",
    index: int = 0,
    *,
    fps: int = DEFAULT_FPS,
    size: int = DEFAULT_SIZE,
    nav_events: tuple[int, int] | None = None,
    exo_cameras: tuple[str, ...] | None = None,
) -> TakeSpec:
    """Sample one take deterministically from ``seed``.

    ``split`` decides which cameras are rendered and where the videos live (``pairs``: ego +
    cam01 + cam02; ``ego`` / ``heldout``: ego only; ``exo``: one random exo camera).
    ``nav_events`` is the (min, max) number of narrated head motions (turn / step).
    """
    if split not in DEFAULT_SPLIT_FRACTIONS:
        raise ValueError(
            f"unknown split {split!r}; expected one of {list(DEFAULT_SPLIT_FRACTIONS)}"
        )
    rng = np.random.default_rng(seed)
    uid = _uuid(rng)
    for _ in range(50):  # re-sample the table until a 4-8 step procedure fits on it
        objs = _sample_objects(rng)
        subtasks, raw_steps = _plan_procedure(rng, objs, int(rng.integers(4, 9)))
        if len(raw_steps) >= 4:
            break
    else:  # pragma: no cover - practically unreachable
        raise RuntimeError(f"could not plan a procedure for seed {seed}")
    steps = [Step(v, o, b, d, dest, k) for v, o, b, d, dest, k in raw_steps]
    # narrated head motions between subtasks (held-out takes always have one: navigation QA)
    lo, hi = nav_events or ((1, 2) if split == "heldout" else (0, 2))
    n_nav = int(rng.integers(lo, hi + 1))
    slots = sorted(
        rng.choice(len(subtasks) + 1, size=min(n_nav, len(subtasks) + 1), replace=False).tolist()
    )
    boundaries = [0] + [s.steps[-1] + 1 for s in subtasks]
    for j in reversed(slots):
        motion = str(rng.choice(NAV_MOTIONS))
        verb = "turn" if motion.startswith("turn") else "step"
        direction = motion.split()[1]
        steps.insert(boundaries[j], Step(verb, direction=direction))
    # re-index subtask step lists after the insertions
    pos = 0
    for k, sub in enumerate(subtasks):
        sub.steps = []
        while pos < len(steps):
            if steps[pos].subtask == k:
                sub.steps.append(pos)
            elif sub.steps:
                break
            pos += 1
    # timing
    t = 0.5
    for s in steps:
        d = _BASE_DURATION[s.verb] * float(rng.uniform(0.9, 1.15))
        s.t0, s.t1 = round(t, 4), round(t + d, 4)
        t += d + 0.15
    num_frames = int(np.ceil((t + 0.35) * fps))
    # cameras
    cams: dict[str, dict] = {}
    if split in ("pairs", "ego", "heldout"):
        cams[EGO_CAMERA] = {
            "kind": "ego",
            "model": "fisheye",
            "fov": EGO_FOV_DEG,
            "phase": float(rng.uniform(0, 2 * np.pi)),
            "noise_seed": int(rng.integers(2**31)),
        }
    if split == "pairs":
        exo_names = exo_cameras or ("cam01", "cam02")
    elif split == "exo":
        exo_names = exo_cameras or (str(rng.choice(sorted(EXO_RIGS))),)
    else:
        exo_names = exo_cameras or ()
    for name in exo_names:
        pos, tgt, fov = EXO_RIGS[name]
        cams[name] = {
            "kind": "exo",
            "model": "pinhole",
            "fov": fov,
            "position": [round(float(v), 4) for v in np.add(pos, rng.normal(0, 0.04, 3))],
            "target": [round(float(v), 4) for v in np.add(tgt, rng.normal(0, 0.015, 3))],
        }
    name = f"synth_{split}_{index:04d}"
    videos = _video_paths(split, name, uid, cams)
    return TakeSpec(
        uid=uid,
        name=name,
        split=split,
        index=index,
        seed=int(seed),
        fps=fps,
        size=size,
        num_frames=num_frames,
        objects=objs,
        steps=steps,
        subtasks=subtasks,
        cameras=cams,
        videos=videos,
        shirt=_SHIRTS[int(rng.integers(len(_SHIRTS)))],
        pants=_PANTS[int(rng.integers(len(_PANTS)))],
    )


def _video_paths(split: str, name: str, uid: str, cams: dict) -> dict[str, str]:
    out = {}
    for cam in cams:
        if split == "pairs":
            fname = f"{cam}_{EGO_STREAM}.mp4" if cam == EGO_CAMERA else f"{cam}.mp4"
            out[cam] = f"takes/{name}/frame_aligned_videos/{fname}"
        elif split == "ego":
            out[cam] = f"egoclip/videos/{uid}.mp4"
        elif split == "exo":
            out[cam] = f"exo_web/videos/{uid}.mp4"
        else:
            out[cam] = f"egobench/videos/{uid}.mp4"
    return out


# ----------------------------------------------------------------------------- simulation


class _Track:
    """Piecewise smooth-step interpolation between keyframes (value held outside them)."""

    def __init__(self, value):
        self.times = [0.0]
        self.values = [np.asarray(value, np.float32)]

    @property
    def last(self) -> np.ndarray:
        return self.values[-1]

    def key(self, t: float, value=None) -> None:
        """Add a keyframe at ``t`` (>= the last one); ``None`` holds the current value."""
        v = self.last if value is None else np.asarray(value, np.float32)
        if t < self.times[-1] - 1e-9:
            raise ValueError("keyframes must be added in time order")
        self.times.append(float(t))
        self.values.append(v)

    def sample(self, times: np.ndarray) -> np.ndarray:
        ts = np.asarray(self.times)
        vs = np.stack(self.values)
        i = np.clip(np.searchsorted(ts, times, side="right") - 1, 0, len(ts) - 1)
        j = np.minimum(i + 1, len(ts) - 1)
        span = np.maximum(ts[j] - ts[i], 1e-9)
        u = np.clip((times - ts[i]) / span, 0.0, 1.0)
        u = u * u * (3.0 - 2.0 * u)
        u = u.reshape(u.shape + (1,) * (vs.ndim - 1))
        return (vs[i] + u * (vs[j] - vs[i])).astype(np.float32)


@dataclass
class Timeline:
    """Per-frame state of a take: positions ``float32[T, ...]`` at times ``float[T]``."""

    times: np.ndarray  # [T]
    hands: np.ndarray  # [T, 2, 3]
    objects: np.ndarray  # [T, N, 3] base centres
    head_yaw: np.ndarray  # [T]
    actor_dy: np.ndarray  # [T]
    gaze: np.ndarray  # [T, 3]
    streams: list[list[tuple[int, int]]]  # per frame: (object, bowl) being poured


def _grasp(shape: str, side: int) -> np.ndarray:
    """Offset from an object's base centre to the palm holding it (``side`` 0 left, 1 right)."""
    r, h = render.object_size(shape)
    sgn = 1.0 if side else -1.0
    if shape == "knife":
        return np.array([sgn * 0.035, -0.03, 0.04], np.float32)
    return np.array([sgn * (r + 0.03), -0.01, 0.55 * h], np.float32)


class _Choreography:
    """Keyframes of hands, objects, head and gaze, added action by action."""

    def __init__(self, take: TakeSpec):
        self.take = take
        self.hands = [_Track(_REST[0]), _Track(_REST[1])]
        self.objs = [_Track((o.x, o.y, 0.0)) for o in take.objects]
        self.yaw, self.dy = _Track(0.0), _Track(0.0)
        self.gaze = _Track((0.0, 0.32, 0.02))
        self.holder: dict[int, int] = {}  # object -> index of the hand holding it
        self.pours: list[tuple[float, float, int, int]] = []  # (t0, t1, object, bowl)
        self.shakes: list[tuple[float, float, int, int]] = []  # (t0, t1, hand, object)

    def add(self, s: Step) -> None:
        for tr in (*self.hands, *self.objs, self.yaw, self.dy, self.gaze):
            tr.key(s.t0)  # hold everything still up to the start of the action
        at = lambda f: s.t0 + f * (s.t1 - s.t0)  # noqa: E731  (fraction -> time)
        if s.is_nav:
            self._nav(s, at)
            return
        p = self.objs[s.obj].last.copy()
        side = self.holder.get(s.obj, 1 if p[0] >= 0 else 0)  # the nearer hand
        g = _grasp(self.take.objects[s.obj].shape, side)
        verb = {"put in": "put down", "pull": "push"}.get(s.verb, s.verb)
        getattr(self, "_" + verb.replace(" ", "_"))(s, at, p, side, g)

    def _nav(self, s: Step, at) -> None:
        sgn = 1.0 if s.direction in ("left", "forward") else -1.0
        peak = 0.75 * sgn if s.verb == "turn" else 0.0  # head yaw, radians (43 degrees)
        shift = 0.14 * sgn if s.verb == "step" else 0.0  # body shift along y, metres
        for f, amount in ((0.4, 1.0), (0.7, 1.0), (1.0, 0.0)):
            self.yaw.key(at(f), peak * amount)
            self.dy.key(at(f), shift * amount)
            for k in (0, 1):
                self.hands[k].key(at(f), _REST[k] + [0.0, shift * amount, 0.0])

    def _pick_up(self, s: Step, at, p, side: int, g) -> None:
        hand, obj = self.hands[side], self.objs[s.obj]
        self.gaze.key(at(0.25), p)
        hand.key(at(0.4), p + g + [0, 0, 0.07])
        hand.key(at(0.55), p + g)
        obj.key(at(0.55), p)
        hand.key(s.t1, _HOLD[side])
        obj.key(s.t1, _HOLD[side] - g)  # from the grasp on, the object moves with the hand
        self.holder[s.obj] = side

    def _put_down(self, s: Step, at, p, side: int, g) -> None:
        if s.verb == "put in":
            q = self.objs[s.target].last + [0.0, 0.0, 0.012]
        else:
            q = np.array([s.dest[0], s.dest[1], 0.0], np.float32)
        hand, obj = self.hands[side], self.objs[s.obj]
        self.gaze.key(at(0.25), q)
        hand.key(at(0.55), q + g + [0, 0, 0.06])
        obj.key(at(0.55), q + [0, 0, 0.06])
        hand.key(at(0.7), q + g)
        obj.key(at(0.7), q)
        hand.key(s.t1, _REST[side])
        self.holder.pop(s.obj, None)

    def _push(self, s: Step, at, p, side: int, g) -> None:
        v = np.array([s.dest[0], s.dest[1], 0.0], np.float32) - p
        vhat = v / max(float(np.linalg.norm(v)), 1e-6)
        # the hand comes in behind the object (opposite the motion) and slides with it
        contact = p - vhat * (_footprint(self.take.objects[s.obj].shape) + 0.045)
        contact = contact + [0, 0, 0.04]
        hand, obj = self.hands[side], self.objs[s.obj]
        self.gaze.key(at(0.2), p)
        hand.key(at(0.35), contact + [0, 0, 0.05])
        hand.key(at(0.45), contact)
        obj.key(at(0.45), p)
        hand.key(at(0.85), contact + v)
        obj.key(at(0.85), p + v)
        self.gaze.key(at(0.8), p + v)
        hand.key(s.t1, _REST[side])

    def _touch(self, s: Step, at, p, side: int, g) -> None:
        _, h = render.object_size(self.take.objects[s.obj].shape)
        top = p + [0.0, -0.02, h]
        hand = self.hands[side]
        self.gaze.key(at(0.25), p)
        hand.key(at(0.4), top + [0, 0, 0.08])
        hand.key(at(0.5), top + [0, 0, 0.03])
        hand.key(at(0.62), top + [0, 0, 0.09])
        hand.key(s.t1, _REST[side])

    def _pour(self, s: Step, at, p, side: int, g) -> None:
        b = self.objs[s.target].last
        _, hb = render.object_size("bowl")
        pour_at = b + [(0.10 if side else -0.10), -0.04, hb + 0.05]  # beside, above the bowl
        hand, obj = self.hands[side], self.objs[s.obj]
        self.gaze.key(at(0.25), b)
        for f in (0.4, 0.8):
            hand.key(at(f), pour_at + g)
            obj.key(at(f), pour_at)
        hand.key(s.t1, _HOLD[side])
        obj.key(s.t1, _HOLD[side] - g)
        self.pours.append((at(0.45), at(0.78), s.obj, s.target))

    def _shake(self, s: Step, at, p, side: int, g) -> None:
        self.shakes.append((at(0.1), at(0.9), side, s.obj))  # oscillation added when sampling

    def timeline(self, times: np.ndarray) -> Timeline:
        hands = np.stack([self.hands[0].sample(times), self.hands[1].sample(times)], 1)
        n = len(self.objs)
        objs = (
            np.stack([tr.sample(times) for tr in self.objs], 1)
            if n
            else np.zeros((len(times), 0, 3), np.float32)
        )
        for ta, tb, side, o in self.shakes:
            env = np.sin(np.pi * np.clip((times - ta) / (tb - ta), 0.0, 1.0))
            tau = times - ta
            off = np.stack(
                [
                    0.035 * env * np.sin(2 * np.pi * 3.5 * tau),
                    np.zeros_like(tau),
                    0.025 * env * np.sin(2 * np.pi * 7.0 * tau),
                ],
                -1,
            ).astype(np.float32)
            hands[:, side] += off
            objs[:, o] += off
        streams: list[list[tuple[int, int]]] = [[] for _ in times]
        for ta, tb, o, b in self.pours:
            for i in np.nonzero((times >= ta) & (times <= tb))[0]:
                streams[int(i)].append((o, b))
        return Timeline(
            times=times,
            hands=hands,
            objects=objs,
            head_yaw=self.yaw.sample(times),
            actor_dy=self.dy.sample(times),
            gaze=self.gaze.sample(times),
            streams=streams,
        )


def simulate(take: TakeSpec) -> Timeline:
    """Hands, objects, head and gaze for every frame of ``take``."""
    ch = _Choreography(take)
    for s in take.steps:
        ch.add(s)
    return ch.timeline(np.arange(take.num_frames, dtype=np.float64) / take.fps)


# ----------------------------------------------------------------------------- rendering


def _exo_camera(rig: dict, size: int) -> render.Camera:
    pos = np.asarray(rig["position"], np.float32)
    f = (size / 2) / np.tan(np.deg2rad(rig["fov"] / 2))
    return render.Camera(
        pos, render.look_rotation(np.asarray(rig["target"]) - pos), f, size, "pinhole"
    )


def _ego_cameras(take: TakeSpec, tl: Timeline) -> list[render.Camera]:
    """Head-mounted camera per frame: follows the gaze, turns with the head, rolls and jitters."""
    rig = take.cameras[EGO_CAMERA]
    rng = np.random.default_rng(rig["noise_seed"])
    n = len(tl.times)
    # AR(1)-smoothed jitter: small head tremor rather than white noise
    raw = rng.normal(0.0, 1.0, (n, 6)).astype(np.float32)
    jit = np.zeros_like(raw)
    for i in range(n):
        jit[i] = (0.6 * jit[i - 1] if i else 0.0) + raw[i]
    f = (take.size / 2) / np.deg2rad(rig["fov"] / 2)
    cams = []
    for i, t in enumerate(tl.times):
        eye = np.array([0.0, ACTOR_Y + 0.10 + tl.actor_dy[i], 0.62], np.float32)
        eye = eye + 0.004 * jit[i, :3]
        fwd = tl.gaze[i] + [0.0, 0.04, 0.0] - eye
        yaw = tl.head_yaw[i] + 0.012 * jit[i, 3]
        c, s = np.cos(yaw), np.sin(yaw)
        fwd = np.array([c * fwd[0] - s * fwd[1], s * fwd[0] + c * fwd[1], fwd[2]], np.float32)
        pitch = 0.03 * np.sin(2 * np.pi * 0.4 * t + rig["phase"]) + 0.012 * jit[i, 4]
        horiz = float(np.hypot(fwd[0], fwd[1]))
        ang = np.arctan2(fwd[2], horiz) + pitch
        fwd = np.array([fwd[0] / horiz * np.cos(ang), fwd[1] / horiz * np.cos(ang), np.sin(ang)])
        roll = 0.10 * np.sin(2 * np.pi * 0.23 * t + rig["phase"]) + 0.015 * jit[i, 5]
        cams.append(render.Camera(eye, render.look_rotation(fwd, roll), f, take.size, "fisheye"))
    return cams


def _scene(take: TakeSpec, tl: Timeline, i: int) -> render.SceneState:
    dyv = float(tl.actor_dy[i])
    objs = []
    for k, o in enumerate(take.objects):
        objs.append(render.ObjectState(o.shape, COLORS[o.color], tl.objects[i, k], o.yaw))
    streams = []
    for o, b in tl.streams[i]:
        op, bp = tl.objects[i, o], tl.objects[i, b]
        r, h = render.object_size(take.objects[o].shape)
        to_bowl = (bp - op)[:2]
        to_bowl = to_bowl / max(float(np.linalg.norm(to_bowl)), 1e-6)
        lip = op + [to_bowl[0] * r, to_bowl[1] * r, h]
        streams.append((lip, bp + [0.0, 0.0, 0.04]))
    return render.SceneState(
        objects=objs,
        hands=tl.hands[i],
        shoulders=np.array([[-0.19, ACTOR_Y + dyv, 0.38], [0.19, ACTOR_Y + dyv, 0.38]], np.float32),
        head=np.array([0.0, ACTOR_Y + dyv, 0.58], np.float32),
        head_yaw=float(tl.head_yaw[i]),
        hip=np.array([0.0, ACTOR_Y + dyv, -0.10], np.float32),
        shirt=take.shirt,
        pants=take.pants,
        streams=streams,
    )


def render_take(
    take: TakeSpec,
    camera: str,
    *,
    ss: int = 2,
    timeline: Timeline | None = None,
    indices: np.ndarray | list[int] | None = None,
) -> np.ndarray:
    """Render the frames of ``take`` from ``camera`` (``"aria01"`` / ``"ego"`` or an exo
    camera name of the take): ``uint8[T, size, size, 3]``, every frame or only the frames
    ``indices`` (``T = len(indices)``; the same pixels as in the full render)."""
    camera = EGO_CAMERA if camera == "ego" else camera
    if camera not in take.cameras:
        raise KeyError(f"take {take.name} has no camera {camera!r}; it has {list(take.cameras)}")
    tl = timeline or simulate(take)
    frames = range(take.num_frames) if indices is None else [int(i) for i in indices]
    out = np.empty((len(frames), take.size, take.size, 3), np.uint8)
    rig = take.cameras[camera]
    if rig["kind"] == "ego":
        cams = _ego_cameras(take, tl)  # all of them: the head jitter is a running process
        for k, i in enumerate(frames):
            out[k] = render.render_scene(
                _scene(take, tl, i),
                cams[i],
                ss=ss,
                body=False,
                tint=(1.06, 1.0, 0.90),
                vignette=0.45,
            )
    else:
        cam = _exo_camera(rig, take.size)
        bg = render.render_background(cam, ss)
        for k, i in enumerate(frames):
            out[k] = render.render_scene(_scene(take, tl, i), cam, ss=ss, background=bg)
    return out


def object_screen_positions(
    take: TakeSpec,
    camera: str,
    *,
    timeline: Timeline | None = None,
    indices: np.ndarray | list[int] | None = None,
) -> np.ndarray:
    """Where the centre of each object of ``take`` appears in the frames of ``camera`` (every
    frame or only ``indices``, as :func:`render_take`): ``float32[T, N, 2]``, (x, y) in [0, 1)
    image coordinates (x to the right, y down), NaN where the centre is behind the camera or
    off the image. Occlusion is not checked: an object under the hand still has a position."""
    camera = EGO_CAMERA if camera == "ego" else camera
    if camera not in take.cameras:
        raise KeyError(f"take {take.name} has no camera {camera!r}; it has {list(take.cameras)}")
    tl = timeline or simulate(take)
    frames = range(take.num_frames) if indices is None else [int(i) for i in indices]
    rig = take.cameras[camera]
    per_frame = _ego_cameras(take, tl) if rig["kind"] == "ego" else None
    fixed = None if per_frame is not None else _exo_camera(rig, take.size)
    lift = np.array(
        [[0.0, 0.0, render.object_size(o.shape)[1] / 2] for o in take.objects], np.float32
    )
    out = np.full((len(frames), len(take.objects), 2), np.nan, np.float32)
    for k, i in enumerate(frames):
        cam = fixed if per_frame is None else per_frame[i]
        uv, in_front = cam.project(tl.objects[i] + lift, 1)
        uv = uv / take.size
        ok = in_front & np.all((uv >= 0.0) & (uv < 1.0), axis=1)
        out[k, ok] = uv[ok]
    return out


def write_mp4(
    path: str | os.PathLike,
    frames: np.ndarray,
    fps: int,
    *,
    crf: int = DEFAULT_CRF,
    pix_fmt: str = DEFAULT_PIX_FMT,
    gop: int | None = None,
) -> None:
    """Encode ``uint8[T, H, W, 3]`` RGB frames as H.264 mp4 (single-threaded: reproducible)."""
    t, h, w, _ = frames.shape
    with av.open(str(path), "w", format="mp4") as container:
        st = container.add_stream("libx264", rate=Fraction(fps))
        st.width, st.height, st.pix_fmt = w, h, pix_fmt
        st.time_base = Fraction(1, fps)
        st.codec_context.thread_count = 1
        gop = gop or 2 * fps  # short GOPs so that seeking to a clip start is cheap
        # mbtree=0: with x264's macroblock-tree lookahead, identical input gave different
        # bitstreams from run to run (measured); without it the output is byte-identical.
        params = f"keyint={gop}:min-keyint={gop}:scenecut=0:mbtree=0"
        st.codec_context.options = {"crf": str(crf), "preset": "faster", "x264-params": params}
        for i in range(t):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgb24")
            frame.pts = i
            container.mux(st.encode(frame))
        container.mux(st.encode(None))


def _render_job(args: tuple[TakeSpec, str, int, int, str]) -> str:
    """Render and encode every camera of one take into ``root`` (worker entry point)."""
    take, root, crf, ss, pix_fmt = args
    tl = simulate(take)
    for cam, rel in take.videos.items():
        path = Path(root) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        write_mp4(
            path, render_take(take, cam, ss=ss, timeline=tl), take.fps, crf=crf, pix_fmt=pix_fmt
        )
    return take.uid


# ----------------------------------------------------------------------------- language


def phrase(take: TakeSpec, s: Step, form: str = "3rd", articles: bool = True) -> str:
    """Verb phrase of a step without the subject: "picks up the red cup"."""
    v = _FORMS[s.verb][_FORM_INDEX[form]]
    the = "the " if articles else ""
    if s.verb == "turn":
        return f"{v} to the {s.direction}" if articles else f"{v} {s.direction}"
    if s.verb == "step":
        return f"{v} {'forward' if s.direction == 'forward' else 'back'}"
    x = take.objects[s.obj].name
    if s.verb == "put in":
        return f"{v} {the}{x} in {the}{take.objects[s.target].name}"
    if s.verb == "pour":
        return f"{v} {the}{x} into {the}{take.objects[s.target].name}"
    if s.verb == "push":
        return f"{v} {the}{x} {s.direction}"
    if s.verb == "pull":
        return f"{v} {the}{x} closer"
    return f"{v} {the}{x}"


def narration(take: TakeSpec, s: Step) -> str:
    """Ego-Exo4D style atomic description: "C picks up the red cup."."""
    return f"C {phrase(take, s)}."


def egoclip_text(take: TakeSpec, s: Step) -> str:
    """EgoClip style narration: "#C C picks up the red cup"."""
    return f"#C C {phrase(take, s)}"


def imperative(take: TakeSpec, s: Step) -> str:
    """EPIC-KITCHENS / EgoPlan style narration: "pick up red cup"."""
    return phrase(take, s, "base", articles=False)


def action_class(take: TakeSpec, s: Step) -> int:
    """Index into :data:`ACTION_CLASSES`."""
    if s.verb == "turn":
        name = f"turn {s.direction}"
    elif s.verb == "step":
        name = "move forward" if s.direction == "forward" else "move backward"
    else:
        shape = take.objects[s.obj].shape
        name = {"put in": f"put {shape} in bowl"}.get(s.verb, f"{s.verb} {shape}")
    return ACTION_CLASSES.index(name)


def _tags(take: TakeSpec, s: Step) -> tuple[list[int], list[int]]:
    nouns = [] if s.is_nav else [SHAPES.index(take.objects[s.obj].shape)]
    if s.target is not None:
        nouns.append(SHAPES.index("bowl"))
    return [VERBS.index(s.verb)], nouns


def _nouns(take: TakeSpec, s: Step) -> list[str]:
    """Object instances (colour + shape) a step involves."""
    if s.is_nav:
        return []
    out = [take.objects[s.obj].name]
    if s.target is not None:
        out.append(take.objects[s.target].name)
    return out


_EXO_CAPTION = {
    "pick up": [
        "A person picks up {a} {x} from the table.",
        "Someone lifts {a} {x}.",
        "A pair of hands grabs {a} {x} and raises it.",
    ],
    "put down": [
        "A person puts {a} {x} down on the table.",
        "Someone sets {a} {x} down.",
        "The {x} is placed back on the table by a person.",
    ],
    "put in": [
        "A person places {a} {x} into {a2} {b}.",
        "Someone drops {a} {x} in {a2} {b}.",
        "The {x} is put inside the {b}.",
    ],
    "push": [
        "A person pushes {a} {x} {d}.",
        "Someone slides {a} {x} {d} across the table.",
        "The {x} is pushed {d}.",
    ],
    "pull": [
        "A person pulls {a} {x} towards themselves.",
        "Someone drags {a} {x} closer.",
        "The {x} is pulled towards the person.",
    ],
    "pour": [
        "A person pours from {a} {x} into {a2} {b}.",
        "Liquid is poured from the {x} into the {b}.",
        "Someone tips {a} {x} over {a2} {b} and pours.",
    ],
    "shake": [
        "A person shakes {a} {x}.",
        "Someone shakes {a} {x} in their hand.",
        "The {x} is shaken.",
    ],
    "touch": [
        "A person touches {a} {x}.",
        "Someone taps {a} {x} on the table.",
        "A hand briefly touches the {x}.",
    ],
    "turn": [
        "A person turns their head to the {d}.",
        "Someone looks to the {d}.",
        "The person glances {d}.",
    ],
    "step": ["A person steps {d}.", "Someone takes a step {d}.", "The person moves {d}."],
}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def exo_caption(take: TakeSpec, s: Step, rng: np.random.Generator) -> str:
    """Third-person, web-style caption of a step (the exo corpus's language)."""
    tmpl = str(rng.choice(_EXO_CAPTION[s.verb]))
    x = take.objects[s.obj].name if s.obj is not None else ""
    b = take.objects[s.target].name if s.target is not None else ""
    d = s.direction or ""
    if s.verb == "step":
        d = "forward" if d == "forward" else "back"
    elif s.verb == "push" and d == "forward":
        d = "away"
    elif s.verb == "push":
        d = f"to the {d}"
    return tmpl.format(a=_article(x) if x else "", x=x, a2=_article(b) if b else "", b=b, d=d)


# ----------------------------------------------------------------------------- corpora


def _t(x: float) -> float:
    """A time for an annotation file: 4 decimals, rounded down (never past the video end)."""
    return math.floor(max(x, 0.0) * 1e4) / 1e4


def _clip_window(take: TakeSpec, s: Step) -> tuple[float, float]:
    """Clip boundaries of a step, clamped to the video."""
    return _t(s.t0), _t(min(s.t1, take.duration))


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode()


def _tsv_bytes(header: list[str], rows: list[list], delimiter: str = "\t") -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, delimiter=delimiter, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue().encode()


def _egoexo_files(takes: list[TakeSpec], seed: int) -> dict[str, bytes]:
    """Ego-Exo4D layout: takes.json, annotations/atomic_descriptions_train.json, splits.json."""
    rng = np.random.default_rng([seed, 101])
    entries, annotations = [], {}
    for k, tk in enumerate(takes):
        fav = {}
        cameras = []
        for cam, rel in tk.videos.items():
            rel_in_take = rel.split(f"takes/{tk.name}/", 1)[1]
            if cam == EGO_CAMERA:
                fav[cam] = {
                    "rgb": {
                        "cam_id": cam,
                        "stream_id": EGO_STREAM,
                        "readable_stream_id": "rgb",
                        "clip_uid": _uuid(rng),
                        "relative_path": rel_in_take,
                    }
                }
                cameras.append(
                    {
                        "cam_id": cam,
                        "is_ego": True,
                        "device_type": "aria",
                        "relative_path": f"videos/{cam}.vrs",
                    }
                )
            else:
                fav[cam] = {
                    "0": {
                        "cam_id": cam,
                        "stream_id": "0",
                        "readable_stream_id": "0",
                        "clip_uid": _uuid(rng),
                        "relative_path": rel_in_take,
                    }
                }
                cameras.append(
                    {
                        "cam_id": cam,
                        "is_ego": False,
                        "device_type": "hero10",
                        "relative_path": f"videos/{cam}.mp4",
                    }
                )
        capture = f"synth_capture_{k:04d}"
        entries.append(
            {
                "root_dir": f"takes/{tk.name}",
                "take_name": tk.name,
                "take_uid": tk.uid,
                "capture_uid": _uuid(rng),
                "participant_uid": 1000 + k % 7,
                "is_dropped": False,
                "objects": [],
                "task_id": 9001,
                "task_name": "Tabletop procedure",
                "parent_task_id": 9000,
                "parent_task_name": "Tabletop",
                "take_idx": 0,
                "duration_sec": _t(tk.duration),
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
        )
        exo = [c for c in tk.cameras if c != EGO_CAMERA]
        descs = []
        for s in tk.steps:
            best = exo[0]
            if s.obj is not None and len(exo) > 1:
                p = np.array([tk.objects[s.obj].x, tk.objects[s.obj].y, 0.0])
                best = min(exo, key=lambda c: np.linalg.norm(p - tk.cameras[c]["position"]))
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
        annotations[tk.uid] = [
            {
                "annotation_uid": _uuid(rng),
                "annotator_id": "synthetic",
                "take_uid": tk.uid,
                "take_name": tk.name,
                "rejected": False,
                "reject_reason": None,
                "descriptions": descs,
            }
        ]
    splits = {
        "take_uid_to_split": {tk.uid: "train" for tk in takes},
        "split_to_take_uids": {"train": [tk.uid for tk in takes], "val": [], "test": []},
    }
    return {
        "takes.json": _json_bytes(entries),
        "annotations/atomic_descriptions_train.json": _json_bytes(
            {"ds_version": f"synthetic-{FORMAT_VERSION}", "annotations": annotations}
        ),
        "annotations/splits.json": _json_bytes(splits),
    }


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


def _egoclip_row(take: TakeSpec, k: int, s: Step) -> dict:
    start, end = _clip_window(take, s)
    verbs, nouns = _tags(take, s)
    return {
        "video_uid": take.uid,
        "video_dur": _t(take.duration),
        "narration_source": "narration_pass_1",
        "narration_ind": k,
        "narration_time": s.timestamp,
        "clip_start": start,
        "clip_end": end,
        "clip_text": egoclip_text(take, s),
        "tag_verb": str(verbs),
        "tag_noun": str(nouns),
    }


def _egoclip_file(takes: list[TakeSpec]) -> dict[str, bytes]:
    rows = []
    for tk in takes:
        for k, s in enumerate(tk.steps):
            r = _egoclip_row(tk, k, s)
            rows.append([len(rows)] + [r[h] for h in _EGOCLIP_HEADER[1:]])
    return {"egoclip/egoclip.csv": _tsv_bytes(_EGOCLIP_HEADER, rows)}


_CAPTION_PROMPTS = [
    "Describe this video.",
    "What is happening in this video?",
    "Give a short caption of the video.",
    "Summarize the video briefly.",
    "What does the person do?",
]


def _exo_caption_file(takes: list[TakeSpec], seed: int) -> dict[str, bytes]:
    rng = np.random.default_rng([seed, 102])
    out = []
    for tk in takes:
        video = next(iter(tk.videos.values()))
        caps = []
        for s in tk.steps:
            cap = exo_caption(tk, s, rng)
            caps.append(cap)
            start, end = _clip_window(tk, s)
            out.append(
                _conv(
                    f"exo_{len(out):06d}",
                    video,
                    start,
                    end,
                    [(str(rng.choice(_CAPTION_PROMPTS)), cap)],
                )
            )
        # one caption of the whole video, as web videos often have
        summary = " Then ".join([caps[0]] + [c[0].lower() + c[1:] for c in caps[1:]])
        out.append(
            _conv(
                f"exo_{len(out):06d}",
                video,
                0.0,
                _t(tk.duration),
                [(str(rng.choice(_CAPTION_PROMPTS)), summary)],
            )
        )
    return {"exo_web/exo_captions.json": _json_bytes(out)}


def _conv(
    sid: str, video: str, start: float | None, end: float | None, turns: list[tuple[str, str]]
) -> dict:
    """VideoLLaMA2 conversation record; ``<video>`` opens the first human turn."""
    conv = []
    for j, (q, a) in enumerate(turns):
        conv.append({"from": "human", "value": ("<video>\n" if j == 0 else "") + q})
        conv.append({"from": "gpt", "value": a})
    rec = {"id": sid, "video": video}
    if start is not None:
        rec["start"], rec["end"] = start, end
    rec["conversations"] = conv
    return rec


# EgoIT question templates: at least five per kind. ``{x}`` object name, ``{v}`` gerund phrase.
EGOIT_TEMPLATES: dict[str, list[str]] = {
    "doing": [
        "What is C doing in this video?",
        "What action does the camera wearer perform?",
        "Describe what I am doing in this clip.",
        "What am I doing right now?",
        "Which action is C performing?",
        "Tell me what the camera wearer does here.",
    ],
    "object": [
        "Which object does C interact with?",
        "What object am I handling?",
        "What is the object that the camera wearer manipulates?",
        "Name the object I am using in this clip.",
        "What does C act on in this video?",
    ],
    "color": [
        "What colour is the {s} that C {p}?",
        "What is the colour of the {s} I {p}?",
        "Which colour does the {s} the camera wearer {p} have?",
        "Tell me the colour of the {s} that was {p}.",
        "The camera wearer {p} a {s}. What colour is it?",
    ],
    "before": [
        "What did C do before {v}?",
        "What did I do right before {v}?",
        "Which action came just before {v}?",
        "Before {v}, what did the camera wearer do?",
        "What happened before C started {v}?",
    ],
    "after": [
        "What did C do after {v}?",
        "What did I do right after {v}?",
        "Which action came next after {v}?",
        "After {v}, what did the camera wearer do?",
        "What happened after C finished {v}?",
    ],
    "count": [
        "How many actions does C perform in this video?",
        "How many distinct actions do I carry out in this clip?",
        "Count the actions the camera wearer performs.",
        "How many things does C do in this video?",
        "What is the number of actions performed by me here?",
    ],
    "direction": [
        "In which direction did C push the {x}?",
        "Which way did I push the {x}?",
        "Where did the camera wearer push the {x} to?",
        "Towards which side was the {x} pushed?",
        "C pushed the {x}. In which direction?",
    ],
    "where": [
        "Where did C put the {x}?",
        "Where did I put the {x}?",
        "Where did the camera wearer leave the {x}?",
        "Where is the {x} now?",
        "After moving it, where did C place the {x}?",
    ],
    "nav": [
        "Which way did I turn?",
        "In which direction did the camera wearer move?",
        "How did C move their head or body in this clip?",
        "Did I turn left, turn right, move forward or move backward?",
        "Which motion did the camera wearer make?",
    ],
}

_NUM_WORDS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
]


def _nav_answer(s: Step) -> str:
    if s.verb == "turn":
        return f"turn {s.direction}"
    return "move forward" if s.direction == "forward" else "move backward"


def _final_location(take: TakeSpec, o: int) -> str:
    """Where object ``o`` is at the end of the take, as a phrase."""
    where = f"on the {_region(take.objects[o].x)} side of the table"
    for s in take.object_steps():
        if s.obj != o:
            continue
        if s.verb == "put in":
            where = f"in the {take.objects[s.target].name}"
        elif s.dest is not None:
            where = f"on the {_region(s.dest[0])} side of the table"
    return where.replace("on the middle side of the table", "in the middle of the table")


def _egoit_file(takes: list[TakeSpec], seed: int) -> dict[str, bytes]:
    """EgoIT-style instructions (VideoLLaMA2 JSON) on the ego clips of training takes."""
    rng = np.random.default_rng([seed, 103])
    out: list[dict] = []

    def ask(tk, kind, fmt, answer, t0, t1, extra=None):
        q = str(rng.choice(EGOIT_TEMPLATES[kind])).format(**fmt)
        turns = [(q, answer)]
        if extra is not None:
            turns.append(extra)
        video = tk.videos[EGO_CAMERA]
        out.append(
            _conv(
                f"egoit_{len(out):06d}",
                video,
                _t(t0),
                _t(min(t1, tk.duration)),
                turns,
            )
        )
        out[-1]["kind"] = kind

    for tk in takes:
        steps = tk.steps
        for k, s in enumerate(steps):
            a_doing = f"C {phrase(tk, s)}."
            if s.is_nav:
                ask(tk, "nav", {}, _nav_answer(s).capitalize() + ".", s.t0, s.t1)
                continue
            ob = tk.objects[s.obj]
            follow = (str(rng.choice(EGOIT_TEMPLATES["object"])), f"The {ob.name}.")
            ask(tk, "doing", {}, a_doing, s.t0, s.t1, follow if rng.random() < 0.3 else None)
            if rng.random() < 0.5:
                ask(tk, "object", {}, f"The {ob.name}.", s.t0, s.t1)
            else:
                fmt = {"s": ob.shape, "p": _FORMS[s.verb][3]}
                ask(tk, "color", fmt, ob.color.capitalize() + ".", s.t0, s.t1)
            if s.verb == "push":
                ask(
                    tk,
                    "direction",
                    {"x": ob.name},
                    f"To the {s.direction}."
                    if s.direction != "forward"
                    else "Forward, away from me.",
                    s.t0,
                    s.t1,
                )
            if s.verb in ("put down", "put in"):
                where = (
                    f"In the {tk.objects[s.target].name}."
                    if s.verb == "put in"
                    else f"On the {_region(s.dest[0])} side of the table.".replace(
                        "the middle side of the table", "the middle of the table"
                    )
                )
                ask(tk, "where", {"x": ob.name}, where, s.t0 - 1.0, s.t1)
            if k + 1 < len(steps):
                nxt = steps[k + 1]
                ask(
                    tk, "before", {"v": phrase(tk, nxt, "ing")}, f"C {phrase(tk, s)}.", s.t0, nxt.t1
                )
                ask(tk, "after", {"v": phrase(tk, s, "ing")}, f"C {phrase(tk, nxt)}.", s.t0, nxt.t1)
        # counting over a window of 2-4 consecutive object actions (no head motion inside)
        n = int(rng.integers(2, 5))
        wins = [a for a in range(len(steps) - n + 1) if not any(x.is_nav for x in steps[a : a + n])]
        if wins:
            a = int(rng.choice(wins))
            ask(
                tk,
                "count",
                {},
                f"{_NUM_WORDS[n].capitalize()}.",
                steps[a].t0 - 0.1,
                steps[a + n - 1].t1 + 0.1,
            )
    return {"egoit/egoit_instructions.json": _json_bytes(out)}


# ----------------------------------------------------------------------------- EgoBench


def _distinct(rng, correct: str, pool: list[str], k: int) -> list[str]:
    """``k`` distractors from ``pool`` that differ from ``correct`` and from each other."""
    seen = {correct}
    out = []
    for p in rng.permutation(pool).tolist():
        if p not in seen:
            seen.add(p)
            out.append(p)
        if len(out) == k:
            break
    return out


def _fake_phrases(take: TakeSpec, rng, form: str = "3rd", articles: bool = True) -> list[str]:
    """Plausible action phrases about this take's objects (mostly not what happened)."""
    out = []
    names = [o.name for o in take.objects]
    for verb in VERBS:
        for o in range(len(take.objects)):
            sh = take.objects[o].shape
            if verb in NAV_VERBS:
                continue
            if verb == "pour" and sh not in POURABLE:
                continue
            bowls = [b for b, ob in enumerate(take.objects) if ob.shape == "bowl" and b != o]
            if verb in ("put in", "pour") and not bowls:
                continue
            s = Step(
                verb,
                o,
                bowls[0] if verb in ("put in", "pour") else None,
                str(rng.choice(list(PUSH_DIRECTIONS))) if verb == "push" else None,
            )
            out.append(phrase(take, s, form, articles))
    for c in COLORS:  # objects that are not on the table
        for sh in SHAPES:
            if f"{c} {sh}" not in names:
                the = "the " if articles else ""
                out.append(f"{_FORMS['pick up'][_FORM_INDEX[form]]} {the}{c} {sh}")
    return out


def _egoschema(takes, rng) -> tuple[list, dict]:
    questions, answers = [], {}
    for tk in takes:
        steps = tk.object_steps()
        kinds = ["order", "goal", "first", "last", "most"]
        counts = {}
        for s in steps:
            counts[s.obj] = counts.get(s.obj, 0) + 1
        best = sorted(counts.values(), reverse=True)
        if len(best) > 1 and best[0] == best[1]:
            kinds.remove("most")
        for kind in rng.choice(kinds, size=2, replace=False).tolist():
            if kind == "order":
                seq = [phrase(tk, s) for s in steps[:4]]
                correct = "C " + ", then ".join(seq) + "."
                pool = []
                for _ in range(30):
                    perm = rng.permutation(len(seq)).tolist()
                    pool.append("C " + ", then ".join(seq[i] for i in perm) + ".")
                fakes = _fake_phrases(tk, rng)
                for _ in range(10):
                    alt = list(seq)
                    alt[int(rng.integers(len(alt)))] = str(rng.choice(fakes))
                    pool.append("C " + ", then ".join(alt) + ".")
                q = "Which option best describes the order in which C performed the actions?"
            elif kind == "goal":
                correct = "C wanted to " + " and ".join(sub.goal for sub in tk.subtasks) + "."
                pool = []
                for _ in range(30):
                    other = sample_take_spec(int(rng.integers(2**31)), "heldout")
                    pool.append(
                        "C wanted to "
                        + " and ".join(sub.goal for sub in other.subtasks[: len(tk.subtasks)])
                        + "."
                    )
                q = "What was the overall goal of C's activity in this video?"
            elif kind in ("first", "last"):
                s = steps[0] if kind == "first" else steps[-1]
                correct = f"C {phrase(tk, s)}."
                pool = [f"C {phrase(tk, o)}." for o in steps] + [
                    f"C {p}." for p in _fake_phrases(tk, rng)
                ]
                q = f"What did C do {kind} in this video?"
            else:
                o = max(counts, key=counts.get)
                correct = f"The {tk.objects[o].name}."
                pool = [f"The {c} {sh}." for c in COLORS for sh in SHAPES]
                q = "Which object did C interact with the most throughout the video?"
            opts = [correct] + _distinct(rng, correct, pool, 4)
            if len(opts) < 5:
                continue
            order = rng.permutation(5).tolist()
            opts = [opts[i] for i in order]
            quid = _uuid(rng)
            rec = {"q_uid": quid, "google_drive_id": None, "question": q}
            rec.update({f"option {i}": o for i, o in enumerate(opts)})
            rec["video"] = tk.videos[EGO_CAMERA]
            questions.append(rec)
            answers[quid] = opts.index(correct)
    return questions, answers


def _qaego4d(takes, rng) -> list[dict]:
    out = []
    colors = list(COLORS)
    for tk in takes:
        steps = tk.object_steps()
        cands = []
        for s in steps:
            ob = tk.objects[s.obj]
            last_on_obj = [x for x in steps if x.obj == s.obj][-1]
            if s.verb in ("put down", "put in") and s is last_on_obj:
                pool = (
                    [f"in the {c} bowl" for c in colors]
                    + [f"on the {r} side of the table" for r in ("left", "right")]
                    + ["in the middle of the table"]
                )
                cands.append(
                    (f"Where did I put the {ob.name}?", _final_location(tk, s.obj), pool, s)
                )
            if s.verb == "put in":
                pool = [f"the {c} {sh}" for c in colors for sh in SHAPES if sh != "bowl"]
                cands.append(
                    (
                        f"What did I put in the {tk.objects[s.target].name}?",
                        f"the {ob.name}",
                        pool,
                        s,
                    )
                )
            if sum(1 for o in tk.objects if o.shape == ob.shape) == 1:
                cands.append(
                    (
                        f"What colour was the {ob.shape} that I {_FORMS[s.verb][3]}?",
                        ob.color,
                        colors,
                        s,
                    )
                )
        picks = [s for s in steps if s.verb == "pick up"]
        if picks:
            cands.append(
                (
                    "What did I pick up first?",
                    f"the {tk.objects[picks[0].obj].name}",
                    [f"the {c} {sh}" for c in colors for sh in SHAPES],
                    picks[0],
                )
            )
            n = len(picks)
            cands.append(
                ("How many times did I pick something up?", _NUM_WORDS[n], _NUM_WORDS[1:7], None)
            )
        for j in rng.permutation(len(cands))[:3].tolist():
            q, ans, pool, s = cands[j]
            opts = [ans] + _distinct(rng, ans, pool, 3)
            if len(opts) < 4:
                continue
            opts = [opts[i] for i in rng.permutation(4).tolist()]
            rec = {
                "sample_id": _uuid(rng),
                "video_id": tk.uid,
                "video": tk.videos[EGO_CAMERA],
                "question": q,
                "answer": ans,
                "options": opts,
                "answer_idx": opts.index(ans),
            }
            if s is not None:
                rec["moment_start_sec"], rec["moment_end_sec"] = _clip_window(tk, s)
            out.append(rec)
    return out


def _egotaskqa(takes, rng) -> list[dict]:
    out = []
    locs = (
        [f"in the {c} bowl" for c in COLORS]
        + [f"on the {r} side of the table" for r in ("left", "right")]
        + ["in the middle of the table"]
    )
    for tk in takes:
        steps = tk.object_steps()
        by_obj: dict[int, list[Step]] = {}
        for s in steps:
            by_obj.setdefault(s.obj, []).append(s)
        fakes = _fake_phrases(tk, rng, "past")
        items = []
        for o, ss in by_obj.items():
            name = tk.objects[o].name
            did = "C " + " and then ".join(phrase(tk, s, "past") for s in ss) + "."
            pool = [
                "C " + " and then ".join(str(x) for x in rng.choice(fakes, size=len(ss))) + "."
                for _ in range(20)
            ]
            items.append(
                ("direct", "descriptive", f"What did C do with the {name}?", did, pool, ss)
            )
            items.append(
                (
                    "direct",
                    "state",
                    f"Where is the {name} at the end of the video?",
                    _final_location(tk, o),
                    locs,
                    ss,
                )
            )
        # indirect: refer to an object by what happened to it, not by its name
        refs = {}
        for s in steps:
            refs.setdefault(_reference(tk, s), []).append(s.obj)
        for ref, objs_ in refs.items():
            if len(set(objs_)) != 1:
                continue  # ambiguous reference
            o = objs_[0]
            items.append(
                (
                    "indirect",
                    "descriptive",
                    f"What colour is {ref}?",
                    tk.objects[o].color,
                    list(COLORS),
                    by_obj[o],
                )
            )
            items.append(
                (
                    "indirect",
                    "state",
                    f"Where is {ref} at the end of the video?",
                    _final_location(tk, o),
                    locs,
                    by_obj[o],
                )
            )
        for j in rng.permutation(len(items))[:4].tolist():
            typ, cat, q, ans, pool, ss = items[j]
            opts = [ans] + _distinct(rng, ans, pool, 3)
            if len(opts) < 4:
                continue
            opts = [opts[i] for i in rng.permutation(4).tolist()]
            out.append(
                {
                    "id": _uuid(rng),
                    "video": tk.videos[EGO_CAMERA],
                    "start": 0.0,
                    "end": _t(tk.duration),
                    "question": q,
                    "options": opts,
                    "answer_idx": opts.index(ans),
                    "answer": ans,
                    "type": typ,
                    "category": cat,
                }
            )
    return out


def _reference(take: TakeSpec, s: Step) -> str:
    """Indirect reference to the object of a step: "the object that C pushed left"."""
    past = _FORMS[s.verb][3]
    if s.verb == "put in":
        return f"the object that C put in the {take.objects[s.target].name}"
    if s.verb == "pour":
        return f"the object that C poured into the {take.objects[s.target].name}"
    if s.verb == "push":
        return f"the object that C pushed {s.direction}"
    if s.verb == "pull":
        return "the object that C pulled closer"
    return f"the object that C {past}"


def _charades(takes) -> tuple[bytes, bytes]:
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
    return _tsv_bytes(header, rows, ","), classes.encode()


def _hms(t: float, digits: int) -> str:
    h, rem = divmod(t, 3600)
    m, sec = divmod(rem, 60)
    return f"{int(h):02d}:{int(m):02d}:{sec:0{3 + digits}.{digits}f}"


def _epic_mir(takes) -> dict[str, bytes]:
    header = [
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
    rows, clips = [], []
    for tk in takes:
        for k, s in enumerate(tk.steps):
            nouns = _nouns(tk, s) or [s.direction]
            shapes = [n.split()[-1] for n in nouns]
            noun_cls = [SHAPES.index(n) if n in SHAPES else len(SHAPES) for n in shapes]
            text = imperative(tk, s)
            rows.append(
                [
                    len(rows),
                    f"{tk.uid}_{k}",
                    "P01",
                    tk.uid,
                    _hms(s.timestamp, 3),
                    _hms(s.t0, 2),
                    _hms(min(s.t1, tk.duration), 2),
                    int(round(s.t0 * tk.fps)),
                    int(round(min(s.t1, tk.duration) * tk.fps)),
                    text,
                    s.verb.replace(" ", "-"),
                    VERBS.index(s.verb),
                    nouns[0],
                    noun_cls[0],
                    str(nouns),
                    str(noun_cls),
                ]
            )
            clips.append((f"{tk.uid}_{k}", text, VERBS.index(s.verb), set(nouns)))
    # sentences: the unique narrations, indexed by the first clip that has them (as EPIC)
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
    buf = io.BytesIO()
    np.save(buf, rel, allow_pickle=False)
    return {
        "egobench/epic_mir/EPIC_100_retrieval_test.csv": _tsv_bytes(header, rows, ","),
        "egobench/epic_mir/EPIC_100_retrieval_test_sentence.csv": _tsv_bytes(
            ["index", "sentence"], sent_rows, ","
        ),
        "egobench/epic_mir/caption_relevancy_EPIC_100_retrieval_test.npy": buf.getvalue(),
    }


def _egoplan(takes, rng) -> list[dict]:
    out = []
    q = (
        "Considering the progress shown in the video and my current observation in the last "
        "frame, what action should I take next in order to {goal}?"
    )
    for tk in takes:
        fakes = _fake_phrases(tk, rng, "base", articles=False)
        for sub in tk.subtasks:
            if len(sub.steps) < 2:
                continue
            for k in range(1, len(sub.steps)):
                done = [tk.steps[i] for i in sub.steps[:k]]
                nxt = tk.steps[sub.steps[k]]
                ans = imperative(tk, nxt)
                near = [imperative(tk, tk.steps[i]) for i in sub.steps if i != sub.steps[k]]
                opts = [ans] + _distinct(rng, ans, near, 1)
                opts += _distinct(rng, ans, [f for f in fakes if f not in opts], 4 - len(opts))
                if len(opts) < 4:
                    continue
                opts = [opts[i] for i in rng.permutation(4).tolist()]
                letter = "ABCD"[opts.index(ans)]
                start, end = done[0].t0, done[-1].t1
                rec = {
                    "sample_id": len(out),
                    "video_source": "synthetic",
                    "video_id": tk.uid,
                    "video": tk.videos[EGO_CAMERA],
                    "task_goal": sub.goal,
                    "question": q.format(goal=sub.goal),
                }
                rec.update({f"choice_{c}": o for c, o in zip("abcd", opts, strict=True)})
                rec.update(
                    {
                        "golden_choice_idx": letter,
                        "answer": ans,
                        "task_start_frame": int(round(start * tk.fps)),
                        "current_observation_frame": min(
                            int(round(end * tk.fps)), tk.num_frames - 1
                        ),
                        "task_progress_metadata": [
                            {
                                "narration_text": imperative(tk, s),
                                "start_frame": int(round(s.t0 * tk.fps)),
                                "stop_frame": int(round(s.t1 * tk.fps)),
                            }
                            for s in done
                        ],
                        "start": _t(start),
                        "end": _t(min(end, tk.duration)),
                    }
                )
                out.append(rec)
    return out


def _vlnqa(takes, rng) -> list[dict]:
    out = []
    for tk in takes:
        for s in tk.steps:
            if not s.is_nav:
                continue
            cands = [NAV_MOTIONS[i] for i in rng.permutation(4).tolist()]
            out.append(
                {
                    "video": tk.videos[EGO_CAMERA],
                    "question": "Which way did the camera wearer move in this video?",
                    "candidates": cands,
                    "answer": _nav_answer(s),
                    "start": _t(s.t0),
                    "end": _t(s.t0 + 0.6 * (s.t1 - s.t0)),
                }
            )
    return out


def _egomcq(takes, rng) -> dict:
    rows = {tk.uid: [_egoclip_row(tk, k, s) for k, s in enumerate(tk.steps)] for tk in takes}
    out = {}
    for tk in takes:
        mine = rows[tk.uid]
        others = [u for u in rows if u != tk.uid]
        for k, row in enumerate(mine):
            # inter-video: distractor clips from (as far as possible) different takes
            if len(others) >= 1:
                pick = rng.choice(others, size=4, replace=len(others) < 4).tolist()
                dis = [rows[u][int(rng.integers(len(rows[u])))] for u in pick]
                out[str(len(out))] = _mcq_item(row, dis, 1, rng)
            # intra-video: distractors from the same take with different narrations
            same = [r for j, r in enumerate(mine) if j != k and r["clip_text"] != row["clip_text"]]
            if len(same) >= 4:
                dis = [same[i] for i in rng.choice(len(same), size=4, replace=False).tolist()]
                out[str(len(out))] = _mcq_item(row, dis, 2, rng)
    return out


def _mcq_item(query: dict, distractors: list[dict], types: int, rng) -> dict:
    choices = [query] + distractors
    order = rng.permutation(5).tolist()
    return {
        "query": query,
        "choices": {str(i): choices[j] for i, j in enumerate(order)},
        "answer": order.index(0),
        "types": types,
    }


def _egobench_files(takes: list[TakeSpec], seed: int) -> tuple[dict[str, bytes], dict]:
    rng = lambda k: np.random.default_rng([seed, 200 + k])  # noqa: E731
    files: dict[str, bytes] = {}
    questions, answers = _egoschema(takes, rng(1))
    files["egobench/egoschema/questions.json"] = _json_bytes(questions)
    files["egobench/egoschema/subset_answers.json"] = _json_bytes(answers)
    qa = _qaego4d(takes, rng(2))
    files["egobench/qaego4d/qaego4d_test_close.json"] = _json_bytes(qa)
    files["egobench/qaego4d/qaego4d_test_open.json"] = _json_bytes(
        [{k: v for k, v in r.items() if k not in ("options", "answer_idx")} for r in qa]
    )
    tqa = _egotaskqa(takes, rng(3))
    files["egobench/egotaskqa/egotaskqa_test.json"] = _json_bytes(tqa)
    ch_csv, ch_cls = _charades(takes)
    files["egobench/charades_ego/CharadesEgo_v1_test_only1st.csv"] = ch_csv
    files["egobench/charades_ego/Charades_v1_classes.txt"] = ch_cls
    files.update(_epic_mir(takes))
    plan = _egoplan(takes, rng(4))
    files["egobench/egoplan/EgoPlan_validation.json"] = _json_bytes(plan)
    vln = _vlnqa(takes, rng(5))
    files["egobench/vlnqa/vlnqa.json"] = _json_bytes(vln)
    mcq = _egomcq(takes, rng(6))
    files["egobench/egomcq/egomcq.json"] = _json_bytes(mcq)
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


# ----------------------------------------------------------------------------- world


def split_sizes(num_takes: int, fractions: dict[str, float] | None = None) -> dict[str, int]:
    """Split ``num_takes`` into pairs / ego / exo / heldout counts (each at least 1)."""
    fr = fractions or DEFAULT_SPLIT_FRACTIONS
    if num_takes < len(fr):
        raise ValueError(f"need at least {len(fr)} takes (one per split), got {num_takes}")
    sizes = {k: max(1, int(round(v * num_takes))) for k, v in fr.items()}
    sizes["exo"] += num_takes - sum(sizes.values())
    if sizes["exo"] < 1:
        raise ValueError(f"cannot split {num_takes} takes as {fr}")
    return sizes


def build_specs(
    seed: int, sizes: dict[str, int], *, fps: int = DEFAULT_FPS, size: int = DEFAULT_SIZE
) -> list[TakeSpec]:
    """Take specs of every split, each from its own child seed (adding takes to one split
    does not change the others)."""
    specs = []
    for k, split in enumerate(("pairs", "ego", "exo", "heldout")):
        for i in range(sizes.get(split, 0)):
            child = int(np.random.SeedSequence([seed, k, i]).generate_state(1)[0])
            specs.append(sample_take_spec(child, split, i, fps=fps, size=size))
    return specs


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; choose another --out")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out} already exists and is not empty; pass --overwrite (overwrite=True) to "
            "replace it, or choose another --out"
        )


def generate_world(
    out_dir: str | os.PathLike,
    seed: int = 0,
    num_takes: int | None = None,
    *,
    pair_takes: int | None = None,
    ego_takes: int | None = None,
    exo_takes: int | None = None,
    heldout_takes: int | None = None,
    fps: int = DEFAULT_FPS,
    size: int = DEFAULT_SIZE,
    crf: int = DEFAULT_CRF,
    pix_fmt: str = DEFAULT_PIX_FMT,
    ss: int = 2,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Generate the demo world into ``out_dir`` and return its path.

    ``num_takes`` (default 64) is split 25% / 10% / 50% / 15% into pair / ego-corpus /
    exo-corpus / held-out takes; the ``*_takes`` arguments override single splits. Videos
    are rendered by ``workers`` processes (default: up to 2). The world is written to a
    temporary sibling directory and renamed into place at the end, so an interrupted run
    never leaves a complete-looking world behind.
    """
    t_start = time.time()
    out = Path(out_dir)
    _prepare_out(out, overwrite)
    sizes = split_sizes(num_takes or DEFAULT_NUM_TAKES)
    for key, val in (
        ("pairs", pair_takes),
        ("ego", ego_takes),
        ("exo", exo_takes),
        ("heldout", heldout_takes),
    ):
        if val is not None:
            if val < 1:
                raise ValueError(f"{key} takes must be >= 1, got {val}")
            sizes[key] = int(val)
    specs = build_specs(seed, sizes, fps=fps, size=size)
    by_split = {k: [s for s in specs if s.split == k] for k in sizes}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{out.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        files: dict[str, bytes] = {}
        files.update(_egoexo_files(by_split["pairs"], seed))
        files.update(_egoclip_file(by_split["ego"]))
        files.update(_exo_caption_file(by_split["exo"], seed))
        files.update(_egoit_file(by_split["pairs"] + by_split["ego"], seed))
        bench, bench_counts = _egobench_files(by_split["heldout"], seed)
        files.update(bench)
        _render_all(specs, tmp, crf=crf, ss=ss, pix_fmt=pix_fmt, workers=workers, progress=progress)
        for rel, data in files.items():
            p = tmp / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        manifest = _manifest(
            seed, sizes, specs, files, bench_counts, fps=fps, size=size, crf=crf, pix_fmt=pix_fmt
        )
        (tmp / "README.md").write_text(
            "Synthetic Exo2Ego demo world generated by `python -m input_pipeline.synthetic_world`"
            f" (seed {seed}). Layout: docs/data.md of exo2ego-jax; manifest: world.json.\n"
        )
        (tmp / "world.json").write_bytes(_json_bytes(manifest))
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        print(f"wrote {out} ({len(specs)} takes) in {time.time() - t_start:.1f}s", file=sys.stderr)
    return out


def _swap_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.parent / f"{out.name}.old-{secrets.token_hex(4)}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def _render_all(
    specs: list[TakeSpec],
    root: Path,
    *,
    crf: int,
    ss: int,
    pix_fmt: str,
    workers: int | None,
    progress: bool,
) -> None:
    from tqdm import tqdm

    jobs = [(s, str(root), crf, ss, pix_fmt) for s in specs]
    n = workers if workers is not None else min(2, os.cpu_count() or 1)
    bar = tqdm(total=len(jobs), desc="rendering takes", unit="take", disable=not progress)
    try:
        if n <= 1:
            for j in jobs:
                _render_job(j)
                bar.update()
        else:
            # spawn, not fork: the parent may have imported JAX (which is multi-threaded)
            ctx = multiprocessing.get_context("spawn")
            pool = cf.ProcessPoolExecutor(max_workers=n, mp_context=ctx)
            try:
                for _ in pool.map(_render_job, jobs, chunksize=1):
                    bar.update()
            finally:
                # on error, drop queued takes but let running ones finish, so that nothing
                # writes into the temporary directory after the caller has removed it
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()


def _manifest(seed, sizes, specs, files, bench_counts, *, fps, size, crf, pix_fmt) -> dict:
    videos = sorted(v for s in specs for v in s.videos.values())
    splits = {k: [s.uid for s in specs if s.split == k] for k in sizes}
    egoit = json.loads(files["egoit/egoit_instructions.json"])
    counts = {
        "takes": len(specs),
        "videos": len(videos),
        "pair_takes": sizes["pairs"],
        "ego_takes": sizes["ego"],
        "exo_takes": sizes["exo"],
        "heldout_takes": sizes["heldout"],
        "atomic_descriptions": sum(len(s.steps) for s in specs if s.split == "pairs"),
        "egoclip_rows": sum(len(s.steps) for s in specs if s.split == "ego"),
        "exo_captions": len(json.loads(files["exo_web/exo_captions.json"])),
        "egoit": len(egoit),
        "egoit_by_kind": {k: sum(r["kind"] == k for r in egoit) for k in EGOIT_TEMPLATES},
        "egobench": bench_counts,
    }
    return {
        "format_version": FORMAT_VERSION,
        "generator": "input_pipeline.synthetic_world",
        "seed": seed,
        "fps": fps,
        "resolution": [size, size],
        "video": {"codec": "h264", "container": "mp4", "pix_fmt": pix_fmt, "crf": crf},
        "sizes": sizes,
        "splits": splits,
        "cameras": {
            "ego": EGO_CAMERA,
            "ego_model": "fisheye",
            "exo": sorted(EXO_RIGS),
            "pair_exo": ["cam01", "cam02"],
        },
        "vocab": {
            "colors": list(COLORS),
            "shapes": list(SHAPES),
            "verbs": list(VERBS),
            "nav_motions": list(NAV_MOTIONS),
            "action_classes": list(ACTION_CLASSES),
        },
        "counts": counts,
        "annotation_files": sorted(files) + ["world.json", "README.md"],
        "video_files": videos,
    }


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m input_pipeline.synthetic_world",
        description="Generate the synthetic tabletop demo world (videos + annotations).",
    )
    p.add_argument("--out", required=True, help="output directory (must be empty or absent)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--takes",
        type=int,
        default=DEFAULT_NUM_TAKES,
        help="total number of takes, split 25/10/50/15%% into pair/ego/exo/held-out",
    )
    p.add_argument("--pair-takes", type=int)
    p.add_argument("--ego-takes", type=int)
    p.add_argument("--exo-takes", type=int)
    p.add_argument("--heldout-takes", type=int)
    p.add_argument("--fps", type=int, default=DEFAULT_FPS)
    p.add_argument("--size", type=int, default=DEFAULT_SIZE, help="frame side in pixels")
    p.add_argument("--crf", type=int, default=DEFAULT_CRF, help="x264 quality (lower = better)")
    p.add_argument("--workers", type=int, help="render processes (default: up to 2)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing world")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    try:
        generate_world(
            a.out,
            a.seed,
            a.takes,
            pair_takes=a.pair_takes,
            ego_takes=a.ego_takes,
            exo_takes=a.exo_takes,
            heldout_takes=a.heldout_takes,
            fps=a.fps,
            size=a.size,
            crf=a.crf,
            workers=a.workers,
            overwrite=a.overwrite,
            progress=not a.quiet,
        )
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
