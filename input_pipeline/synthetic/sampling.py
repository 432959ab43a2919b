"""Sampling take specs: one take from a seed, and the world's takes split by purpose.

Takes are split into disjoint groups that mirror the paper's data regime (``pairs``: ego+exo
with narrations; ``ego``: scarce ego-only; ``exo``: plentiful exo-only; ``heldout``: EgoBench;
optionally ``val``: a validation EgoBench); every take comes from its own child seed, so adding
takes to one split leaves the others as they were. With transfer concepts
(:mod:`~input_pipeline.synthetic.concepts`) a take that breaks its group's constraint is
re-sampled from further child seeds.
"""

from __future__ import annotations

import numpy as np

from input_pipeline.synthetic.concepts import TransferConcepts, satisfies, take_group
from input_pipeline.synthetic.procedure import plan_procedure, sample_objects
from input_pipeline.synthetic.takes import (
    DEFAULT_FPS,
    DEFAULT_SIZE,
    EGO_CAMERA,
    EGO_FOV_DEG,
    EGO_STREAM,
    EXO_RIGS,
    Step,
    Subtask,
    TakeSpec,
    random_uuid,
)
from input_pipeline.synthetic.vocabulary import NAV_MOTIONS

__all__ = [
    "DEFAULT_SPLIT_FRACTIONS",
    "DEFAULT_NUM_TAKES",
    "SPLITS",
    "BENCH_DIRS",
    "MAX_ATTEMPTS",
    "sample_take_spec",
    "split_sizes",
    "build_specs",
]

DEFAULT_SPLIT_FRACTIONS = {"pairs": 0.25, "ego": 0.10, "exo": 0.50, "heldout": 0.15}
DEFAULT_NUM_TAKES = 64
# Every split, in child-seed key order (``val`` is empty unless asked for).
SPLITS = ("pairs", "ego", "exo", "heldout", "val")
# Where the EgoBench files and videos of the held-out-style splits go (test / validation).
BENCH_DIRS = {"heldout": "egobench", "val": "egobench_val"}
# Child seeds tried per take before a transfer-concept constraint is given up on.
MAX_ATTEMPTS = 1000

_SHIRTS = [(0.18, 0.22, 0.38), (0.26, 0.26, 0.28), (0.12, 0.34, 0.36), (0.36, 0.40, 0.48)]
_PANTS = [(0.16, 0.18, 0.26), (0.22, 0.22, 0.24), (0.28, 0.24, 0.20)]
# Typical duration of each verb (seconds; each step draws 0.9-1.15 times this).
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
    cam01 + cam02; ``ego`` / ``heldout`` / ``val``: ego only; ``exo``: one random exo camera).
    ``nav_events`` is the (min, max) number of narrated head motions (turn / step).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    rng = np.random.default_rng(seed)
    uid = random_uuid(rng)
    objs, subtasks, raw_steps = _sample_procedure(rng, seed)
    steps = [Step(v, o, b, d, dest, k) for v, o, b, d, dest, k in raw_steps]
    # narrated head motions between subtasks (held-out takes always have one: navigation QA)
    nav = nav_events or ((1, 2) if split in BENCH_DIRS else (0, 2))
    _insert_head_motions(rng, steps, subtasks, nav)
    num_frames = _time_steps(rng, steps, fps)
    cams = _sample_cameras(rng, split, exo_cameras)
    name = f"synth_{split}_{index:04d}"
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
        videos=_video_paths(split, name, uid, cams),
        shirt=_SHIRTS[int(rng.integers(len(_SHIRTS)))],
        pants=_PANTS[int(rng.integers(len(_PANTS)))],
    )


def _sample_procedure(rng, seed: int) -> tuple[list, list[Subtask], list[tuple]]:
    """Objects, subtasks and raw steps: the table is re-sampled until a 4-8 step procedure
    fits on it."""
    for _ in range(50):
        objs = sample_objects(rng)
        subtasks, raw_steps = plan_procedure(rng, objs, int(rng.integers(4, 9)))
        if len(raw_steps) >= 4:
            return objs, subtasks, raw_steps
    raise RuntimeError(f"could not plan a procedure for seed {seed}")  # pragma: no cover


def _insert_head_motions(
    rng, steps: list[Step], subtasks: list[Subtask], nav_events: tuple[int, int]
) -> None:
    """Insert ``nav_events`` = (min, max) head motions between subtasks (in place) and
    re-index the subtasks' step lists."""
    lo, hi = nav_events
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
    pos = 0
    for k, sub in enumerate(subtasks):
        sub.steps = []
        while pos < len(steps):
            if steps[pos].subtask == k:
                sub.steps.append(pos)
            elif sub.steps:
                break
            pos += 1


def _time_steps(rng, steps: list[Step], fps: int) -> int:
    """Set every step's ``t0`` / ``t1`` (in place); returns the take's number of frames."""
    t = 0.5
    for s in steps:
        d = _BASE_DURATION[s.verb] * float(rng.uniform(0.9, 1.15))
        s.t0, s.t1 = round(t, 4), round(t + d, 4)
        t += d + 0.15
    return int(np.ceil((t + 0.35) * fps))


def _sample_cameras(rng, split: str, exo_cameras: tuple[str, ...] | None) -> dict[str, dict]:
    """Camera name -> rig of the cameras a take of ``split`` is rendered from."""
    cams: dict[str, dict] = {}
    if split in ("pairs", "ego", *BENCH_DIRS):
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
    return cams


def _video_paths(split: str, name: str, uid: str, cams: dict) -> dict[str, str]:
    """Camera name -> video path relative to the world root, in the layout of the dataset
    the split stands in for."""
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
            out[cam] = f"{BENCH_DIRS[split]}/videos/{uid}.mp4"
    return out


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
    seed: int,
    sizes: dict[str, int],
    *,
    fps: int = DEFAULT_FPS,
    size: int = DEFAULT_SIZE,
    concepts: TransferConcepts | None = None,
    transfer_fraction: float = 0.5,
) -> list[TakeSpec]:
    """Take specs of every split, each from its own child seed (adding takes to one split
    does not change the others).

    With ``concepts``, every take must satisfy its group
    (:func:`~input_pipeline.synthetic.concepts.take_group`; ``transfer_fraction`` of the
    held-out and val takes are ``transfer``).
    """
    concepts = concepts or TransferConcepts()
    specs = []
    for k, split in enumerate(SPLITS):
        n = sizes.get(split, 0)
        for i in range(n):
            group = take_group(split, i, n, concepts, transfer_fraction)
            specs.append(_constrained_take(seed, k, i, split, group, concepts, fps, size))
    return specs


def _constrained_take(
    seed: int,
    k: int,
    i: int,
    split: str,
    group: str | None,
    concepts: TransferConcepts,
    fps: int,
    size: int,
) -> TakeSpec:
    """Take ``i`` of split number ``k``: from child seed ``[seed, k, i]`` (the world without
    transfer concepts), else the first of ``[seed, k, i, attempt]`` that satisfies
    ``group``."""
    for attempt in range(MAX_ATTEMPTS):
        key = [seed, k, i] if attempt == 0 else [seed, k, i, attempt]
        child = int(np.random.SeedSequence(key).generate_state(1)[0])
        spec = sample_take_spec(child, split, i, fps=fps, size=size)
        if satisfies(spec, group, concepts):
            return spec
    raise ValueError(
        f"no {group} take {i} of split {split!r} in {MAX_ATTEMPTS} samples with transfer "
        f"colours {list(concepts.colors)} and shapes {list(concepts.shapes)}; choose fewer "
        "transfer concepts"
    )
