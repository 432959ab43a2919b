"""``exo_clip_text``: exo video-text pairs (the web video-text stand-in), one per record of
``exo_web/exo_captions.json``.

``text`` is the first answer (the caption the ``plain`` template trains on); ``prompt`` the
first question without ``<video>`` (unused by the caption stages, kept for completeness).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import tensorflow_datasets as tfds

from input_pipeline.datasets.common import WorldBuilder, time_feature
from input_pipeline.datasets.vl2_json import read_conversation_file

__all__ = ["ExoClipText"]

JSON_FILE = "exo_web/exo_captions.json"


class ExoClipText(WorldBuilder):
    """Exo clip-text for stage 0 (``E_exo`` initialisation) and stage 1."""

    DESCRIPTION = __doc__

    def _features(self) -> dict:
        text = tfds.features.Text
        return {
            "id": text(),
            "video": text(),
            "start": time_feature(),  # NaN: from the start of the video
            "end": time_feature(),  # NaN: to the end of the video
            "prompt": text(),
            "text": text(),
        }

    def _parse(self, root: Path) -> dict[str, Iterator[tuple[str, dict]]]:
        records = read_conversation_file(root, JSON_FILE, self.new_report("train", JSON_FILE))
        return {"train": _examples(records)}


def _examples(records: Iterator[dict]) -> Iterator[tuple[str, dict]]:
    for r in records:
        prompt = r["conversations"][0]["value"].replace("<video>", "").strip()
        yield (
            r["id"],
            {
                "id": r["id"],
                "video": r["video"],
                "start": r["start"],
                "end": r["end"],
                "prompt": prompt,
                "text": r["conversations"][1]["value"].strip(),
            },
        )
