"""The tasks of EgoBench and what their loaders return: :class:`EvalItem` lists, or a
:class:`RetrievalBenchmark` for EPIC-KITCHENS-100 MIR. Plain frozen dataclasses, no I/O."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

# The evaluation tasks: the eight benchmarks of method.md §6, QAEgo4D as its two sub-modes.
TASKS = (
    "egoschema",
    "qaego4d_close",
    "qaego4d_open",
    "egotaskqa",
    "charades_ego",
    "epic_mir",
    "egoplan",
    "vlnqa",
    "egomcq",
)


def benchmark_of(task: str) -> str:
    """The benchmark a task evaluates: ``qaego4d`` for both QAEgo4D modes, else the task."""
    return "qaego4d" if task in ("qaego4d_close", "qaego4d_open") else task


# The eight benchmarks, in TASKS order (the prepared ``ego_bench`` dataset has one split each).
BENCHMARKS = tuple(dict.fromkeys(benchmark_of(t) for t in TASKS))


@dataclasses.dataclass(frozen=True)
class Clip:
    """A video file and an optional window in seconds (None: from the start / to the end)."""

    path: Path
    start: float | None = None
    end: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "start": self.start, "end": self.end}


@dataclasses.dataclass(frozen=True)
class EvalItem:
    """One evaluation question (or clip).

    Attributes:
      task: task name, one of :data:`TASKS`.
      item_id: unique within the task; predictions files are keyed by it.
      video: the clip the model watches (None for EgoMCQ, whose options are clips).
      start, end: window of ``video`` in seconds (None: whole video).
      question: question text; for EgoMCQ the query narration, for retrieval the narration.
      options: answer options (MCQ), class names (Charades-Ego), or the options' narrations
        (EgoMCQ, informational).
      answer_index: index of the correct option, or None (no ground truth).
      answer_text: reference answer text (open-ended QA), if any.
      labels: positive class indices (Charades-Ego), sorted.
      group: sub-split for per-group metrics: ``direct`` / ``indirect`` (EgoTaskQA),
        ``inter`` / ``intra`` (EgoMCQ); None elsewhere.
      option_clips: EgoMCQ's candidate clips, one per option.
      meta: anything else worth keeping (evidence moment, raw type codes, ...).
    """

    task: str
    item_id: str
    video: Path | None
    question: str
    start: float | None = None
    end: float | None = None
    options: tuple[str, ...] = ()
    answer_index: int | None = None
    answer_text: str | None = None
    labels: tuple[int, ...] = ()
    group: str | None = None
    option_clips: tuple[Clip, ...] = ()
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    @property
    def clip(self) -> Clip | None:
        return None if self.video is None else Clip(self.video, self.start, self.end)

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable dict (paths as strings)."""
        out = dataclasses.asdict(self)
        out["video"] = None if self.video is None else str(self.video)
        out["option_clips"] = [c.to_json() for c in self.option_clips]
        out["options"], out["labels"] = list(self.options), list(self.labels)
        return out


@dataclasses.dataclass(frozen=True)
class RetrievalBenchmark:
    """EPIC-KITCHENS-100 MIR: clips (video windows), sentences and their relevancy.

    Attributes:
      clips: one item per clip, in CSV order; ``question`` holds the clip's narration.
      sentence_ids: the sentence file's first column (EPIC: narration id of the first clip
        with that narration).
      sentences: the unique narrations, in sentence-file order.
      relevancy: ``float32[num_clips, num_sentences]``, rows in clip order, columns in
        sentence order (EPIC's ``caption_relevancy_*`` matrix).
    """

    clips: tuple[EvalItem, ...]
    sentence_ids: tuple[str, ...]
    sentences: tuple[str, ...]
    relevancy: np.ndarray

    def subset(self, max_clips: int | None) -> RetrievalBenchmark:
        """The benchmark restricted to the first ``max_clips`` clips and their narrations.

        The sentence set is rebuilt as EPIC builds it: the unique narrations of the kept
        clips (columns whose sentence equals a kept clip's narration), so the sub-benchmark
        is a smaller instance of the same task. Scoring cost is O(clips x sentences).
        """
        if max_clips is None or max_clips >= len(self.clips):
            return self
        if max_clips < 1:
            raise ValueError(f"max_clips must be >= 1, got {max_clips}")
        clips = self.clips[:max_clips]
        kept = {c.question for c in clips}
        cols = [j for j, s in enumerate(self.sentences) if s in kept]
        return RetrievalBenchmark(
            clips=clips,
            sentence_ids=tuple(self.sentence_ids[j] for j in cols),
            sentences=tuple(self.sentences[j] for j in cols),
            relevancy=self.relevancy[:max_clips][:, cols],
        )
