"""The world's language: narrations, captions, instruction templates and answer phrases.

One step of a take can be said several ways: an Ego-Exo4D atomic description ("C picks up
the red cup."), an EgoClip narration ("#C C picks up the red cup"), an EPIC-style imperative
("pick up red cup"), or a third-person web caption ("Someone lifts a red cup."). Questions
about takes (EgoIT instructions, EgoBench) take their templates and answer phrases from here.
"""

from __future__ import annotations

import numpy as np

from input_pipeline.synthetic.takes import Step, TakeSpec
from input_pipeline.synthetic.vocabulary import (
    ACTION_CLASSES,
    SHAPES,
    VERBS,
    region,
    verb_form,
)

__all__ = [
    "phrase",
    "narration",
    "egoclip_text",
    "imperative",
    "action_class",
    "verb_noun_tags",
    "step_nouns",
    "exo_caption",
    "CAPTION_PROMPTS",
    "EGOIT_TEMPLATES",
    "NUMBER_WORDS",
    "nav_answer",
    "final_location",
    "indirect_reference",
]


def phrase(take: TakeSpec, s: Step, form: str = "3rd", articles: bool = True) -> str:
    """Verb phrase of a step without the subject: "picks up the red cup"."""
    v = verb_form(s.verb, form)
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


def verb_noun_tags(take: TakeSpec, s: Step) -> tuple[list[int], list[int]]:
    """EgoClip ``tag_verb`` / ``tag_noun`` of a step: indices into VERBS and SHAPES."""
    nouns = [] if s.is_nav else [SHAPES.index(take.objects[s.obj].shape)]
    if s.target is not None:
        nouns.append(SHAPES.index("bowl"))
    return [VERBS.index(s.verb)], nouns


def step_nouns(take: TakeSpec, s: Step) -> list[str]:
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


# Prompts of the exo corpus's caption records.
CAPTION_PROMPTS = [
    "Describe this video.",
    "What is happening in this video?",
    "Give a short caption of the video.",
    "Summarize the video briefly.",
    "What does the person do?",
]


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

NUMBER_WORDS = [
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


def nav_answer(s: Step) -> str:
    """The head motion of a turn / step, as one of NAV_MOTIONS."""
    if s.verb == "turn":
        return f"turn {s.direction}"
    return "move forward" if s.direction == "forward" else "move backward"


def final_location(take: TakeSpec, o: int) -> str:
    """Where object ``o`` is at the end of the take, as a phrase."""
    where = f"on the {region(take.objects[o].x)} side of the table"
    for s in take.object_steps():
        if s.obj != o:
            continue
        if s.verb == "put in":
            where = f"in the {take.objects[s.target].name}"
        elif s.dest is not None:
            where = f"on the {region(s.dest[0])} side of the table"
    return where.replace("on the middle side of the table", "in the middle of the table")


def indirect_reference(take: TakeSpec, s: Step) -> str:
    """Indirect reference to the object of a step: "the object that C pushed left"."""
    past = verb_form(s.verb, "past")
    if s.verb == "put in":
        return f"the object that C put in the {take.objects[s.target].name}"
    if s.verb == "pour":
        return f"the object that C poured into the {take.objects[s.target].name}"
    if s.verb == "push":
        return f"the object that C pushed {s.direction}"
    if s.verb == "pull":
        return "the object that C pulled closer"
    return f"the object that C {past}"
