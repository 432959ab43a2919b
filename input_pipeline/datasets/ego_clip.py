"""``ego_clip``: EgoClip rows (EgoVLP's ``egoclip.csv``), one record per row.

The video of a row is ``egoclip/videos/<video_uid>.mp4`` (one file per video; EgoVLP reads
600 s chunks instead). ``clip_text`` keeps the raw "#C C picks up the knife"; ``text`` is
the caption the stage-0 ego pipeline trains on: tags dropped, capitalised, with a full stop
("C picks up the knife."), the form of the Ego-Exo4D narrations used in stage 2.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from input_pipeline.annotations import AnnotationError, resolve_in_root
from input_pipeline.datasets.common import WorldBuilder, field, number, read_csv, time_feature

__all__ = ["EgoClip", "clean_narration"]

CSV_FILE = "egoclip/egoclip.csv"
VIDEO_RULE = "egoclip/videos/{video_uid}.mp4"
COLUMNS = ("video_uid", "clip_start", "clip_end", "clip_text")
_TAG = re.compile(r"#(?:C|O|unsure|summary)\b\s*", re.IGNORECASE)


def clean_narration(text: str) -> str:
    """``"#C C picks up the knife"`` -> ``"C picks up the knife."`` (Ego4D tags removed)."""
    out = " ".join(_TAG.sub(" ", text).split())
    if not out:
        return out
    out = out[0].upper() + out[1:]
    return out if out[-1] in ".!?" else out + "."


def _int_list(value: str, *, file: str, where: str, name: str) -> list[int]:
    """EgoClip's ``tag_verb`` / ``tag_noun`` (a Python list literal such as ``"[0, 3]"``)."""
    if value in (None, ""):
        return []
    try:
        out = ast.literal_eval(value)  # literals only: never evaluates code
        if isinstance(out, int):
            out = [out]
        return [int(x) for x in out]
    except (ValueError, SyntaxError, TypeError):
        raise AnnotationError(
            f"{file}: {where} field {name!r} must be a list of ints, got {value!r:.80}"
        ) from None


class EgoClip(WorldBuilder):
    """Ego clip-text rows for stage 0 (``E_ego`` initialisation)."""

    DESCRIPTION = __doc__

    def _features(self) -> dict:
        text = tfds.features.Text
        return {
            "id": text(),
            "video_uid": text(),
            "video": text(),
            "start": time_feature(),
            "end": time_feature(),
            "narration_time": time_feature(),
            "clip_text": text(),
            "text": text(),
            "tag_verb": tfds.features.Sequence(np.int64),
            "tag_noun": tfds.features.Sequence(np.int64),
        }

    def _parse(self, root: Path) -> dict[str, list[tuple[str, dict]]]:
        rows = read_csv(root, CSV_FILE, delimiter="\t", required=COLUMNS)
        records = []
        for i, row in enumerate(rows):
            w = f"row {i + 2}"  # 1-based, after the header
            uid = field(row, "video_uid", file=CSV_FILE, where=w, types=str)
            video = resolve_in_root(
                root, VIDEO_RULE.format(video_uid=uid), file=CSV_FILE, where=w, field="video_uid"
            )
            raw = field(row, "clip_text", file=CSV_FILE, where=w, types=str)
            text = clean_narration(raw)
            if not text:
                raise AnnotationError(f"{CSV_FILE}: {w} field 'clip_text' is empty")
            key = str(row.get("clip_idx") or i)
            start = number(row, "clip_start", file=CSV_FILE, where=w)
            end = number(row, "clip_end", file=CSV_FILE, where=w)
            records.append(
                (
                    key,
                    {
                        "id": key,
                        "video_uid": uid,
                        "video": video,
                        "start": start,
                        "end": end,
                        "narration_time": number(
                            row, "narration_time", file=CSV_FILE, where=w, default=(start + end) / 2
                        ),
                        "clip_text": raw,
                        "text": text,
                        "tag_verb": _int_list(
                            row.get("tag_verb"), file=CSV_FILE, where=w, name="tag_verb"
                        ),
                        "tag_noun": _int_list(
                            row.get("tag_noun"), file=CSV_FILE, where=w, name="tag_noun"
                        ),
                    },
                )
            )
        return {"train": records}
