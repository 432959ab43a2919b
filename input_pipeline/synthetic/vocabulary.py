"""The words of the synthetic world: colours, shapes, verbs and their forms, head motions.

Every narration, caption, question and class list of the world is built from these tuples,
and several annotation files index into them (EgoClip ``tag_verb`` / ``tag_noun``, EPIC
``verb_class`` / ``noun_class``, Charades-Ego ``cNNN`` ids), so their order is part of the
data format.
"""

from __future__ import annotations

__all__ = [
    "COLORS",
    "SHAPES",
    "VERBS",
    "NAV_VERBS",
    "NAV_MOTIONS",
    "POURABLE",
    "SHAKEABLE",
    "PUSH_DIRECTIONS",
    "ACTION_CLASSES",
    "verb_form",
    "region",
]

#: Object colours, name -> linear RGB in [0, 1].
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


def verb_form(verb: str, form: str) -> str:
    """``verb`` (one of :data:`VERBS`) in ``form``: "3rd" ("picks up"), "base" ("pick up"),
    "ing" ("picking up") or "past" ("picked up")."""
    return _FORMS[verb][_FORM_INDEX[form]]


def region(x: float) -> str:
    """Which third of the table ``x`` (metres, to the actor's right) lies in: left, middle,
    right."""
    return "left" if x < -0.14 else ("right" if x > 0.14 else "middle")
