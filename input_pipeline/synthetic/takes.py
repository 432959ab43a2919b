"""What a take is: its objects, steps, subtasks and cameras (plain data, no sampling).

A *take* is a camera wearer "C" doing a short procedure on a table with a few coloured
objects, recorded by a head-mounted fisheye **ego** camera (:data:`EGO_CAMERA`) and fixed
pinhole **exo** cameras (:data:`EXO_RIGS`). World coordinates are metres, as in
:mod:`input_pipeline.synthetic.raycast`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import numpy as np

from input_pipeline.synthetic.raycast import object_size
from input_pipeline.synthetic.vocabulary import NAV_VERBS

__all__ = [
    "DEFAULT_FPS",
    "DEFAULT_SIZE",
    "EXO_RIGS",
    "EGO_CAMERA",
    "EGO_STREAM",
    "EGO_FOV_DEG",
    "ObjectSpec",
    "Step",
    "Subtask",
    "TakeSpec",
    "footprint",
    "random_uuid",
]

DEFAULT_FPS = 8
DEFAULT_SIZE = 128

# Exo camera rigs: (position, look-at target, horizontal field of view in degrees).
EXO_RIGS = {
    "cam01": ((-0.95, 1.25, 0.78), (0.0, 0.15, 0.10), 50.0),
    "cam02": ((1.45, -0.05, 0.62), (0.0, 0.18, 0.10), 52.0),
    "cam03": ((0.95, 1.45, 0.95), (0.0, 0.18, 0.08), 52.0),
}
EGO_CAMERA = "aria01"
EGO_STREAM = "214-1"
EGO_FOV_DEG = 62.0


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


def random_uuid(rng: np.random.Generator) -> str:
    """A version-4 UUID string drawn from ``rng`` (16 bytes)."""
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def footprint(shape: str) -> float:
    """Radius (metres) an object of ``shape`` keeps clear on the table (the cup's handle and
    the knife's length included)."""
    r, _ = object_size(shape)
    return {"cup": r + 0.02, "knife": 0.12}.get(shape, r)
