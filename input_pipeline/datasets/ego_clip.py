"""``ego_clip``: EgoClip rows (EgoVLP's ``egoclip.csv``), one record per row, **streamed**.

The 3.85 M-row file is read row by row (never whole; docs/data.md gives the measured peak
memory). A row that cannot be parsed, has the wrong number of fields or a malformed value is
skipped and counted, as EgoVLP's ``pd.read_csv(..., error_bad_lines=False)`` skips bad
lines.

The video of a row follows ``options.egoclip_videos``
(:data:`~input_pipeline.datasets.options.EGOCLIP_LAYOUTS`): ``egoclip/videos/<video_uid>.mp4``
(the demo world, default), Ego4D's ``v1/full_scale/<video_uid>.mp4``, or EgoVLP's 600 s
chunks ``ego4d_chunked/<video_uid>/<chunk>.mp4``: as EgoVLP's ``EgoClip_EgoMCQ``, the chunk
is ``max(clip_start, 0) // 600`` and the stored times are relative to it (a clip that runs
into the next chunk ends at its chunk's end; counted as a note). ``clip_text`` keeps the raw
"#C C picks up the knife"; ``text`` is the caption the stage-0 ego pipeline trains on: tags
dropped, capitalised, with a full stop ("C picks up the knife."), the form of the Ego-Exo4D
narrations used in stage 2.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from input_pipeline.annotations import AnnotationError, resolve_in_root
from input_pipeline.datasets.common import (
    WorldBuilder,
    csv_header,
    field,
    iter_csv_rows,
    number,
    time_feature,
)
from input_pipeline.datasets.options import CHUNK_SECONDS
from input_pipeline.datasets.report import BuildReport

__all__ = ["EgoClip", "clean_narration"]

CSV_FILE = "egoclip/egoclip.csv"
COLUMNS = ("video_uid", "clip_start", "clip_end", "clip_text")
_TAG = re.compile(r"#(?:C|O|unsure|summary)\b\s*", re.IGNORECASE)
_INT = r"\s*(?:0|[1-9][0-9]*)\s*"
_INTS = re.compile(rf"\[(?:{_INT}(?:,{_INT})*)?\s*\]")  # "[93]", "[192, 115, 12]", "[]"


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
    if _INTS.fullmatch(value):  # the usual form, without the cost of literal_eval
        return [int(x) for x in value.strip()[1:-1].split(",") if x.strip()]
    try:
        out = ast.literal_eval(value)  # literals only: never evaluates code
        if isinstance(out, int):
            out = [out]
        return [int(x) for x in out]
    except (ValueError, SyntaxError, TypeError, RecursionError):
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

    def _parse(self, root: Path) -> dict[str, Iterator[tuple[str, dict]]]:
        csv_header(root, CSV_FILE, delimiter="\t", required=COLUMNS)  # fails before writing
        return {"train": self._records(root, self.new_report("train", CSV_FILE))}

    def _records(self, root: Path, report: BuildReport) -> Iterator[tuple[str, dict]]:
        template = self.options.egoclip_template
        chunked = self.options.egoclip_chunked
        resolved: dict[str, str] = {}  # template path -> checked path (one per video)
        for line, row in iter_csv_rows(root, CSV_FILE, delimiter="\t", report=report):
            i = report.read - 1  # the row's index among the data rows
            w = f"line {line}"
            try:
                record = _record(row, i, w)
            except AnnotationError as e:
                report.skip("malformed row", str(e))
                continue
            if not record["text"]:
                report.skip(
                    "empty clip_text", f"{CSV_FILE}: {w} field 'clip_text' has no words but tags"
                )
                continue
            if not record["end"] >= record["start"]:
                report.skip(
                    "clip_end before clip_start",
                    f"{CSV_FILE}: {w}: clip {record['start']} to {record['end']} s",
                )
                continue
            chunk = {}
            if chunked:
                chunk, clamped = _to_chunk(record)
                if clamped:
                    report.note(
                        "clip runs into the next 600 s chunk: end clamped to its chunk's end",
                        f"{CSV_FILE}: {w}: clip_end {clamped} s",
                    )
            rel = template.format(video_uid=record["video_uid"], **chunk)
            if rel not in resolved:
                try:
                    resolved[rel] = resolve_in_root(
                        root, rel, file=CSV_FILE, where=w, field="video_uid"
                    )
                except AnnotationError as e:
                    report.skip("video path outside the data root", str(e))
                    continue
            record["video"] = resolved[rel]
            yield record["id"], record


def _record(row: dict[str, str], i: int, w: str) -> dict:
    """The record of one well-formed row (``video`` still unset); AnnotationError if a value
    is malformed."""
    uid = field(row, "video_uid", file=CSV_FILE, where=w, types=str)
    if not uid.strip():
        raise AnnotationError(f"{CSV_FILE}: {w} field 'video_uid' is empty")
    raw = field(row, "clip_text", file=CSV_FILE, where=w, types=str)
    key = str(row.get("clip_idx") or i)
    start = _finite(row, "clip_start", w)
    end = _finite(row, "clip_end", w)
    narration = number(row, "narration_time", file=CSV_FILE, where=w, default=(start + end) / 2)
    return {
        "id": key,
        "video_uid": uid,
        "video": "",
        "start": start,
        "end": end,
        "narration_time": narration,
        "clip_text": raw,
        "text": clean_narration(raw),
        "tag_verb": _int_list(row.get("tag_verb"), file=CSV_FILE, where=w, name="tag_verb"),
        "tag_noun": _int_list(row.get("tag_noun"), file=CSV_FILE, where=w, name="tag_noun"),
    }


def _finite(row: dict[str, str], name: str, w: str) -> float:
    value = number(row, name, file=CSV_FILE, where=w)
    if not math.isfinite(value):
        raise AnnotationError(f"{CSV_FILE}: {w} field {name!r} must be a finite time, got {value}")
    return value


def _to_chunk(record: dict) -> tuple[dict[str, int], float | None]:
    """Make ``record``'s times relative to its EgoVLP chunk (``EgoClip_EgoMCQ._get_video_path``:
    chunk = ``max(clip_start, 0) // 600``); returns the template field and, when the clip
    ends in a later chunk, its original end (the stored end is then the chunk's end)."""
    start, end = max(record["start"], 0.0), max(record["end"], 0.0)
    chunk = int(start // CHUNK_SECONDS)
    offset = chunk * CHUNK_SECONDS
    clamped = end if int(end // CHUNK_SECONDS) != chunk else None
    record["start"] = start - offset
    record["end"] = min(end, offset + CHUNK_SECONDS) - offset
    record["narration_time"] -= offset
    return {"chunk": chunk}, clamped
