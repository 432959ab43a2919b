"""Ego-Exo4D's ``takes.json`` -> the ego video and the exo videos of each take.

The view rules (docs/data.md, "Ego-Exo4D views"), from the public takes.json schema
(``capture.cameras[]`` = ``{cam_id, is_ego, device_type, ...}``;
``frame_aligned_videos[cam_id][stream] = {relative_path, is_collage, ...}``):

* **ego view:** a camera with ``is_ego`` true and a frame-aligned video in stream ``"rgb"``
  (Aria glasses, stream ``214-1``) or ``"0"`` (the takes whose ego camera is a head-worn
  GoPro ``camXX``). With several, an ``aria*`` camera wins, as in Ego-Exo4D's own tools.
* **exo views:** cameras with ``is_ego`` false whose ``cam_id`` matches
  ``options.exo_cameras`` (default ``(cam|gp)\\d+``, the static GoPros) and that have a
  stream-``"0"`` video. The hand-held ``mobile`` camera (spelled ``moblie`` in the
  documentation's sample) is a GoPro with ``is_ego`` false too: only its id tells it from
  a static camera, so the id pattern is the rule. Collage videos (``is_collage`` true, the
  ``collage`` / ``best_exo`` entries) and streams without a ``relative_path`` are never views.
* ``options.ego_exo_downscaled = 448`` reads ``<dir>/downscaled/448/<file>`` next to each
  ``relative_path`` (Ego-Exo4D's ``downscaled_takes/448`` download).
* With ``options.missing_videos == "skip"``, an exo view whose file is absent is dropped
  (a note) and a take whose ego file is absent is unusable.

A take is worked out the first time a record names it; an unusable take is a
:class:`TakeProblem`, so its records are skipped (counted), not fatal.
"""

from __future__ import annotations

import dataclasses
import math
import posixpath
from pathlib import Path

from input_pipeline.annotations import AnnotationError, resolve_in_root
from input_pipeline.datasets.common import field, flag, number, read_json
from input_pipeline.datasets.options import BuildOptions
from input_pipeline.datasets.report import BuildReport

__all__ = ["TAKES_FILE", "TakeProblem", "TakeViews", "Takes"]

TAKES_FILE = "takes.json"
EGO_STREAMS = ("rgb", "0")  # Aria RGB (readable_stream_id of "214-1"); a GoPro's one stream
EXO_STREAM = "0"


@dataclasses.dataclass(frozen=True)
class TakeViews:
    """The usable videos of a take (paths relative to the data root)."""

    uid: str
    name: str
    duration: float
    ego: str
    exo: tuple[str, ...]
    exo_cams: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TakeProblem:
    """Why a take cannot give records: ``reason`` (the summary's line) and ``detail`` (names
    the file, the take and the field)."""

    reason: str
    detail: str


