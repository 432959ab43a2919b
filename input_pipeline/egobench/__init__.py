"""The EgoBench reader: official annotation files -> typed evaluation items.

One loader per benchmark of method.md §6, one module each. Each reads the benchmark's public
annotation format (and the demo world's files in ``egobench/``, which use the same layouts
plus a few documented extensions; see ``docs/egobench.md``) and returns plain frozen
dataclasses (``items.py``):

* :class:`EvalItem` for question answering, classification and EgoMCQ;
* :class:`RetrievalBenchmark` for EPIC-KITCHENS-100 multi-instance retrieval (clips,
  sentences and the relevancy matrix).

Evaluation (``exo2ego_jax.eval.evaluate``) and the prepared ``ego_bench`` dataset
(``input_pipeline.datasets.ego_bench``) both read EgoBench through :func:`load_task`.

Every video path is resolved **inside** a data root
(:func:`input_pipeline.annotations.resolve_in_root`): a path that escapes it (``..``, or an
absolute path elsewhere) is refused with an :class:`AnnotationError` naming the file, the
record and the field. A missing field, a value of the wrong type or an unknown value (class
id, answer letter, question type) raises the same error class with the same information.
Loaders never open videos; a missing video surfaces later, when it is decoded.

Defaults point at the demo world's layout, so ``load_task(name, world_root)`` works as is;
for the real datasets pass the annotation file names and ``video_dir`` / ``video_pattern``
(``docs/egobench.md`` lists them per benchmark).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from input_pipeline.annotations import AnnotationError
from input_pipeline.egobench._fields import WORLD_VIDEO_DIR, PathLike
from input_pipeline.egobench.charades_ego import load_charades_classes, load_charades_ego
from input_pipeline.egobench.egomcq import clean_narration, load_egomcq
from input_pipeline.egobench.egoplan import EGOPLAN_FPS, load_egoplan
from input_pipeline.egobench.egoschema import load_egoschema
from input_pipeline.egobench.egotaskqa import load_egotaskqa
from input_pipeline.egobench.epic_mir import load_epic_mir, load_relevancy
from input_pipeline.egobench.items import (
    BENCHMARKS,
    TASKS,
    Clip,
    EvalItem,
    RetrievalBenchmark,
    benchmark_of,
)
from input_pipeline.egobench.qaego4d import QAEGO4D_FPS, load_qaego4d
from input_pipeline.egobench.vlnqa import load_vlnqa

__all__ = [
    "BENCHMARKS",
    "EGOPLAN_FPS",
    "LOADERS",
    "QAEGO4D_FPS",
    "TASKS",
    "WORLD_VIDEO_DIR",
    "AnnotationError",
    "Clip",
    "EvalItem",
    "RetrievalBenchmark",
    "benchmark_of",
    "clean_narration",
    "load_charades_classes",
    "load_charades_ego",
    "load_egomcq",
    "load_egoplan",
    "load_egoschema",
    "load_egotaskqa",
    "load_epic_mir",
    "load_qaego4d",
    "load_relevancy",
    "load_task",
    "load_vlnqa",
]

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
assert tuple(LOADERS) == TASKS  # one loader per task, in TASKS order


def load_task(name: str, root: PathLike, **kwargs: Any) -> list[EvalItem] | RetrievalBenchmark:
    """Load one task by name (:data:`TASKS`); ``kwargs`` go to its loader."""
    if name not in LOADERS:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
    return LOADERS[name](root, **kwargs)
