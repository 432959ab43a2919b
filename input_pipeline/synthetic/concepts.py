"""Transfer concepts: colours and shapes the exo data shows but no ego-labelled take does.

The study regime of the demo world (``docs/data.md``, "Transfer concepts"): with transfer
concepts set, no take of the ego-labelled splits (``pairs``, ``ego``) holds an object of a
transfer colour or shape, the ``exo`` split is left as sampled, and the held-out splits
(``heldout``, ``val``) are grouped into ``transfer`` takes (a step acts on such an object)
and ``seen`` takes (no such object anywhere). :func:`satisfies` is the per-group test that
``sampling.build_specs`` re-samples a take against; :func:`heldout_groups` and
:func:`item_take` let an evaluation group EgoBench items by the group of their take.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from input_pipeline.egobench.items import TASKS, EvalItem
from input_pipeline.synthetic.takes import ObjectSpec, Step, TakeSpec
from input_pipeline.synthetic.vocabulary import COLORS, SHAPES

__all__ = [
    "GROUPS",
    "TransferConcepts",
    "StudyRegime",
    "mentions",
    "acted_on",
    "involves",
    "satisfies",
    "num_transfer",
    "take_group",
    "load_manifest",
    "heldout_groups",
    "item_take",
]

#: Groups of held-out takes: a step acts on a transfer-concept object / no such object.
GROUPS = ("transfer", "seen")
# Splits whose text names the take's objects in ego narrations or instructions.
_EGO_LABELLED = ("pairs", "ego")
# Splits of EgoBench takes (test and validation), grouped transfer / seen.
_HELDOUT_STYLE = ("heldout", "val")


def _names(values: str | Iterable[str], vocab: Iterable[str], kind: str) -> tuple[str, ...]:
    """``values`` (one name or several) checked against ``vocab``, in vocabulary order."""
    vocab = tuple(vocab)
    wanted = {values} if isinstance(values, str) else set(values)
    for v in sorted(wanted, key=str):
        if v not in vocab:
            raise ValueError(f"unknown transfer {kind} {v!r}; expected some of {list(vocab)}")
    if len(wanted) == len(vocab):
        raise ValueError(
            f"transfer {kind}s {sorted(wanted)} leave no seen {kind}; keep at least one of "
            f"{list(vocab)} out"
        )
    return tuple(v for v in vocab if v in wanted)


@dataclass(frozen=True)
class TransferConcepts:
    """The transfer colours and shapes (names from :data:`COLORS` / :data:`SHAPES`).

    Checked and put in vocabulary order on construction; an empty instance (the default)
    means no study regime: every constraint holds.
    """

    colors: tuple[str, ...] = ()
    shapes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "colors", _names(self.colors, COLORS, "colour"))
        object.__setattr__(self, "shapes", _names(self.shapes, SHAPES, "shape"))

    def __bool__(self) -> bool:
        return bool(self.colors or self.shapes)

    def marks(self, obj: ObjectSpec) -> bool:
        """Whether ``obj`` has a transfer colour or a transfer shape."""
        return obj.color in self.colors or obj.shape in self.shapes

    def labels(self, objects: Iterable[ObjectSpec]) -> dict[str, bool]:
        """For each transfer colour and shape (in that order), whether one of ``objects``
        has it."""
        objects = list(objects)
        out = {c: any(o.color == c for o in objects) for c in self.colors}
        return out | {s: any(o.shape == s for o in objects) for s in self.shapes}


@dataclass(frozen=True)
class StudyRegime:
    """The study regime's world options (``generate_world(..., study=StudyRegime(...))``).

    ``transfer_colors`` / ``transfer_shapes``: the :class:`TransferConcepts`;
    ``transfer_heldout_fraction``: the share of held-out (and val) takes that are
    ``transfer`` takes, in [0, 1]; ``val_takes``: held-out-style validation takes with their
    own EgoBench files. Checked on construction; the default (all off) is the demo world.
    """

    transfer_colors: tuple[str, ...] = ()
    transfer_shapes: tuple[str, ...] = ()
    val_takes: int = 0
    transfer_heldout_fraction: float = 0.5

    def __post_init__(self) -> None:
        concepts = TransferConcepts(self.transfer_colors, self.transfer_shapes)
        object.__setattr__(self, "transfer_colors", concepts.colors)
        object.__setattr__(self, "transfer_shapes", concepts.shapes)
        if not 0.0 <= self.transfer_heldout_fraction <= 1.0:
            raise ValueError(
                f"transfer_heldout_fraction must be in [0, 1], got {self.transfer_heldout_fraction}"
            )
        if self.val_takes < 0:
            raise ValueError(f"val takes must be >= 0, got {self.val_takes}")

    @property
    def concepts(self) -> TransferConcepts:
        return TransferConcepts(self.transfer_colors, self.transfer_shapes)

    def __bool__(self) -> bool:
        return bool(self.concepts) or self.val_takes > 0


def mentions(take: TakeSpec, concepts: TransferConcepts) -> bool:
    """Whether any object of the scene has a transfer concept (text about the take can name
    any object on the table, acted on or not)."""
    return any(concepts.marks(o) for o in take.objects)


def acted_on(take: TakeSpec, step: Step) -> list[ObjectSpec]:
    """The objects an object step acts on: the moved object, and the bowl it is put or
    poured into (the step's narration names both)."""
    return [take.objects[i] for i in (step.obj, step.target) if i is not None]


def involves(take: TakeSpec, concepts: TransferConcepts) -> bool:
    """Whether a step acts on a transfer-concept object (:func:`acted_on`)."""
    return any(concepts.marks(o) for s in take.object_steps() for o in acted_on(take, s))


def satisfies(take: TakeSpec, group: str | None, concepts: TransferConcepts) -> bool:
    """Whether ``take`` fits ``group``: ``transfer`` needs :func:`involves`, ``seen`` needs
    no :func:`mentions`, None (the exo split) takes anything; so does every group when
    there are no transfer concepts."""
    if not concepts or group is None:
        return True
    if group == "transfer":
        return involves(take, concepts)
    if group == "seen":
        return not mentions(take, concepts)
    raise ValueError(f"unknown group {group!r}; expected one of {GROUPS} or None")


def num_transfer(n: int, fraction: float, concepts: TransferConcepts) -> int:
    """How many of ``n`` held-out takes are ``transfer`` takes: ``fraction * n`` rounded
    half up (none without transfer concepts)."""
    return math.floor(fraction * n + 0.5) if concepts else 0


def take_group(
    split: str, index: int, size: int, concepts: TransferConcepts, fraction: float
) -> str | None:
    """The group take ``index`` of ``split`` (``size`` takes) must satisfy: the first
    :func:`num_transfer` held-out (or val) takes are ``transfer``, the rest ``seen``;
    ego-labelled takes are ``seen``; exo takes have none (None)."""
    if split in _HELDOUT_STYLE:
        return "transfer" if index < num_transfer(size, fraction, concepts) else "seen"
    if split in _EGO_LABELLED:
        return "seen"
    return None


def load_manifest(world_dir: str | os.PathLike) -> dict:
    """A world's ``world.json``."""
    return json.loads((Path(world_dir) / "world.json").read_text(encoding="utf-8"))


def _study(manifest: Mapping) -> Mapping:
    """The manifest's ``study`` record, or an error saying the world has none."""
    if "study" not in manifest:
        raise ValueError(
            "world.json has no 'study' record: the world was generated without transfer "
            "concepts or validation takes (generate_world(..., transfer_colors=...))"
        )
    return manifest["study"]


def heldout_groups(world_dir: str | os.PathLike) -> dict[str, str]:
    """Take name -> ``transfer`` / ``seen`` of every held-out and validation take."""
    return dict(_study(load_manifest(world_dir))["groups"])


def _item_video(task: str, item: EvalItem | str | os.PathLike) -> Path:
    """The video an item is about: its own clip, or for EgoMCQ (no clip of its own) the
    correct option, which is the query narration's clip."""
    if not isinstance(item, EvalItem):
        return Path(item)
    if item.video is not None:
        return Path(item.video)
    if task == "egomcq" and item.answer_index is not None:
        return Path(item.option_clips[item.answer_index].path)
    raise ValueError(f"{task} item {item.item_id!r} has no video to map to a take")


def item_take(task: str, item: EvalItem | str | os.PathLike, manifest: Mapping) -> str:
    """The take (name) an EgoBench item of ``task`` is about.

    ``item`` is an :class:`EvalItem` of the EgoBench reader (a retrieval clip for
    ``epic_mir``) or a video path (relative to the world root or absolute inside it);
    ``manifest`` is the world's ``world.json`` (:func:`load_manifest`).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    takes = _study(manifest)["video_takes"]
    parts = _item_video(task, item).parts
    # The shortest tail of the path that is a world-relative video path.
    for k in range(1, len(parts) + 1):
        key = "/".join(parts[-k:])
        if key in takes:
            return takes[key]
    raise KeyError(f"{task}: video {'/'.join(parts)} is not a held-out or validation video")
