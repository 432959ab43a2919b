"""``ego_exo_clip``: Ego-ExoClip pairs cut around Ego-Exo4D atomic narrations.

One record per atomic description of a non-rejected annotation pass: the narration, its
timestamp, a clip window ``[t - w/2, t + w/2]`` (clamped to the take) and the relative
paths of the take's ego video and of every exo video, time-synchronised (frame-aligned
videos), so that the same window cuts a synchronized ego/exo pair (method.md §5; the paper's
clips average 0.68 s).

Reads ``takes.json`` and ``annotations/atomic_descriptions_{train,val}.json`` under the data
root (train is required; val adds a ``val`` split when present).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from input_pipeline.annotations import AnnotationError, resolve_in_root
from input_pipeline.datasets.common import WorldBuilder, field, number, read_json, time_feature

__all__ = ["EgoExoClip", "EgoExoClipConfig", "window_config"]

TAKES_FILE = "takes.json"
ANNOTATION_FILE = "annotations/atomic_descriptions_{split}.json"
EGO_STREAM = "rgb"  # readable_stream_id of the Aria RGB stream ("214-1")
EXO_STREAM = "0"


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

    def _parse(self, root: Path) -> dict[str, list[tuple[str, dict]]]:
        takes = _read_takes(root)
        out = {}
        for split in ("train", "val"):
            rel = ANNOTATION_FILE.format(split=split)
            if split != "train" and not (root / rel).is_file():
                continue
            out[split] = self._records(read_json(root, rel), rel, takes)
        return out

    def _records(self, data, rel: str, takes: dict[str, dict]) -> list[tuple[str, dict]]:
        annotations = field(data, "annotations", file=rel, where="the file", types=dict)
        half = self.builder_config.window_s / 2
        records = []
        for take_uid, passes in annotations.items():
            where = f"annotations[{take_uid!r}]"
            if take_uid not in takes:
                raise AnnotationError(f"{rel}: {where} names a take that is not in {TAKES_FILE}")
            take = takes[take_uid]
            if not isinstance(passes, list):
                raise AnnotationError(f"{rel}: {where} must be a list of annotation passes")
            for p, ann in enumerate(passes):
                w = f"{where}[{p}]"
                if field(ann, "rejected", file=rel, where=w, default=False):
                    continue
                uid = str(
                    field(ann, "annotation_uid", file=rel, where=w, default=f"{take_uid}_{p}")
                )
                descs = field(ann, "descriptions", file=rel, where=w, types=list)
                for k, d in enumerate(descs):
                    wd = f"{w}.descriptions[{k}]"
                    t = number(d, "timestamp", file=rel, where=wd)
                    start = max(0.0, t - half)
                    end = min(take["duration"], t + half)
                    if not end > start:
                        raise AnnotationError(
                            f"{rel}: {wd} timestamp {t} lies outside the take "
                            f"(0 to {take['duration']} s)"
                        )
                    best = field(d, "best_exo", file=rel, where=wd, default={})
                    best_cam = best.get("cam_id") if isinstance(best, dict) else None
                    cams = take["exo_cams"]
                    records.append(
                        (
                            f"{uid}_{k}",
                            {
                                "id": f"{uid}_{k}",
                                "take_uid": take_uid,
                                "take_name": take["name"],
                                "text": field(d, "text", file=rel, where=wd, types=str).strip(),
                                "timestamp": t,
                                "start": start,
                                "end": end,
                                "ego_video": take["ego"],
                                "exo_videos": take["exo"],
                                "exo_cams": cams,
                                "best_exo": cams.index(best_cam) if best_cam in cams else 0,
                            },
                        )
                    )
        return records


def _read_takes(root: Path) -> dict[str, dict]:
    """take_uid -> {name, duration, ego (path), exo (paths), exo_cams} from takes.json."""
    takes = read_json(root, TAKES_FILE)
    if not isinstance(takes, list):
        raise AnnotationError(f"{TAKES_FILE}: expected a list of takes")
    out = {}
    for i, take in enumerate(takes):
        w = f"take {i}"
        uid = field(take, "take_uid", file=TAKES_FILE, where=w, types=str)
        w = f"take {uid!r}"
        root_dir = field(take, "root_dir", file=TAKES_FILE, where=w, types=str)
        fav = field(take, "frame_aligned_videos", file=TAKES_FILE, where=w, types=dict)
        capture = field(take, "capture", file=TAKES_FILE, where=w, types=dict)
        cameras = field(capture, "cameras", file=TAKES_FILE, where=f"{w}.capture", types=list)
        ego, exo, exo_cams = None, [], []
        for c, cam in enumerate(cameras):
            cam_id = field(cam, "cam_id", file=TAKES_FILE, where=f"{w}.capture.cameras[{c}]")
            is_ego = field(cam, "is_ego", file=TAKES_FILE, where=f"{w}.capture.cameras[{c}]")
            stream = EGO_STREAM if is_ego else EXO_STREAM
            if cam_id not in fav or stream not in fav[cam_id]:
                if is_ego:
                    raise AnnotationError(
                        f"{TAKES_FILE}: {w} has no frame_aligned_videos[{cam_id!r}][{stream!r}] "
                        "for its ego camera"
                    )
                continue  # an exo camera without a frame-aligned video is not usable
            video = f"frame_aligned_videos[{cam_id!r}][{stream!r}]"
            rel = field(
                fav[cam_id][stream],
                "relative_path",
                file=TAKES_FILE,
                where=f"{w}.{video}",
                types=str,
            )
            path = resolve_in_root(
                root,
                f"{root_dir}/{rel}",
                file=TAKES_FILE,
                where=w,
                field=f"root_dir + {video}.relative_path",
            )
            if is_ego:
                ego = path
            else:
                exo.append(path)
                exo_cams.append(str(cam_id))
        if ego is None or not exo:
            raise AnnotationError(
                f"{TAKES_FILE}: {w} needs an ego camera (is_ego true) and at least one exo "
                "camera with frame-aligned videos"
            )
        duration = number(take, "duration_sec", file=TAKES_FILE, where=w, default=math.inf)
        out[uid] = {
            "name": str(field(take, "take_name", file=TAKES_FILE, where=w, default=uid)),
            "duration": duration,
            "ego": ego,
            "exo": exo,
            "exo_cams": exo_cams,
        }
    return out
