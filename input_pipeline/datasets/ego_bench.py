"""``ego_bench``: the eight EgoBench benchmarks, one record per item, one split per benchmark.

The items are those evaluation reads: the builder calls the EgoBench reader
(:func:`input_pipeline.egobench.load_task`, the demo world's layout) and brings every
benchmark to one schema, so a single evaluation pipeline serves all of them:

* ``task`` (= the split name, one of :data:`input_pipeline.egobench.BENCHMARKS`),
  ``item_id``, ``subtype`` (EgoTaskQA ``direct``/``indirect``, EgoMCQ ``inter``/``intra``,
  else ``""``);
* ``videos`` / ``starts`` / ``ends``: the item's clips (paths relative to the data root;
  NaN = video bound). One clip, except EgoMCQ (its 5 candidate clips);
* ``question``: what the model is asked: the item's question, or for the tasks whose
  candidates are classes, sentences or clips the evaluation prompt
  (``templates.CLASS_QUESTION`` for Charades-Ego, ``templates.DESCRIBE_QUESTION`` for
  EPIC-MIR and EgoMCQ);
* ``options``: candidate answers (MCQ options, VLN candidates, Charades class names; empty
  for EPIC-MIR, whose candidate sentences are in the dataset metadata, and EgoMCQ);
* ``answer_indices``: correct option(s) (Charades: all classes of the video; EgoMCQ: the
  correct clip; EPIC-MIR: the clip's own sentence); ``answer``: the answer text (EgoMCQ and
  EPIC-MIR: the query narration);
* ``relevancy``: EPIC-MIR's relevancy row over the sentences (``float32[S]``, else empty);
* ``extra``: JSON of the item's ``meta`` (Charades actions, QAEgo4D evidence moment, ...).

QAEgo4D's split holds the close-ended items (its open-ended file must ask the same
questions). Item counts equal ``world.json``'s ``counts.egobench`` (``charades_ego_videos``
and ``epic_mir_clips`` for those two).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from input_pipeline import egobench
from input_pipeline.annotations import AnnotationError
from input_pipeline.datasets.common import WorldBuilder, times_feature
from input_pipeline.egobench import BENCHMARKS, EvalItem, RetrievalBenchmark
from input_pipeline.templates import CLASS_QUESTION, DESCRIBE_QUESTION

__all__ = ["EgoBench"]

# The question of the tasks whose candidates are not answers to a question of their own.
PROMPTS = {
    "charades_ego": CLASS_QUESTION,
    "epic_mir": DESCRIBE_QUESTION,
    "egomcq": DESCRIBE_QUESTION,
}


def _relative(root: str, path: Path) -> str:
    """A video path of the reader (absolute, inside ``root``) as the dataset stores it."""
    return Path(path).relative_to(root).as_posix()


def _time(t: float | None) -> float:
    """A window bound as the dataset stores it: NaN for the start / end of the video."""
    return math.nan if t is None else t


def _answer(split: str, item: EvalItem) -> tuple[list[int], str]:
    """``(answer_indices, answer)`` of a non-retrieval item."""
    if split == "charades_ego":
        return list(item.labels), "; ".join(item.options[c] for c in item.labels)
    indices = [] if item.answer_index is None else [item.answer_index]
    if split == "egomcq":
        return indices, item.question  # the narration the correct clip shows
    if item.answer_text is not None:
        return indices, item.answer_text
    return indices, "" if item.answer_index is None else item.options[item.answer_index]


def _record(
    split: str, item: EvalItem, root: str, answers: list[int], answer: str, relevancy=()
) -> dict:
    """The dataset record of ``item`` (module docstring)."""
    clips = item.option_clips or (item.clip,)
    return {
        "task": split,
        "item_id": item.item_id,
        "subtype": item.group or "",
        "videos": [_relative(root, c.path) for c in clips],
        "starts": np.asarray([_time(c.start) for c in clips], np.float64),
        "ends": np.asarray([_time(c.end) for c in clips], np.float64),
        "question": PROMPTS.get(split, item.question),
        "options": [] if item.option_clips else list(item.options),
        "answer_indices": answers,
        "answer": answer,
        "relevancy": np.asarray(relevancy, np.float32),
        "extra": json.dumps(dict(item.meta), sort_keys=True),
    }


def _epic_mir(bench: RetrievalBenchmark, root: str) -> list[dict]:
    """One record per clip; its answer is its own narration's sentence."""
    column = {s: j for j, s in enumerate(bench.sentences)}
    return [
        _record(
            "epic_mir",
            it,
            root,
            [column[it.question]] if it.question in column else [],
            it.answer_text,
            bench.relevancy[i],
        )
        for i, it in enumerate(bench.clips)
    ]


def _check_qaego4d(close: list[EvalItem], root: Path) -> None:
    """QAEgo4D's open-ended file must ask the close-ended file's questions."""
    open_ids = sorted(it.item_id for it in egobench.load_task("qaego4d_open", root))
    if open_ids != sorted(it.item_id for it in close):
        raise AnnotationError(
            "egobench/qaego4d/qaego4d_test_open.json: its sample_ids differ from "
            "egobench/qaego4d/qaego4d_test_close.json's (the open- and close-ended files must "
            "hold the same questions)"
        )


class EgoBench(WorldBuilder):
    """Evaluation items of the eight EgoBench benchmarks (zero-shot, held-out videos)."""

    DESCRIPTION = __doc__
    CHECKS_VIDEOS = False  # an evaluation set stays whole; the pipeline's on_bad_video decides

    def _features(self) -> dict:
        text = tfds.features.Text
        return {
            "task": text(),
            "item_id": text(),
            "subtype": text(),
            "videos": tfds.features.Sequence(text()),
            "starts": times_feature(),
            "ends": times_feature(),
            "question": text(),
            "options": tfds.features.Sequence(text()),
            "answer_indices": tfds.features.Sequence(np.int64),
            "answer": text(),
            "relevancy": tfds.features.Tensor(shape=(None,), dtype=np.float32),
            "extra": text(),
        }

    def _parse(self, root: Path) -> dict[str, list[tuple[str, dict]]]:
        base = os.path.abspath(root)  # the reader's videos are absolute paths under it
        splits = {}
        for split in BENCHMARKS:
            task = "qaego4d_close" if split == "qaego4d" else split
            loaded = egobench.load_task(task, root)
            if isinstance(loaded, RetrievalBenchmark):
                records = _epic_mir(loaded, base)
                self._sentences = list(loaded.sentences)
            else:
                if split == "qaego4d":
                    _check_qaego4d(loaded, root)
                records = [_record(split, it, base, *_answer(split, it)) for it in loaded]
            # The EgoBench reader refuses a malformed file outright: a benchmark is scored
            # on all of its items or not at all. The report still counts them, and refuses
            # an empty task file.
            self.new_report(split, f"egobench/{split}/").add_read(len(records))
            splits[split] = [(r["item_id"], r) for r in records]
        return splits

    def _extra_metadata(self, root: Path) -> dict:
        return {"epic_mir_sentences": self._sentences, "tasks": list(BENCHMARKS)}
