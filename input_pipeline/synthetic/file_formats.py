"""How the world's annotation files are written: times, clip windows, JSON, TSV, and the
VideoLLaMA2 conversation record shared by the caption and instruction files."""

from __future__ import annotations

import csv
import io
import json
import math

from input_pipeline.synthetic.takes import Step, TakeSpec

__all__ = [
    "FORMAT_VERSION",
    "annotation_time",
    "clip_window",
    "json_bytes",
    "tsv_bytes",
    "conversation",
]

#: Version of the world's file layout (``world.json`` and the Ego-Exo4D ``ds_version``).
FORMAT_VERSION = 1


def annotation_time(x: float) -> float:
    """A time for an annotation file: 4 decimals, rounded down (never past the video end)."""
    return math.floor(max(x, 0.0) * 1e4) / 1e4


def clip_window(take: TakeSpec, s: Step) -> tuple[float, float]:
    """Clip boundaries of a step, clamped to the video."""
    return annotation_time(s.t0), annotation_time(min(s.t1, take.duration))


def json_bytes(obj) -> bytes:
    """``obj`` as UTF-8 JSON, one-space indent, newline-terminated."""
    return (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode()


def tsv_bytes(header: list[str], rows: list[list], delimiter: str = "\t") -> bytes:
    """A header line and ``rows`` as a CSV file (tab-separated unless ``delimiter``)."""
    buf = io.StringIO()
    w = csv.writer(buf, delimiter=delimiter, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue().encode()


def conversation(
    sid: str, video: str, start: float | None, end: float | None, turns: list[tuple[str, str]]
) -> dict:
    """VideoLLaMA2 conversation record; ``<video>`` opens the first human turn."""
    conv = []
    for j, (q, a) in enumerate(turns):
        conv.append({"from": "human", "value": ("<video>\n" if j == 0 else "") + q})
        conv.append({"from": "gpt", "value": a})
    rec = {"id": sid, "video": video}
    if start is not None:
        rec["start"], rec["end"] = start, end
    rec["conversations"] = conv
    return rec
