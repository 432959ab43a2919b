"""``ego_exo_clip``: Ego-ExoClip pairs cut around Ego-Exo4D atomic narrations.

One record per kept atomic description: the narration, its timestamp, a clip window
``[t - w/2, t + w/2]`` (clamped to the take) and the relative paths of the take's ego video
and of every exo video, time-synchronised (frame-aligned videos), so that the same window
cuts a synchronized ego/exo pair (method.md §5; the paper's clips average 0.68 s).

Reads ``takes.json`` (the view rules are :mod:`.ego_exo_takes`) and
``annotations/atomic_descriptions_{train,val}.json`` under the data root (train is required;
val adds a ``val`` split when present and not empty). A description is **skipped** (counted)
when its take is unusable or it is malformed, else **filtered** when a rejected annotation
pass or an option excludes it (``narration_subject``, ``ego_visible``, ``unsure``; see
:class:`~input_pipeline.datasets.options.BuildOptions`), else kept.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from input_pipeline.annotations import AnnotationError
from input_pipeline.datasets.common import (
    WorldBuilder,
    field,
    flag,
    number,
    read_json,
    time_feature,
)
from input_pipeline.datasets.ego_exo_takes import TakeProblem, Takes, TakeViews
from input_pipeline.datasets.options import BuildOptions
from input_pipeline.datasets.report import BuildReport

__all__ = ["EgoExoClip", "EgoExoClipConfig", "window_config"]

log = logging.getLogger(__name__)

ANNOTATION_FILE = "annotations/atomic_descriptions_{split}.json"


@dataclasses.dataclass
class EgoExoClipConfig(tfds.core.BuilderConfig):
    """``window_s``: clip length around each narration timestamp, seconds."""

    window_s: float = 1.0


def window_config(window_s: float) -> EgoExoClipConfig:
    """The config for a window (named ``w<milliseconds>ms``, e.g. ``w680ms``): a predefined
    one when it exists (TFDS refuses look-alikes), else a custom one."""
    for config in EgoExoClip.BUILDER_CONFIGS:
        if config.window_s == window_s:
            return config
    return _make_config(window_s)


def _make_config(window_s: float) -> EgoExoClipConfig:
    if not window_s > 0:
        raise ValueError(f"window_s must be > 0, got {window_s}")
    ms = int(round(window_s * 1000))
    return EgoExoClipConfig(
        name=f"w{ms}ms",
        description=f"{window_s:g} s clips centred on each narration",
        window_s=window_s,
    )


class EgoExoClip(WorldBuilder):
    """Synchronized ego/exo clips + narration (stage 2 pairs; stage 0/1 ego or exo side)."""

    BUILDER_CONFIGS = [_make_config(1.0), _make_config(0.68)]
    DESCRIPTION = __doc__

    def _features(self) -> dict:
        text = tfds.features.Text
        return {
            "id": text(),
            "take_uid": text(),
            "take_name": text(),
            "text": text(),  # the narration, e.g. "C picks up the red cup."
            "timestamp": time_feature(),
            "start": time_feature(),
            "end": time_feature(),
            "ego_video": text(),  # relative to the data root
            "exo_videos": tfds.features.Sequence(text()),
            "exo_cams": tfds.features.Sequence(text()),
            "best_exo": np.int64,  # index into exo_videos (0 when not annotated)
        }

    def _parse(self, root: Path) -> dict[str, Iterator[tuple[str, dict]]]:
        takes = Takes(root, self.options)
        out = {}
        for split in ("train", "val"):
            rel = ANNOTATION_FILE.format(split=split)
            if split != "train" and not (root / rel).is_file():
                continue
            data = read_json(root, rel)
            annotations = field(data, "annotations", file=rel, where="the file", types=dict)
            if split != "train" and not annotations:
                log.warning("%s annotates no take; the val split is left out", rel)
                continue
            out[split] = self._records(annotations, rel, takes, self.new_report(split, rel))
        return out

    def _records(
        self, annotations: dict, rel: str, takes: Takes, report: BuildReport
    ) -> Iterator[tuple[str, dict]]:
        """The records of one annotation file (the module docstring's rules)."""
        half = self.builder_config.window_s / 2
        for take_uid, passes in annotations.items():
            where = f"annotations[{take_uid!r}]"
            if not isinstance(passes, list):
                report.add_read()
                report.skip(
                    "malformed annotation pass",
                    f"{rel}: {where} must be a list of annotation passes",
                )
                continue
            for p, ann in enumerate(passes):
                w = f"{where}[{p}]"
                try:
                    uid = str(
                        field(ann, "annotation_uid", file=rel, where=w, default=f"{take_uid}_{p}")
                    )
                    descs = field(ann, "descriptions", file=rel, where=w, types=list)
                    rejected = flag(ann, "rejected", file=rel, where=w, default=False)
                except AnnotationError as e:
                    report.add_read()
                    report.skip("malformed annotation pass", str(e))
                    continue
                report.add_read(len(descs))
                if rejected:
                    report.filter(
                        "annotation pass rejected (rejected: true)", f"{rel}: {w}", len(descs)
                    )
                    continue
                take = takes.get(str(take_uid), report)
                if isinstance(take, TakeProblem):
                    report.skip(take.reason, take.detail, len(descs))
                    continue
                for k, d in enumerate(descs):
                    wd = f"{w}.descriptions[{k}]"
                    record = self._record(d, f"{uid}_{k}", rel, wd, take, half, report)
                    if record is not None:
                        yield record["id"], record

    def _record(
        self, d: Any, key: str, rel: str, wd: str, take: TakeViews, half: float, report: BuildReport
    ) -> dict | None:
        """The record of description ``d``, or None (counted in ``report``)."""
        try:
            t = number(d, "timestamp", file=rel, where=wd)
            text = field(d, "text", file=rel, where=wd, types=str).strip()
            subject = _subject(d, rel, wd)
            visible = flag(d, "ego_visible", file=rel, where=wd, default=True)
            unsure = flag(d, "unsure", file=rel, where=wd, default=False)
            best = field(d, "best_exo", file=rel, where=wd, default={})
        except AnnotationError as e:
            report.skip("malformed description", str(e))
            return None
        start, end = max(0.0, t - half), min(take.duration, t + half)
        if not end > start:
            report.skip(
                "timestamp outside the take",
                f"{rel}: {wd} timestamp {t} lies outside the take (0 to {take.duration} s)",
            )
            return None
        if not text:
            report.skip("empty text", f"{rel}: {wd} field 'text' is empty")
            return None
        if reason := _filtered(self.options, subject, visible, unsure):
            report.filter(reason, f"{rel}: {wd}: {text[:60]!r} (narration_subject {subject!r})")
            return None
        best_cam = best.get("cam_id") if isinstance(best, dict) else None
        cams = list(take.exo_cams)
        return {
            "id": key,
            "take_uid": take.uid,
            "take_name": take.name,
            "text": text,
            "timestamp": t,
            "start": start,
            "end": end,
            "ego_video": take.ego,
            "exo_videos": list(take.exo),
            "exo_cams": cams,
            "best_exo": cams.index(best_cam) if best_cam in cams else 0,
        }


def _subject(d: Any, rel: str, wd: str) -> str | None:
    """Who a description is about: ``narration_subject`` (the documented sample) or
    ``subject`` (the documented field list), ``"C"`` = the camera wearer; None if absent."""
    name = "narration_subject" if isinstance(d, dict) and "narration_subject" in d else "subject"
    value = field(d, name, file=rel, where=wd, types=str, default=None)
    return None if value is None else value.strip()


def _filtered(options: BuildOptions, subject: str | None, visible: bool, unsure: bool) -> str:
    """The option that drops a well-formed description, or ``""``."""
    if options.subjects and subject is not None and subject not in options.subjects:
        return f"narration_subject not {' / '.join(options.subjects)} (option subjects)"
    if options.require_ego_visible and not visible:
        return "not visible from the ego view (option require_ego_visible)"
    if options.drop_unsure and unsure:
        return "annotator unsure of the objects (option drop_unsure)"
    return ""
