"""What is on the table and what C does with it: object placement and procedure planning.

A procedure is a list of goal-directed subtasks ("put the red cup in the blue bowl"), each
a few raw steps ``(verb, obj, target, direction, dest)``. Planning keeps track of where every
object is, so each step is feasible when it happens (a pushed object lands on a free spot of
the table, a bowl with something in it is not picked up, ...).
"""

from __future__ import annotations

import numpy as np

from input_pipeline.synthetic.takes import ObjectSpec, Subtask, footprint
from input_pipeline.synthetic.vocabulary import (
    COLORS,
    POURABLE,
    PUSH_DIRECTIONS,
    SHAKEABLE,
    SHAPES,
    region,
)

__all__ = ["sample_objects", "plan_procedure"]

# Where object bases may be (metres; the table top is wider, these keep a margin).
_TABLE_X = (-0.42, 0.42)
_TABLE_Y = (0.12, 0.62)
_PUSH_DIST = 0.18


def _free(pos: tuple[float, float], shape: str, others: list[tuple[float, float, str]]) -> bool:
    x, y = pos
    if not (_TABLE_X[0] <= x <= _TABLE_X[1] and _TABLE_Y[0] - 0.04 <= y <= _TABLE_Y[1] + 0.04):
        return False
    return all(
        np.hypot(x - ox, y - oy) >= footprint(shape) + footprint(os_) + 0.04
        for ox, oy, os_ in others
    )


def _sample_free(rng, shape, others, tries: int = 200) -> tuple[float, float] | None:
    for _ in range(tries):
        p = (float(rng.uniform(*_TABLE_X)), float(rng.uniform(*_TABLE_Y)))
        if _free(p, shape, others):
            return round(p[0], 4), round(p[1], 4)
    return None


def sample_objects(rng: np.random.Generator) -> list[ObjectSpec]:
    """3-5 objects (usually with a bowl, never two of the same colour and shape) placed
    apart on the table."""
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


# One planner per subtask kind: a feasible subtask acting on object ``i`` within ``budget``
# steps (mutating ``st``), or None.


def _put_in(rng, st: _PlanState, kind: str, i: int, budget: int) -> Subtask | None:
    ob = st.objs[i]
    if not (budget >= 2 and ob.shape != "bowl" and st.bowls(i)):
        return None
    b = int(rng.choice(st.bowls(i)))
    st.inside[i] = b
    st.pos[i] = st.pos[b]
    goal = f"put the {ob.name} in the {st.objs[b].name}"
    return Subtask(
        kind,
        goal,
        [("pick up", i, None, None, None), ("put in", i, b, None, st.pos[b])],
    )


def _pour(rng, st: _PlanState, kind: str, i: int, budget: int) -> Subtask | None:
    ob = st.objs[i]
    if not (budget >= 3 and ob.shape in POURABLE and st.bowls(i)):
        return None
    b = int(rng.choice(st.bowls(i)))
    goal = f"pour the {ob.name} into the {st.objs[b].name}"
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


def _push_or_pull(rng, st: _PlanState, kind: str, i: int, budget: int) -> Subtask | None:
    ob = st.objs[i]
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
                goal = f"move the {ob.name} {where}"
            else:
                goal = f"bring the {ob.name} closer"
            return Subtask(kind, goal, [(kind, i, None, str(dname), dest)])
    return None


def _check(rng, st: _PlanState, kind: str, i: int, budget: int) -> Subtask | None:
    ob = st.objs[i]
    if not (budget >= 4 and ob.shape in SHAKEABLE):
        return None
    old = region(st.pos[i][0])
    dest = None
    for _ in range(20):
        cand_pos = _sample_free(rng, ob.shape, st.others(i), tries=30)
        if cand_pos is not None and region(cand_pos[0]) != old:
            dest = cand_pos
            break
    if dest is None:
        return None
    st.pos[i] = dest
    goal = f"check the {ob.name} and set it aside"
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


def _touch(rng, st: _PlanState, kind: str, i: int, budget: int) -> Subtask | None:
    return Subtask(kind, f"touch the {st.objs[i].name}", [("touch", i, None, None, None)])


_PLANNERS = {
    "put_in": _put_in,
    "pour": _pour,
    "push": _push_or_pull,
    "pull": _push_or_pull,
    "check": _check,
    "touch": _touch,
}


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
            sub = _PLANNERS[kind](rng, st, kind, i, budget)
            if sub is not None:
                return sub
    return None


def plan_procedure(rng, objs: list[ObjectSpec], target: int) -> tuple[list[Subtask], list]:
    """Subtasks totalling up to ``target`` steps, and their raw steps ``(verb, obj, target,
    direction, dest, subtask index)`` in order (each subtask's ``steps`` index into them)."""
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
