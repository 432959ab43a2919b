"""``ego_it``: EgoIT instructions (VideoLLaMA2 conversation JSON), one record per instruction
of ``egoit/egoit_instructions.json``; the conversation is kept turn by turn."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import tensorflow_datasets as tfds

from input_pipeline.datasets.common import WorldBuilder, time_feature
from input_pipeline.datasets.vl2_json import read_conversation_file

__all__ = ["EgoIt"]

JSON_FILE = "egoit/egoit_instructions.json"


class EgoIt(WorldBuilder):
    """Ego instruction data for stage 3 (learner self-practice)."""

    DESCRIPTION = __doc__

    def _features(self) -> dict:
        text = tfds.features.Text
        return {
            "id": text(),
            "video": text(),
            "start": time_feature(),
            "end": time_feature(),
            "kind": text(),  # question family ("doing", "count", ...); "" when absent
            "conversations": tfds.features.Sequence({"from": text(), "value": text()}),
        }

    def _parse(self, root: Path) -> dict[str, Iterator[tuple[str, dict]]]:
        records = read_conversation_file(root, JSON_FILE, self.new_report("train", JSON_FILE))
        return {"train": _examples(records)}


def _examples(records: Iterator[dict]) -> Iterator[tuple[str, dict]]:
    for r in records:
        yield (
            r["id"],
            {
                "id": r["id"],
                "video": r["video"],
                "start": r["start"],
                "end": r["end"],
                "kind": str(r["raw"].get("kind") or ""),
                "conversations": r["conversations"],
            },
        )