class Takes:
    """``takes.json`` of a data root, read once; views worked out per take on first use."""

    def __init__(self, root: Path, options: BuildOptions):
        data = read_json(root, TAKES_FILE)
        if not isinstance(data, list):
            raise AnnotationError(f"{TAKES_FILE}: expected a JSON list of takes")
        self.root, self.options = root, options
        self._raw: dict[str, dict] = {}
        for take in data:
            uid = take.get("take_uid") if isinstance(take, dict) else None
            if isinstance(uid, str):  # a take without an id cannot be named by a record
                self._raw[uid] = take
        self._views: dict[str, TakeViews | TakeProblem] = {}

    def get(self, uid: str, report: BuildReport) -> TakeViews | TakeProblem:
        """The views of take ``uid`` (notes about it go to ``report`` once)."""
        if uid not in self._views:
            if uid not in self._raw:
                self._views[uid] = TakeProblem(
                    "take not in takes.json", f"{TAKES_FILE} has no take_uid {uid!r}"
                )
            else:
                try:
                    self._views[uid] = self._resolve(uid, self._raw[uid], report)
                except AnnotationError as e:
                    self._views[uid] = TakeProblem("malformed take", str(e))
        return self._views[uid]

    def _resolve(self, uid: str, take: dict, report: BuildReport) -> TakeViews | TakeProblem:
        name = str(field(take, "take_name", file=TAKES_FILE, where=f"take {uid!r}", default=uid))
        w = f"take {uid!r} ({name})"
        root_dir = field(take, "root_dir", file=TAKES_FILE, where=f"take {uid!r}", types=str)
        fav = field(take, "frame_aligned_videos", file=TAKES_FILE, where=w, types=dict)
        capture = field(take, "capture", file=TAKES_FILE, where=w, types=dict)
        cameras = field(capture, "cameras", file=TAKES_FILE, where=f"{w}.capture", types=list)
        duration = number(take, "duration_sec", file=TAKES_FILE, where=w, default=math.inf)
        ego_cams, exo_cams = [], []
        for c, cam in enumerate(cameras):
            wc = f"{w}.capture.cameras[{c}]"
            cam_id = str(field(cam, "cam_id", file=TAKES_FILE, where=wc))
            if flag(cam, "is_ego", file=TAKES_FILE, where=wc):
                ego_cams.append(cam_id)
            elif self.options.exo_camera_ok(cam_id):
                exo_cams.append(cam_id)
            else:
                report.note(
                    "camera not used as an exo view (not a static exo camera id)",
                    f"{TAKES_FILE}: {w}: camera {cam_id!r} (is_ego false) does not match "
                    f"exo_cameras '{self.options.exo_cameras}'",
                )

        ego = None
        for cam_id in sorted(ego_cams, key=lambda c: not c.lower().startswith("aria")):
            ego = ego or self._video(fav, cam_id, EGO_STREAMS, root_dir, w)
        if isinstance(ego, TakeProblem):
            return ego
        if ego is None:
            return TakeProblem(
                "take without a usable ego view",
                f"{TAKES_FILE}: {w}: no camera with is_ego true has a frame-aligned "
                f"{' or '.join(map(repr, EGO_STREAMS))} video (is_ego cameras: {ego_cams})",
            )
        if not self._present(ego):
            return TakeProblem(
                "ego video file missing", f"{TAKES_FILE}: {w}: {ego} not found under the data root"
            )

        exo, kept_cams = [], []
        for cam_id in exo_cams:
            path = self._video(fav, cam_id, (EXO_STREAM,), root_dir, w)
            if isinstance(path, TakeProblem):
                return path
            if path is None:
                report.note(
                    "exo camera without a frame-aligned video",
                    f"{TAKES_FILE}: {w}: frame_aligned_videos[{cam_id!r}][{EXO_STREAM!r}]",
                )
            elif not self._present(path):
                report.note(
                    "exo view dropped: video file missing",
                    f"{TAKES_FILE}: {w}: {path} not found under the data root",
                )
            else:
                exo.append(path)
                kept_cams.append(cam_id)
        if not exo:
            return TakeProblem(
                "take without a usable exo view",
                f"{TAKES_FILE}: {w}: no static exo camera with a frame-aligned video (cameras: "
                f"{[str(c.get('cam_id')) for c in cameras if isinstance(c, dict)]})",
            )
        return TakeViews(uid, name, duration, ego, tuple(exo), tuple(kept_cams))

    def _video(
        self, fav: dict, cam_id: str, streams: tuple[str, ...], root_dir: str, w: str
    ) -> str | TakeProblem | None:
        """The path of ``cam_id``'s first usable stream of ``streams``, or None."""
        entry = fav.get(cam_id)
        for stream in streams:
            video = entry.get(stream) if isinstance(entry, dict) else None
            if not isinstance(video, dict):
                continue
            where = f"{w}.frame_aligned_videos[{cam_id!r}][{stream!r}]"
            if flag(video, "is_collage", file=TAKES_FILE, where=where, default=False):
                continue
            rel = video.get("relative_path")
            if not isinstance(rel, str) or not rel:
                continue
            if self.options.ego_exo_downscaled:
                size = str(self.options.ego_exo_downscaled)
                rel = posixpath.join(
                    posixpath.dirname(rel), "downscaled", size, posixpath.basename(rel)
                )
            try:
                return resolve_in_root(
                    self.root,
                    f"{root_dir}/{rel}",
                    file=TAKES_FILE,
                    where=w,
                    field=f"root_dir + frame_aligned_videos[{cam_id!r}][{stream!r}].relative_path",
                )
            except AnnotationError as e:
                return TakeProblem("video path outside the data root", str(e))
        return None

    def _present(self, path: str) -> bool:
        return self.options.missing_videos == "keep" or (self.root / path).is_file()
